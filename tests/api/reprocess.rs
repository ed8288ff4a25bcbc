//! Every callback understood, none a dead end: repairs, operations that follow their job,
//! quarantined deliveries counted on their job, and `reprocess` (API and CLI) over stored raw
//! bodies. Both backends.

use serde_json::{Value, json};

use crate::helpers::{CarrierResult, TestApp, carrier_callback, fixture, spawn_app};

const SEED_004: &str = "2c90bd28-ece4-42ef-9f02-7e3bd4fbff33";

async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app
        .get_api("/metrics")
        .await
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(series).map(str::trim))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

async fn post_reprocess(app: &TestApp, id: i64, query: &str) -> (u16, Value) {
    let response = app
        .client
        .post(format!(
            "{}/api/v1/deliveries/{id}/reprocess{query}",
            app.api_url
        ))
        .send()
        .await
        .expect("reprocess sent");
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn only_delivery(app: &TestApp, request_id: &str) -> Value {
    let listing = app
        .get_json(&format!("/api/v1/deliveries?request_id={request_id}"))
        .await;
    listing["items"][0].clone()
}

#[tokio::test]
async fn the_seed_004_example_with_its_malformed_tag_is_a_succeeded_outcome_of_its_registered_job()
{
    let app = spawn_app().await;
    app.register(json!({"request_id": SEED_004, "operation": "activate", "expected_devices": 1}))
        .await;
    let answer = app
        .post_callback(fixture("activate_seed004_malformed.xml"))
        .await;
    assert_eq!(answer.status(), 200);

    let delivery = only_delivery(&app, SEED_004).await;
    assert_eq!(delivery["result"], "stored");
    assert_eq!(delivery["repaired"], true);
    let repairs = delivery["repairs"].as_array().expect("repairs listed");
    assert!(
        repairs[0]
            .as_str()
            .is_some_and(|line| line.contains("</MaxCallbackThreshold/>")),
        "{repairs:?}"
    );
    let job = app.get_json(&format!("/api/v1/jobs/{SEED_004}")).await;
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["succeeded"], 1);
    assert_eq!(job["quarantined"], 0);
    // The raw body is kept as received, malformation included.
    let raw = app
        .get_api(&format!("/api/v1/deliveries/{}/raw", delivery["id"]))
        .await;
    let body = raw.bytes().await.expect("raw body");
    assert!(
        String::from_utf8_lossy(&body).contains("</MaxCallbackThreshold/>"),
        "the raw body was changed"
    );
}

#[tokio::test]
async fn a_fault_only_callback_carries_its_jobs_operation_in_the_listing_and_the_metrics() {
    let app = spawn_app().await;
    let request_id = "5d4ba5a4-7d1b-4a4e-9c2a-0f3f4b1f2c10";
    app.register(
        json!({"request_id": request_id, "operation": "deactivate", "expected_devices": 1}),
    )
    .await;
    let before = metric(
        &app,
        "m2m_device_outcomes_total{operation=\"deactivate\",status=\"failed\"}",
    )
    .await;
    assert_eq!(
        app.post_callback(fixture("json_fault.json")).await.status(),
        200
    );
    let devices = app
        .get_json(&format!("/api/v1/jobs/{request_id}/devices"))
        .await;
    let devices = devices["items"]
        .as_array()
        .or(devices.as_array())
        .cloned()
        .unwrap_or_default();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0]["operation"], "deactivate", "{devices:?}");
    assert_eq!(devices[0]["status"], "failed");
    let after = metric(
        &app,
        "m2m_device_outcomes_total{operation=\"deactivate\",status=\"failed\"}",
    )
    .await;
    assert_eq!(after - before, 1.0);
    assert_eq!(
        metric(
            &app,
            "m2m_device_outcomes_total{operation=\"other\",status=\"failed\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn a_quarantined_delivery_is_counted_on_its_job_and_reprocess_turns_it_into_an_outcome() {
    let app = spawn_app().await;
    app.register(json!({"request_id": SEED_004, "operation": "activate", "expected_devices": 2}))
        .await;
    // One device reported; the other's callback cannot be read (an end tag names no open
    // element: which one was meant is ambiguous).
    assert_eq!(
        app.post_callback(carrier_callback(
            SEED_004,
            &[("IMEI", "990000862471000")],
            CarrierResult::Activated { mdn: "5096300000" },
        ))
        .await
        .status(),
        200
    );
    assert_eq!(
        app.post_callback(fixture("activate_seed004_ambiguous.xml"))
            .await
            .status(),
        200
    );
    let job = app.get_json(&format!("/api/v1/jobs/{SEED_004}")).await;
    assert_eq!(job["quarantined"], 1, "{job}");
    assert_eq!(job["state"], "in_progress");
    let quarantined =
        app.get_json("/api/v1/deliveries?result=quarantined").await["items"][0].clone();
    let id = quarantined["id"].as_i64().expect("a quarantined delivery");
    let reason = quarantined["parse_error"].clone();

    // Still unreadable: it stays quarantined, with the same reason; twice changes nothing.
    for _ in 0..2 {
        let (status, answer) = post_reprocess(&app, id, "").await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["delivery"]["result"], "quarantined", "{answer}");
        let delivery = only_delivery(&app, SEED_004).await;
        assert_eq!(delivery["result"], "quarantined");
        assert_eq!(delivery["parse_error"], reason);
        assert_eq!(delivery["reprocessed_at"], Value::Null);
    }

    // A body an older parser could not read and this one can: what the stored raw body of a
    // delivery quarantined by an older release is (tests/api/upgrade.rs has the real one).
    let malformed = fixture("activate_seed004_malformed.xml");
    match &app.database {
        crate::helpers::TestDatabase::Sqlite(_) => app.database.execute(&format!(
            "UPDATE raw_bodies SET body = x'{}' WHERE delivery_id = {id}",
            hex(&malformed)
        )),
        crate::helpers::TestDatabase::Postgres(_) => app.database.execute(&format!(
            "UPDATE raw_bodies SET body = '\\x{}'::bytea WHERE delivery_id = {id}",
            hex(&malformed)
        )),
    }
    let outcomes_before = metric(
        &app,
        "m2m_device_outcomes_total{operation=\"activate\",status=\"succeeded\"}",
    )
    .await;

    let (status, dry) = post_reprocess(&app, id, "?dry_run=true").await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["delivery"]["result"], "stored");
    assert_eq!(
        only_delivery(&app, SEED_004).await["result"],
        "quarantined",
        "a dry run changed the delivery"
    );

    let (status, answer) = post_reprocess(&app, id, "").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["delivery"]["result"], "stored", "{answer}");
    let listing = app
        .get_json(&format!("/api/v1/deliveries?request_id={SEED_004}"))
        .await;
    let reprocessed = listing["items"]
        .as_array()
        .and_then(|items| items.iter().find(|item| item["id"] == id))
        .cloned()
        .expect("the delivery is listed");
    assert_eq!(reprocessed["result"], "stored");
    assert_eq!(reprocessed["repaired"], true);
    assert!(reprocessed["reprocessed_at"].is_string());
    assert_eq!(reprocessed["parse_error"], Value::Null);
    let job = app.get_json(&format!("/api/v1/jobs/{SEED_004}")).await;
    assert_eq!(job["quarantined"], 0, "{job}");
    assert_eq!(job["devices_reported"], 2);
    assert_eq!(job["succeeded"], 2);
    assert_eq!(job["state"], "completed");
    let outcomes_after = metric(
        &app,
        "m2m_device_outcomes_total{operation=\"activate\",status=\"succeeded\"}",
    )
    .await;
    assert_eq!(outcomes_after - outcomes_before, 1.0);

    // Again: nothing changes.
    let (status, again) = post_reprocess(&app, id, "").await;
    assert_eq!(status, 200);
    assert_eq!(again["delivery"]["result"], "skipped", "{again}");
    assert_eq!(
        app.count("SELECT count(*) FROM device_outcomes"),
        2,
        "outcomes stored twice"
    );
    assert_eq!(app.get_json(&format!("/api/v1/jobs/{SEED_004}")).await, job);

    // A delivery that does not exist, and a path id that is not one.
    assert_eq!(post_reprocess(&app, 999_999, "").await.0, 404);
    let (status, _) = post_reprocess(&app, id, "?dry_run=maybe").await;
    assert_eq!(status, 400);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Several reprocess runs at once (on PostgreSQL each on its own connection, as replicas would
/// be) store a delivery once: one run stores it, the others find it no longer quarantined.
#[tokio::test]
async fn concurrent_reprocess_runs_store_a_delivery_once() {
    let app = std::sync::Arc::new(spawn_app().await);
    app.register(json!({"request_id": SEED_004, "operation": "activate", "expected_devices": 1}))
        .await;
    assert_eq!(
        app.post_callback(fixture("activate_seed004_ambiguous.xml"))
            .await
            .status(),
        200
    );
    let id = app.get_json("/api/v1/deliveries?result=quarantined").await["items"][0]["id"]
        .as_i64()
        .expect("a quarantined delivery");
    let malformed = fixture("activate_seed004_malformed.xml");
    match &app.database {
        crate::helpers::TestDatabase::Sqlite(_) => app.database.execute(&format!(
            "UPDATE raw_bodies SET body = x'{}' WHERE delivery_id = {id}",
            hex(&malformed)
        )),
        crate::helpers::TestDatabase::Postgres(_) => app.database.execute(&format!(
            "UPDATE raw_bodies SET body = '\\x{}'::bytea WHERE delivery_id = {id}",
            hex(&malformed)
        )),
    }
    let mut runs = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let app = std::sync::Arc::clone(&app);
        runs.spawn(async move { post_reprocess(&app, id, "").await });
    }
    let answers = runs.join_all().await;
    let results: Vec<&str> = answers
        .iter()
        .map(|(status, answer)| {
            assert_eq!(*status, 200, "{answer}");
            answer["delivery"]["result"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(
        results.iter().filter(|result| **result == "stored").count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .all(|result| *result == "stored" || *result == "skipped"),
        "{results:?}"
    );
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 1);
    let job = app.get_json(&format!("/api/v1/jobs/{SEED_004}")).await;
    assert_eq!(job["devices_reported"], 1, "{job}");
    assert_eq!(job["quarantined"], 0);
    assert_eq!(job["state"], "completed");
}
