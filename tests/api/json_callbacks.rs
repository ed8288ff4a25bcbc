//! JSON callbacks of the REST API: same pipeline as SOAP (spec §2, issue: JSON callbacks).

use std::sync::Arc;

use serde_json::Value;

use crate::helpers::{TestApp, fixture, spawn_app};

const CHANGE_REQUEST: &str = "a28892ea-6503-4aa7-bfa2-4cd45d42f61b";
const FAULT_REQUEST: &str = "5d4ba5a4-7d1b-4a4e-9c2a-0f3f4b1f2c10";

async fn post_json(
    app: &TestApp,
    body: impl Into<reqwest::Body>,
    content_type: Option<&str>,
) -> reqwest::Response {
    let mut request = app.client.post(&app.callback_url).body(body);
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    request.send().await.unwrap()
}

fn with_count(name: &str, count: u32) -> String {
    String::from_utf8(fixture(name)).unwrap().replace(
        "\"callbackCount\": 1",
        &format!("\"callbackCount\": {count}"),
    )
}

#[tokio::test]
async fn the_rest_api_example_is_acknowledged_with_an_empty_json_object_and_stored_as_a_success() {
    let app = spawn_app().await;

    let response = post_json(
        &app,
        fixture("json_change_identifier.json"),
        Some("application/json"),
    )
    .await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.text().await.unwrap(), "{}");
    let job = app
        .get_json(&format!("/api/v1/jobs/{CHANGE_REQUEST}"))
        .await;
    assert_eq!(job["operation"], "change_device_identifier");
    assert_eq!(job["succeeded"], 1);
    let devices = app
        .get_json(&format!("/api/v1/jobs/{CHANGE_REQUEST}/devices"))
        .await;
    let device = &devices["items"][0];
    assert_eq!(device["status"], "succeeded");
    assert_eq!(device["service_plan"], "M2M_4G");
    assert_eq!(
        device["identifiers"],
        serde_json::json!([{"kind": "ESN", "id": "22211315718"}, {"kind": "ICCID", "id": "A1000001999990"}])
    );
    let by_new_iccid = app.get_json("/api/v1/devices/iccid/A1000001999990").await;
    assert_eq!(by_new_iccid["latest"]["request_id"], CHANGE_REQUEST);
    let deliveries = app.get_json("/api/v1/deliveries").await;
    assert_eq!(deliveries["items"][0]["form"], "json");
    assert_eq!(deliveries["items"][0]["kind"], "carrier_service");
}

#[tokio::test]
async fn a_json_fault_is_a_failed_outcome_with_its_code_and_the_catalog_resolution() {
    let app = spawn_app().await;

    let response = post_json(
        &app,
        fixture("json_fault.json"),
        Some("application/json; charset=utf-8"),
    )
    .await;

    assert_eq!(response.status(), 200);
    let failed = app
        .get_json(&format!(
            "/api/v1/jobs/{FAULT_REQUEST}/devices?status=failed"
        ))
        .await;
    let device = &failed["items"][0];
    assert_eq!(
        device["fault"]["code"],
        "UnifiedWebService.REQUEST_FAILED.UnexpectedError"
    );
    assert!(
        device["fault"]["resolution"]
            .as_str()
            .is_some_and(|text| !text.is_empty()),
        "{device}"
    );
    let job = app.get_json(&format!("/api/v1/jobs/{FAULT_REQUEST}")).await;
    assert_eq!(job["failed"], 1);
    let by_imei = app.get_json("/api/v1/devices/IMEI/990000862471854").await;
    assert_eq!(by_imei["latest"]["status"], "failed");
    let metrics = app.get_api("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"m2m_faults_total{code="REQUEST_FAILED.UnexpectedError"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn json_re_deliveries_with_callback_count_1_to_4_are_stored_once() {
    let app = spawn_app().await;

    for count in 1..=4 {
        let response = post_json(
            &app,
            with_count("json_change_identifier.json", count),
            Some("application/json"),
        )
        .await;
        assert_eq!(response.status(), 200);
    }

    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 1);
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE result = 'duplicate'"),
        3
    );
    let job = app
        .get_json(&format!("/api/v1/jobs/{CHANGE_REQUEST}"))
        .await;
    assert_eq!(
        (job["deliveries"].as_i64(), job["duplicates"].as_i64()),
        (Some(4), Some(3))
    );
}

#[tokio::test]
async fn sixteen_concurrent_identical_json_callbacks_are_stored_once() {
    let app = Arc::new(spawn_app().await);
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let app = Arc::clone(&app);
        requests.spawn(async move {
            post_json(
                &app,
                fixture("json_change_identifier.json"),
                Some("application/json"),
            )
            .await
            .status()
        });
    }
    let statuses = requests.join_all().await;

    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 1);
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE result = 'duplicate'"),
        15
    );
}

#[tokio::test]
async fn json_is_recognised_whatever_the_content_type_says() {
    let app = spawn_app().await;

    for (index, content_type) in [None, Some("text/xml"), Some("text/plain")]
        .into_iter()
        .enumerate()
    {
        let body = String::from_utf8(fixture("json_change_identifier.json"))
            .unwrap()
            .replace("M2M_4G", &format!("PLAN-{index}"));
        let response = post_json(&app, format!("\n  {body}"), content_type).await;
        assert_eq!(response.status(), 200, "{content_type:?}");
        assert_eq!(response.text().await.unwrap(), "{}");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE form = 'json' AND result = 'stored'"),
        3
    );
}

#[tokio::test]
async fn malformed_json_with_credentials_is_quarantined_and_without_them_refused() {
    let app = spawn_app().await;
    let body = fixture("json_malformed.json");

    let quarantined = post_json(&app, body.clone(), Some("application/json")).await;
    let refused = post_json(&app, "{\"not\": \"a callback\"", Some("application/json")).await;

    assert_eq!(quarantined.status(), 200);
    assert_eq!(quarantined.text().await.unwrap(), "{}");
    assert_eq!(refused.status(), 400);
    let error: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "BAD_REQUEST");
    let listing = app.get_json("/api/v1/deliveries?result=quarantined").await;
    let item = &listing["items"][0];
    assert_eq!(item["request_id"], "7f1f0c1e-2d44-4a8c-8d21-5b8f5e3a9c01");
    let raw = app
        .get_api(&format!("/api/v1/deliveries/{}/raw", item["id"]))
        .await;
    assert_eq!(raw.bytes().await.unwrap().to_vec(), body);
}

#[tokio::test]
async fn a_json_callback_with_a_wrong_password_gets_a_json_403_and_nothing_is_stored() {
    let app = spawn_app().await;
    let body = String::from_utf8(fixture("json_change_identifier.json"))
        .unwrap()
        .replace(
            "\"username\": \"\", \"password\": \"\"",
            "\"username\": \"fleet-ops\", \"password\": \"guess\"",
        );

    let response = post_json(&app, body, Some("application/json")).await;

    assert_eq!(response.status(), 403);
    let error: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "UNAUTHORIZED");
    assert_eq!(app.count("SELECT count(*) FROM deliveries"), 0);
}

#[tokio::test]
async fn a_nul_character_in_a_json_value_is_stored_and_the_raw_body_kept_as_sent() {
    let app = spawn_app().await;
    // JSON may carry U+0000 (`\u0000`); PostgreSQL text cannot hold it.
    let body = String::from_utf8(fixture("json_change_identifier.json"))
        .unwrap()
        .replace("\"M2M_4G\"", "\"M2M\\u0000_4G\"")
        .replace(CHANGE_REQUEST, "nul-\\u0000-request");

    let response = post_json(&app, body.clone(), Some("application/json")).await;

    assert_eq!(response.status(), 200);
    let listing = app.get_json("/api/v1/deliveries").await;
    let delivery = &listing["items"][0];
    assert_eq!(delivery["result"], "stored", "{listing}");
    let raw = app
        .get_api(&format!("/api/v1/deliveries/{}/raw", delivery["id"]))
        .await;
    assert_eq!(raw.bytes().await.unwrap(), body.as_bytes());
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 1);
    // A NUL in a looked-up id is an unknown id, not a storage fault.
    assert_eq!(app.get_api("/api/v1/jobs/unknown%00id").await.status(), 404);
    assert_eq!(
        app.get_api("/api/v1/devices/IMEI/35%0000").await.status(),
        404
    );
}

#[tokio::test]
async fn a_nidd_uplink_is_stored_as_a_nidd_delivery_without_an_outcome() {
    let app = spawn_app().await;

    let response = post_json(
        &app,
        fixture("json_nidd_uplink.json"),
        Some("application/json"),
    )
    .await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "{}");
    let listing = app.get_json("/api/v1/deliveries").await;
    let delivery = &listing["items"][0];
    assert_eq!(delivery["result"], "stored", "{listing}");
    assert_eq!(delivery["kind"], "nidd");
    assert_eq!(delivery["operation"], "nidd_mo");
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 0);
}

#[tokio::test]
async fn a_queued_nidd_delivery_report_is_an_accepted_outcome_and_delivered_then_succeeds() {
    let app = spawn_app().await;
    let request = "c3b1a7d2-5e4f-4a60-8b19-7d2e6f0a3c21";

    let queued = post_json(
        &app,
        fixture("json_nidd_mt_queued.json"),
        Some("application/json"),
    )
    .await;

    assert_eq!(queued.status(), 200);
    let listing = app.get_json("/api/v1/deliveries").await;
    assert_eq!(listing["items"][0]["kind"], "nidd", "{listing}");
    assert_eq!(listing["items"][0]["operation"], "nidd");
    let devices = app
        .get_json(&format!("/api/v1/jobs/{request}/devices"))
        .await;
    let device = &devices["items"][0];
    assert_eq!(device["status"], "accepted", "{devices}");
    assert_eq!(device["line_status"], "Queued");
    assert_eq!(device["fault"], Value::Null, "queued is not a failure");
    let job = app.get_json(&format!("/api/v1/jobs/{request}")).await;
    assert_eq!(job["operation"], "nidd");
    assert_eq!(job["failed"], 0, "{job}");

    let delivered = post_json(
        &app,
        fixture("json_nidd_mt_delivered.json"),
        Some("application/json"),
    )
    .await;

    assert_eq!(delivered.status(), 200);
    let by_imei = app.get_json("/api/v1/devices/IMEI/990000862471854").await;
    assert_eq!(by_imei["latest"]["status"], "succeeded", "{by_imei}");
}

#[tokio::test]
async fn a_failed_nidd_delivery_report_fails_the_device_with_its_reason() {
    let app = spawn_app().await;

    let response = post_json(
        &app,
        fixture("json_nidd_mt_failed.json"),
        Some("application/json"),
    )
    .await;

    assert_eq!(response.status(), 200);
    let devices = app
        .get_json("/api/v1/jobs/4e0d9b7a-1c2f-4f83-a6d5-9b8c7e6f5a42/devices")
        .await;
    let device = &devices["items"][0];
    assert_eq!(device["status"], "failed", "{devices}");
    assert_eq!(device["fault"]["code"], "NiddService.DeliveryFailed");
    assert_eq!(
        device["fault"]["message"],
        "Timeout, could not deliver data"
    );
}
