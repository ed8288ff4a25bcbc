//! The acknowledgement contract of spec §3, one behaviour per test.

use std::sync::Arc;

use crate::helpers::{fixture, spawn_app, spawn_app_with, with_callback_count};

const ACTIVATE_REQUEST: &str = "2c90bd28-ece4-42ef-9f02-7e3bd4fbff33";
const UPLOAD_REQUEST: &str = "5afbb4c7-99dc-49a7-8341-7406b7d6f3d3";

#[tokio::test]
async fn seed_004_activation_is_acknowledged_and_its_device_stored() {
    let app = spawn_app().await;

    let response = app.post_callback(fixture("activate_seed004.xml")).await;

    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/xml")
    );
    let body = response.text().await.unwrap();
    assert!(
        body.contains("Envelope") && !body.contains("Fault"),
        "{body}"
    );
    let row = app.database.rows(&format!(
        "SELECT status, state, ip_address, mdn, service_plan, operation FROM device_outcomes WHERE request_id = '{ACTIVATE_REQUEST}'"
    ));
    let text = |index: usize| row[0][index].clone().unwrap();
    let (status, state, ip, mdn, plan, operation) =
        (text(0), text(1), text(2), text(3), text(4), text(5));
    assert_eq!(
        (
            status.as_str(),
            state.as_str(),
            ip.as_str(),
            mdn.as_str(),
            plan.as_str(),
            operation.as_str()
        ),
        (
            "succeeded",
            "Active",
            "10.224.48.88",
            "5096306081",
            "84638",
            "activate"
        )
    );
    // The device is found by any of its identifiers.
    for (kind, identifier) in [
        ("MEID", "A1000000444461"),
        ("MDN", "5096306081"),
        ("MIN", "2345958183"),
    ] {
        let found = app.count(&format!(
            "SELECT count(*) FROM outcome_identifiers i JOIN device_outcomes o ON o.id = i.outcome_id
             WHERE i.kind = '{kind}' AND i.identifier = '{identifier}' AND o.request_id = '{ACTIVATE_REQUEST}'"
        ));
        assert_eq!(found, 1, "{kind} {identifier}");
    }
    let delivery = app
        .database
        .rows("SELECT kind, result, callback_count, max_callback_threshold FROM deliveries");
    assert_eq!(
        delivery,
        vec![
            ["carrier_service", "stored", "1", "4"]
                .map(|value| Some(value.to_owned()))
                .to_vec()
        ]
    );
}

#[tokio::test]
async fn seed_001_upload_is_acknowledged_with_its_lines_and_counts() {
    let app = spawn_app().await;

    let response = app.post_callback(fixture("upload_seed001.xml")).await;

    assert_eq!(response.status(), 200);
    let mut lines: Vec<(String, String, String)> = app
        .database
        .rows(&format!(
            "SELECT o.status, o.line_status, string_agg(i.kind || '=' || i.identifier, ',')
             FROM device_outcomes o JOIN outcome_identifiers i ON i.outcome_id = o.id
             WHERE o.request_id = '{UPLOAD_REQUEST}' GROUP BY o.id ORDER BY o.id"
        ))
        .into_iter()
        .map(|row| {
            let mut row = row.into_iter().map(Option::unwrap);
            (
                row.next().unwrap(),
                row.next().unwrap(),
                row.next().unwrap(),
            )
        })
        .collect();
    assert_eq!(lines.len(), 2);
    lines.iter_mut().for_each(|line| {
        let mut identifiers: Vec<&str> = line.2.split(',').collect();
        identifiers.sort();
        line.2 = identifiers.join(",");
    });
    assert_eq!(
        lines[0],
        (
            "succeeded".to_owned(),
            "Line has been uploaded successfully".to_owned(),
            "ICCID=18072019672556477006,IMEI=180720196786706".to_owned()
        )
    );
    assert_eq!(
        lines[1].2,
        "ICCID=18072019672556477007,IMEI=180720196786707"
    );
    let summary = app.database.rows(&format!(
        "SELECT account_name, device_sku, total_lines, pending_lines, success_lines, failed_lines, package_error
         FROM upload_summaries WHERE request_id = '{UPLOAD_REQUEST}'"
    ));
    let text = |value: &str| Some(value.to_owned());
    assert_eq!(
        summary,
        vec![vec![
            text("suvenduactiot"),
            text("test"),
            text("2"),
            text("0"),
            text("2"),
            text("0"),
            None
        ]]
    );
    let account = app
        .database
        .value("SELECT account FROM deliveries")
        .unwrap();
    assert_eq!(
        account, "seed-account",
        "the matching credential's account label is kept"
    );
}

#[tokio::test]
async fn re_deliveries_with_callback_count_1_to_4_are_stored_once() {
    let app = spawn_app().await;

    for count in 1..=4 {
        let response = app
            .post_callback(with_callback_count("activate_seed004.xml", count))
            .await;
        assert_eq!(response.status(), 200, "attempt {count}");
    }

    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 1);
    assert_eq!(app.count("SELECT count(*) FROM deliveries"), 4);
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE result = 'duplicate'"),
        3
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM deliveries WHERE duplicate_of = (SELECT id FROM deliveries WHERE result = 'stored')"
        ),
        3
    );
    assert_eq!(app.count("SELECT count(*) FROM raw_bodies"), 1);
    let listing = app
        .get_json(&format!("/api/v1/deliveries?request_id={ACTIVATE_REQUEST}"))
        .await;
    let counts: Vec<i64> = listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["callback_count"].as_i64().unwrap())
        .collect();
    assert_eq!(
        counts,
        vec![4, 3, 2, 1],
        "every delivery is listed, newest first, with its CallbackCount"
    );
}

#[tokio::test]
async fn sixteen_concurrent_identical_callbacks_are_stored_once() {
    let app = Arc::new(spawn_app().await);
    let body = fixture("activate_seed004.xml");

    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (app, body) = (Arc::clone(&app), body.clone());
        requests.spawn(async move { app.post_callback(body).await.status() });
    }
    let statuses: Vec<_> = requests.join_all().await;

    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 1);
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE result = 'stored'"),
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE result = 'duplicate'"),
        15
    );
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_403_and_nothing_is_stored() {
    let app = spawn_app().await;
    let body = String::from_utf8(fixture("deactivate_bare.xml"))
        .unwrap()
        .replace("s3cret-rotation-A", "guessed-password");

    let response = app.post_callback(body).await;

    assert_eq!(response.status(), 403);
    for table in [
        "deliveries",
        "raw_bodies",
        "device_outcomes",
        "outcome_identifiers",
        "upload_summaries",
    ] {
        assert_eq!(
            app.count(&format!("SELECT count(*) FROM {table}")),
            0,
            "{table}"
        );
    }
}

#[tokio::test]
async fn missing_credentials_are_refused_when_empty_ones_are_not_configured() {
    let app = spawn_app_with(|settings| {
        settings
            .callback
            .credentials
            .retain(|pair| !pair.username.is_empty())
    })
    .await;

    let response = app.post_callback(fixture("activate_seed004.xml")).await;

    assert_eq!(response.status(), 403);
    assert_eq!(app.count("SELECT count(*) FROM deliveries"), 0);
}

#[tokio::test]
async fn both_passwords_of_a_rotation_are_accepted() {
    let app = spawn_app().await;
    let new_password = String::from_utf8(fixture("deactivate_bare.xml"))
        .unwrap()
        .replace("s3cret-rotation-A", "s3cret-rotation-B");

    assert_eq!(
        app.post_callback(fixture("deactivate_bare.xml"))
            .await
            .status(),
        200
    );
    assert_eq!(app.post_callback(new_password).await.status(), 200);
    // Same message, credentials aside: the second is a re-delivery.
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 1);
}

#[tokio::test]
async fn garbage_without_credentials_is_a_400() {
    let app = spawn_app().await;

    for garbage in [
        &b"hello, is this the callback URL?"[..],
        b"\x00\xff\x13binary",
        b"<html><body>hi</body></html>",
        b"",
    ] {
        let response = app.post_callback(garbage.to_vec()).await;
        assert_eq!(response.status(), 400, "{garbage:?}");
    }
    assert_eq!(app.count("SELECT count(*) FROM deliveries"), 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_with_or_without_content_length() {
    let app = spawn_app_with(|settings| settings.callback.max_body_bytes = 2048).await;
    let large = fixture("activate_seed004.xml"); // 2.5 KB

    let declared = app.post_callback(large.clone()).await;
    let streamed = app.post_chunked(&large).await;

    assert_eq!(declared.status(), 413);
    assert!(streamed.starts_with("HTTP/1.1 413"), "{streamed}");
    assert_eq!(app.count("SELECT count(*) FROM deliveries"), 0);
    assert_eq!(
        app.post_callback(fixture("deactivate_bare.xml"))
            .await
            .status(),
        200,
        "smaller bodies still pass"
    );
}

#[tokio::test]
async fn the_malformed_seed_004_example_is_stored_as_repaired_and_kept_byte_for_byte() {
    let app = spawn_app().await;
    let body = fixture("activate_seed004_malformed.xml");

    let response = app.post_callback(body.clone()).await;

    assert_eq!(response.status(), 200);
    let listing = app.get_json("/api/v1/deliveries").await;
    let item = &listing["items"][0];
    assert_eq!(item["result"], "stored", "{item}");
    assert_eq!(item["kind"], "carrier_service");
    let devices = app
        .get_json(&format!("/api/v1/jobs/{ACTIVATE_REQUEST}/devices"))
        .await;
    assert_eq!(devices["items"][0]["status"], "succeeded", "{devices}");
    assert_eq!(devices["items"][0]["mdn"], "5096306081");
    let raw = app
        .get_api(&format!("/api/v1/deliveries/{}/raw", item["id"]))
        .await;
    let masked = String::from_utf8(body)
        .unwrap()
        .replace(
            "<Password>5096306081</Password>",
            "<Password>********</Password>",
        )
        .into_bytes();
    assert_eq!(
        raw.bytes().await.unwrap().to_vec(),
        masked,
        "stored as received"
    );

    // The well-formed message sent again is a re-delivery of the repaired one.
    assert_eq!(
        app.post_callback(fixture("activate_seed004.xml"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE result = 'duplicate'"),
        1
    );
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 1);
}

#[tokio::test]
async fn an_ambiguous_body_is_quarantined_and_kept_byte_for_byte() {
    let app = spawn_app().await;
    let body = fixture("activate_seed004_ambiguous.xml");

    let response = app.post_callback(body.clone()).await;

    assert_eq!(response.status(), 200);
    let listing = app.get_json("/api/v1/deliveries?result=quarantined").await;
    let item = &listing["items"][0];
    assert_eq!(item["result"], "quarantined");
    assert_eq!(
        item["request_id"], ACTIVATE_REQUEST,
        "the lenient scan files it under its RequestId"
    );
    assert!(
        item["parse_error"].as_str().unwrap().contains("XML"),
        "{item}"
    );
    let raw = app
        .get_api(&format!("/api/v1/deliveries/{}/raw", item["id"]))
        .await;
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["content-type"], "text/xml; charset=utf-8");
    // Byte for byte but for the device credential's password (see `secrets.rs` for the exact bytes).
    let masked = String::from_utf8(body)
        .unwrap()
        .replace(
            "<Password>5096306081</Password>",
            "<Password>********</Password>",
        )
        .into_bytes();
    assert_eq!(raw.bytes().await.unwrap().to_vec(), masked);
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 0);
}

#[tokio::test]
async fn a_quarantined_body_from_a_stranger_is_still_refused() {
    let app = spawn_app_with(|settings| {
        settings
            .callback
            .credentials
            .retain(|pair| !pair.username.is_empty())
    })
    .await;

    let response = app
        .post_callback(fixture("activate_seed004_ambiguous.xml"))
        .await;

    assert_eq!(response.status(), 403);
    assert_eq!(app.count("SELECT count(*) FROM deliveries"), 0);
}

#[tokio::test]
async fn notification_callbacks_are_stored_with_their_kind() {
    let app = spawn_app().await;

    for (fixture_name, kind) in [
        ("sms_mo.xml", "sms_mo"),
        ("promo_change.xml", "promo_change"),
        ("resume_tracking.xml", "resume_tracking"),
        ("deactivate_bare.xml", "carrier_service"),
        ("activate_failed.xml", "carrier_service"),
    ] {
        let response = app.post_callback(fixture(fixture_name)).await;
        assert_eq!(response.status(), 200, "{fixture_name}");
        let stored = app
            .database
            .value("SELECT kind FROM deliveries ORDER BY id DESC LIMIT 1")
            .unwrap();
        assert_eq!(stored, kind, "{fixture_name}");
    }
    let sms_details = app
        .database
        .value("SELECT details FROM deliveries WHERE kind = 'sms_mo'")
        .unwrap();
    assert!(sms_details.contains("TEMP=21.5;BATT=87"), "{sms_details}");
    let comment = app
        .database
        .value("SELECT comment FROM deliveries WHERE kind = 'resume_tracking'")
        .unwrap();
    assert!(comment.starts_with("Device will resume"));
    let fault = app
        .database
        .rows("SELECT status, fault_code FROM device_outcomes WHERE fault_code IS NOT NULL");
    assert_eq!(fault.len(), 1);
    let fault = (fault[0][0].clone().unwrap(), fault[0][1].clone().unwrap());
    assert_eq!(
        fault,
        (
            "failed".to_owned(),
            "CarrierService.INPUT_INVALID.ServicePlan.NotFound".to_owned()
        )
    );
}

#[tokio::test]
async fn every_documented_content_type_and_none_are_accepted() {
    let app = spawn_app().await;
    let body = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();

    for (index, content_type) in [
        "text/xml",
        "application/soap+xml; charset=utf-8",
        "application/xml",
        "",
    ]
    .into_iter()
    .enumerate()
    {
        let distinct = body.replace(
            "<State>Deactive</State>",
            &format!("<State>Deactive-{index}</State>"),
        );
        let mut request = app.client.post(&app.callback_url).body(distinct);
        if !content_type.is_empty() {
            request = request.header("Content-Type", content_type);
        }
        assert_eq!(
            request.send().await.unwrap().status(),
            200,
            "{content_type:?}"
        );
    }
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE result = 'stored'"),
        4
    );
}

#[tokio::test]
async fn any_path_takes_callbacks_and_get_healthz_answers() {
    let app = spawn_app().await;

    let posted = app
        .client
        .post(format!("{}some/registered/path?x=1", app.callback_url))
        .body(fixture("deactivate_bare.xml"))
        .send()
        .await
        .unwrap();
    let health = app
        .client
        .get(format!("{}healthz", app.callback_url))
        .send()
        .await
        .unwrap();
    let other = app
        .client
        .get(format!("{}anything", app.callback_url))
        .send()
        .await
        .unwrap();

    assert_eq!(posted.status(), 200);
    assert_eq!(health.status(), 200);
    assert_eq!(other.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_in_flight_at_shutdown_is_committed_and_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let body = fixture("deactivate_bare.xml");
    let address = app
        .callback_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {address}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (first_half, second_half) = body.split_at(body.len() / 2);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first_half).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let database = app.database.clone();
    let stopping = tokio::spawn(app.stop());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let refused_new = tokio::net::TcpStream::connect(&address).await;
    stream.write_all(second_half).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let _directory = stopping.await.unwrap();

    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        refused_new.is_err(),
        "no new connections are accepted while draining"
    );
    assert_eq!(
        database.count("SELECT count(*) FROM deliveries WHERE result = 'stored'"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_uploads_all_get_through_the_bounded_path() {
    let app = Arc::new(spawn_app().await);
    let mut uploads = tokio::task::JoinSet::new();
    for upload in 0..5 {
        let app = Arc::clone(&app);
        uploads.spawn(async move {
            let lines: Vec<(String, String, String)> = (0..2_000)
                .map(|line| {
                    (
                        format!("8914{upload:06}{line:010}"),
                        format!("35{upload:05}{line:08}"),
                        "Device upload successful".to_owned(),
                    )
                })
                .collect();
            let borrowed: Vec<(&str, &str, &str)> = lines
                .iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
                .collect();
            let body = crate::helpers::upload_callback(
                &format!("large-{upload}"),
                &borrowed,
                (2_000, 0, 2_000, 0),
            );
            assert!(
                body.len() > 256 * 1024,
                "large enough to take the bounded path"
            );
            app.post_callback(body).await.status()
        });
    }
    let statuses = uploads.join_all().await;

    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    assert_eq!(app.count("SELECT count(*) FROM device_outcomes"), 10_000);
    assert_eq!(
        app.count("SELECT count(*) FROM jobs WHERE state = 'completed'"),
        5
    );
}

#[tokio::test]
async fn a_callback_with_an_oversized_request_id_is_stored_and_found_by_it() {
    let app = spawn_app().await;
    // Far past what a database index entry may hold (PostgreSQL refuses B-tree entries over
    // about 2,700 bytes): it must not be refused on every retry.
    // Incompressible, so that the index cannot squeeze it under the limit.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let request_id: String = (0..5_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    let body = crate::helpers::carrier_callback(
        &request_id,
        &[("IMEI", "350000000006666")],
        crate::helpers::CarrierResult::Activated { mdn: "5550006666" },
    );

    let response = app.post_callback(body).await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE result = 'stored'"),
        1
    );
    let job = app.get_json(&format!("/api/v1/jobs/{request_id}")).await;
    assert_eq!(job["devices_reported"], 1, "{job}");
    let listing = app
        .get_json(&format!("/api/v1/deliveries?request_id={request_id}"))
        .await;
    assert_eq!(listing["items"].as_array().map(Vec::len), Some(1));
}

/// The value of an unlabelled series in a `/metrics` text.
fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callbacks_are_committed_several_per_transaction() {
    let app = std::sync::Arc::new(spawn_app().await);
    let mut requests = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let app = std::sync::Arc::clone(&app);
        requests.spawn(async move {
            let mut statuses = Vec::new();
            for index in 0..8 {
                let body = crate::helpers::carrier_callback(
                    &format!("group-{worker}-{index}"),
                    &[("IMEI", &format!("35{worker:05}{index:08}"))],
                    crate::helpers::CarrierResult::Activated {
                        mdn: &format!("5{worker:04}{index:05}"),
                    },
                );
                statuses.push(app.post_callback(body).await.status().as_u16());
            }
            statuses
        });
    }
    let statuses: Vec<u16> = requests.join_all().await.into_iter().flatten().collect();
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");

    let metrics = app.get_api("/metrics").await.text().await.unwrap();
    let deliveries = series(&metrics, "m2m_store_batch_size_sum");
    let commits = series(&metrics, "m2m_store_batch_size_count");
    assert_eq!(deliveries, 256.0, "every delivery committed once");
    assert!(
        commits < deliveries,
        "group commit: {deliveries} deliveries in {commits} transactions"
    );
}
