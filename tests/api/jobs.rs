//! Jobs, correlation and the query API (spec §5, §6).

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{CarrierResult, carrier_callback, spawn_app, spawn_app_with, upload_callback};

const FAULT_CODE: &str = "CarrierService.INPUT_INVALID.DeviceState.Invalid";

async fn body_of(response: reqwest::Response) -> Value {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

#[tokio::test]
async fn a_registered_job_completes_when_every_device_succeeded() {
    let app = spawn_app().await;
    let registered = app
        .register(json!({"request_id": "job-ok", "operation": "activate", "label": "batch 7",
                         "devices": [{"kind": "IMEI", "id": "350000000000001"}, {"kind": "imei", "id": "350000000000002"}]}))
        .await;
    assert_eq!(registered.status(), 201);
    assert_eq!(body_of(registered).await["state"], "pending");

    for (imei, mdn) in [
        ("350000000000001", "5550000001"),
        ("350000000000002", "5550000002"),
    ] {
        let body = carrier_callback(
            "job-ok",
            &[("IMEI", imei), ("ICCID", &format!("8914{imei}"))],
            CarrierResult::Activated { mdn },
        );
        assert_eq!(app.post_callback(body).await.status(), 200);
    }

    let job = app.get_json("/api/v1/jobs/job-ok").await;
    assert_eq!(job["state"], "completed");
    assert_eq!(job["registered"], true);
    assert_eq!(
        (
            job["expected_devices"].as_i64(),
            job["devices_reported"].as_i64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(
        (
            job["succeeded"].as_i64(),
            job["failed"].as_i64(),
            job["pending"].as_i64()
        ),
        (Some(2), Some(0), Some(0))
    );
    assert_eq!(job["label"], "batch 7");
    let devices = app.get_json("/api/v1/jobs/job-ok/devices").await;
    let items = devices["items"].as_array().unwrap();
    assert_eq!(
        items.len(),
        2,
        "each callback matched its registered device by IMEI: {devices}"
    );
    assert!(
        items.iter().all(|item| item["status"] == "succeeded"
            && item["identifiers"].as_array().unwrap().len() == 3)
    );
    assert!(
        job["completed_at"].is_string()
            && job["first_callback_at"].is_string()
            && job["deadline"].is_string()
    );
    for field in [
        "request_id",
        "registered",
        "operation",
        "account",
        "label",
        "state",
        "expected_devices",
        "devices_reported",
        "succeeded",
        "failed",
        "pending",
        "upload",
        "deliveries",
        "duplicates",
        "registered_at",
        "first_callback_at",
        "last_callback_at",
        "completed_at",
        "deadline",
    ] {
        assert!(job.get(field).is_some(), "job lacks {field}: {job}");
    }
}

#[tokio::test]
async fn one_failed_device_completes_the_job_with_errors_and_the_listing_explains_it() {
    let app = spawn_app().await;
    app.register(
        json!({"request_id": "job-mixed", "operation": "activate", "expected_devices": 2}),
    )
    .await;

    app.post_callback(carrier_callback(
        "job-mixed",
        &[("IMEI", "350000000000011")],
        CarrierResult::Activated { mdn: "5550000011" },
    ))
    .await;
    app.post_callback(carrier_callback(
        "job-mixed",
        &[("IMEI", "350000000000012")],
        CarrierResult::Failed {
            code: FAULT_CODE,
            message: "The device state is not valid for this request.",
        },
    ))
    .await;

    let job = app.get_json("/api/v1/jobs/job-mixed").await;
    assert_eq!(job["state"], "completed_with_errors");
    let failed = app
        .get_json("/api/v1/jobs/job-mixed/devices?status=failed")
        .await;
    let items = failed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0]["identifiers"],
        json!([{"kind": "IMEI", "id": "350000000000012"}])
    );
    assert_eq!(items[0]["fault"]["code"], FAULT_CODE);
    let resolution = items[0]["fault"]["resolution"].as_str().unwrap_or_default();
    assert!(
        !resolution.is_empty(),
        "the catalog's resolution is attached: {}",
        items[0]
    );
    let all = app.get_json("/api/v1/jobs/job-mixed/devices").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let succeeded = &all["items"][0];
    for field in [
        "request_id",
        "operation",
        "identifiers",
        "status",
        "line_status",
        "fault",
        "state",
        "service_plan",
        "ip_address",
        "mdn",
        "received_at",
        "delivery_id",
    ] {
        assert!(
            succeeded.get(field).is_some(),
            "outcome lacks {field}: {succeeded}"
        );
    }
    assert_eq!(succeeded["mdn"], "5550000011");
    let shown = all.to_string();
    assert!(
        !shown.contains("device-secret-"),
        "device credential passwords are redacted: {shown}"
    );
}

#[tokio::test]
async fn a_job_first_seen_in_a_callback_is_adopted_by_a_later_registration() {
    let app = spawn_app().await;
    app.post_callback(carrier_callback(
        "job-late",
        &[("IMEI", "350000000000021")],
        CarrierResult::Activated { mdn: "5550000021" },
    ))
    .await;
    let early = app.get_json("/api/v1/jobs/job-late").await;
    assert_eq!(early["registered"], false);
    assert_eq!(early["operation"], "activate");
    assert_eq!(
        early["state"], "in_progress",
        "expected count unknown until registration"
    );

    let adopted = app
        .register(json!({"request_id": "job-late", "operation": "activate", "account": "0342077109-00001",
                         "devices": [{"kind": "IMEI", "id": "350000000000021"}, {"kind": "IMEI", "id": "350000000000022"}]}))
        .await;

    assert_eq!(adopted.status(), 201);
    let job = body_of(adopted).await;
    assert_eq!(job["registered"], true);
    assert_eq!(job["account"], "0342077109-00001");
    assert_eq!(
        (job["devices_reported"].as_i64(), job["pending"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(job["state"], "in_progress");
    let devices = app.get_json("/api/v1/jobs/job-late/devices").await;
    let statuses: Vec<&str> = devices["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["succeeded", "pending"],
        "the earlier outcome is kept and the registered device matched by IMEI"
    );
}

#[tokio::test]
async fn an_unreported_device_is_pending_then_missing_when_the_job_times_out() {
    let app = spawn_app_with(|settings| settings.jobs.sweep_interval_ms = 50).await;
    app.register(json!({"request_id": "job-slow", "operation": "deactivate", "timeout_s": 1,
                        "devices": [{"kind": "MEID", "id": "A1000000000031"}, {"kind": "MEID", "id": "A1000000000032"}]}))
        .await;
    app.post_callback(carrier_callback(
        "job-slow",
        &[("MEID", "A1000000000031")],
        CarrierResult::Activated { mdn: "5550000031" },
    ))
    .await;
    let before = app
        .get_json("/api/v1/jobs/job-slow/devices?status=pending")
        .await;
    assert_eq!(
        before["items"][0]["identifiers"],
        json!([{"kind": "MEID", "id": "A1000000000032"}])
    );

    let mut state = Value::Null;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        state = app.get_json("/api/v1/jobs/job-slow").await["state"].clone();
        if state == "timed_out" {
            break;
        }
    }

    assert_eq!(state, "timed_out");
    let missing = app
        .get_json("/api/v1/jobs/job-slow/devices?status=missing")
        .await;
    assert_eq!(missing["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        missing["items"][0]["identifiers"][0]["id"],
        "A1000000000032"
    );
    let timed_out = app.get_json("/api/v1/jobs?state=timed_out").await;
    assert_eq!(timed_out["items"][0]["request_id"], "job-slow");
}

#[tokio::test]
async fn a_split_upload_accumulates_lines_and_takes_counts_from_the_last_report() {
    let app = spawn_app().await;
    let ok = "Device upload successful";
    let first = upload_callback(
        "job-upload",
        &[
            ("89140000000000000001", "350000000000041", ok),
            ("89140000000000000002", "350000000000042", ok),
        ],
        (4, 2, 2, 0),
    );
    let second = upload_callback(
        "job-upload",
        &[
            ("89140000000000000003", "350000000000043", ok),
            (
                "89140000000000000004",
                "350000000000044",
                "IMEI 350000000000044 is invalid",
            ),
        ],
        (4, 0, 3, 1),
    );
    let last = upload_callback("job-upload", &[], (4, 0, 3, 1));

    for body in [first, second, last] {
        assert_eq!(app.post_callback(body).await.status(), 200);
    }

    let job = app.get_json("/api/v1/jobs/job-upload").await;
    assert_eq!(job["operation"], "upload_devices");
    assert_eq!(
        job["upload"],
        json!({"total_lines": 4, "pending_lines": 0, "success_lines": 3, "failed_lines": 1, "package_error": null})
    );
    assert_eq!(
        (
            job["expected_devices"].as_i64(),
            job["devices_reported"].as_i64()
        ),
        (Some(4), Some(4))
    );
    assert_eq!(job["state"], "completed_with_errors");
    assert_eq!(job["deliveries"], 3);
    let devices = app.get_json("/api/v1/jobs/job-upload/devices").await;
    assert_eq!(devices["items"].as_array().unwrap().len(), 4);
    let failed = app
        .get_json("/api/v1/jobs/job-upload/devices?status=failed")
        .await;
    assert_eq!(
        failed["items"][0]["line_status"],
        "IMEI 350000000000044 is invalid"
    );
    assert!(
        failed["items"][0]["fault"]["resolution"].is_string(),
        "{}",
        failed["items"][0]
    );
}

#[tokio::test]
async fn a_package_level_upload_error_fails_the_job() {
    let app = spawn_app().await;
    let body = upload_callback("job-package", &[], (0, 0, 0, 0))
        .replace("<Fault xsi:nil=\"true\" />", "<Fault><faultcode>DeviceService.REQUEST_FAILED</faultcode><faultstring>Device SKU is not Certified</faultstring></Fault>");

    app.post_callback(body).await;

    let job = app.get_json("/api/v1/jobs/job-package").await;
    assert_eq!(job["state"], "failed");
    assert_eq!(
        job["upload"]["package_error"],
        "Device SKU is not Certified"
    );
}

#[tokio::test]
async fn a_device_is_found_by_any_of_its_identifiers_and_the_csv_export_parses() {
    let app = spawn_app().await;
    app.register(
        json!({"request_id": "job-lookup", "operation": "activate", "expected_devices": 1}),
    )
    .await;
    app.post_callback(carrier_callback(
        "job-lookup",
        &[
            ("IMEI", "350000000000051"),
            ("ICCID", "89140000000000000051"),
        ],
        CarrierResult::Activated { mdn: "5550000051" },
    ))
    .await;

    let by_imei = app.get_json("/api/v1/devices/IMEI/350000000000051").await;
    let by_iccid = app
        .get_json("/api/v1/devices/iccid/89140000000000000051")
        .await;
    let by_mdn = app.get_json("/api/v1/devices/Mdn/5550000051").await;

    // The same device whichever identifier finds it; only the link to its messages names the
    // identifier asked about (a message is found by the identifiers it names).
    assert_eq!(
        by_iccid["messages"]["href"],
        "/api/v1/devices/ICCID/89140000000000000051/messages"
    );
    let without_link = |view: &Value| {
        let mut view = view.clone();
        view.as_object_mut().map(|view| view.remove("messages"));
        view
    };
    assert_eq!(without_link(&by_imei), without_link(&by_iccid));
    assert_eq!(without_link(&by_imei), without_link(&by_mdn));
    assert_eq!(
        by_imei["identifiers"],
        json!([{"kind": "ICCID", "id": "89140000000000000051"}, {"kind": "IMEI", "id": "350000000000051"}, {"kind": "MDN", "id": "5550000051"}])
    );
    assert_eq!(by_imei["latest"]["status"], "succeeded");
    assert_eq!(by_imei["history"].as_array().unwrap().len(), 1);
    assert_eq!(app.get_api("/api/v1/devices/IMEI/999").await.status(), 404);

    let csv = app
        .get_api("/api/v1/jobs/job-lookup/devices?format=csv")
        .await;
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = csv.text().await.unwrap();
    let rows = parse_csv(&text);
    assert_eq!(rows[0][0..3], ["request_id", "operation", "status"]);
    assert_eq!(rows.len(), 2, "{text}");
    let header = &rows[0];
    let column = |name: &str| header.iter().position(|field| field == name).unwrap();
    assert_eq!(rows[1][column("status")], "succeeded");
    assert_eq!(rows[1][column("mdn")], "5550000051");
    assert!(rows.iter().all(|row| row.len() == header.len()));
}

/// A strict RFC 4180 reader, so the test does not trust the writer's own escaping.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let (mut row, mut field, mut quoted) = (Vec::new(), String::new(), false);
    let mut characters = text.chars().peekable();
    while let Some(character) = characters.next() {
        match (character, quoted) {
            ('"', true) if characters.peek() == Some(&'"') => {
                characters.next();
                field.push('"');
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => row.push(std::mem::take(&mut field)),
            ('\r', false) => {}
            ('\n', false) => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (other, _) => field.push(other),
        }
    }
    assert!(
        !quoted && field.is_empty() && row.is_empty(),
        "CSV ends cleanly"
    );
    rows
}

#[tokio::test]
async fn registration_answers_201_200_409_and_400_with_stable_codes() {
    let app = spawn_app().await;
    let registration = json!({"request_id": "job-reg", "operation": "suspend", "devices": [{"kind": "ICCID", "id": "1"}]});

    assert_eq!(app.register(registration.clone()).await.status(), 201);
    assert_eq!(app.register(registration).await.status(), 200);
    let conflict = app
        .register(json!({"request_id": "job-reg", "operation": "restore"}))
        .await;
    assert_eq!(conflict.status(), 409);
    assert_eq!(body_of(conflict).await["error"]["code"], "JOB_CONFLICT");

    let too_many: Vec<Value> = (0..10_001)
        .map(|index| json!({"kind": "IMEI", "id": index.to_string()}))
        .collect();
    for (body, code) in [
        (
            json!({"request_id": "", "operation": "activate"}),
            "INVALID_REQUEST_ID",
        ),
        (
            json!({"request_id": "x", "operation": "levitate"}),
            "UNKNOWN_OPERATION",
        ),
        (
            json!({"request_id": "x", "operation": "activate", "devices": [{"kind": "SERIAL", "id": "1"}]}),
            "UNKNOWN_DEVICE_KIND",
        ),
        (
            json!({"request_id": "x", "operation": "activate", "devices": too_many}),
            "TOO_MANY_DEVICES",
        ),
        (json!({"request_id": "x"}), "INVALID_JSON"),
    ] {
        let response = app.register(body).await;
        assert_eq!(response.status(), 400, "{code}");
        assert_eq!(body_of(response).await["error"]["code"], code);
    }
    let garbage = app
        .client
        .post(format!("{}/api/v1/jobs", app.api_url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    let unknown = app.get_api("/api/v1/jobs/no-such-job").await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(body_of(unknown).await["error"]["code"], "JOB_NOT_FOUND");
}

#[tokio::test]
async fn job_listing_filters_by_state_operation_and_registration() {
    let app = spawn_app().await;
    app.register(json!({"request_id": "f-1", "operation": "activate", "expected_devices": 1}))
        .await;
    app.register(json!({"request_id": "f-2", "operation": "deactivate", "expected_devices": 1}))
        .await;
    app.post_callback(carrier_callback(
        "f-3",
        &[("IMEI", "350000000000061")],
        CarrierResult::Activated { mdn: "5550000061" },
    ))
    .await;

    let ids = |page: Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|job| job["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids(app.get_json("/api/v1/jobs?operation=deactivate").await),
        ["f-2"]
    );
    assert_eq!(
        ids(app.get_json("/api/v1/jobs?registered=false").await),
        ["f-3"]
    );
    assert_eq!(
        ids(app.get_json("/api/v1/jobs?state=pending").await),
        ["f-2", "f-1"]
    );
    assert_eq!(
        app.get_api("/api/v1/jobs?state=sleeping").await.status(),
        400
    );
}

#[tokio::test]
async fn pagination_walks_2500_jobs_with_no_duplicate_and_no_gap() {
    let app = spawn_app_with(|settings| {
        settings.storage.synchronous = m2m_listener::configuration::Synchronous::Normal
    })
    .await;
    let mut requests = tokio::task::JoinSet::new();
    for chunk in 0..10 {
        let (client, url) = (app.client.clone(), format!("{}/api/v1/jobs", app.api_url));
        requests.spawn(async move {
            for index in chunk * 250..(chunk + 1) * 250 {
                let body =
                    json!({"request_id": format!("page-{index:04}"), "operation": "activate"})
                        .to_string();
                let status = client.post(&url).body(body).send().await.unwrap().status();
                assert_eq!(status, 201);
            }
        });
    }
    requests.join_all().await;

    let mut seen = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/v1/jobs?limit=300&cursor={cursor}"),
            None => "/api/v1/jobs?limit=300".to_owned(),
        };
        let page = app.get_json(&path).await;
        pages += 1;
        for job in page["items"].as_array().unwrap() {
            assert!(
                seen.insert(job["request_id"].as_str().unwrap().to_owned()),
                "duplicate {job}"
            );
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 2500);
    assert_eq!(pages, 9);
    assert!(
        seen.iter()
            .enumerate()
            .all(|(index, id)| *id == format!("page-{index:04}")),
        "no gap"
    );
}

#[tokio::test]
async fn the_error_catalog_explains_codes_in_any_form() {
    let app = spawn_app().await;

    let entry = app
        .get_json("/api/v1/errors/INPUT_INVALID.DeviceState.Invalid")
        .await;
    let prefixed = app
        .get_json("/api/v1/errors/CarrierService.INPUT_INVALID.DeviceState.Invalid")
        .await;
    let unknown = app.get_api("/api/v1/errors/NO.SUCH.CODE").await;

    assert!(
        !entry["message"].as_str().unwrap_or_default().is_empty(),
        "{entry}"
    );
    assert!(
        !entry["resolution"].as_str().unwrap_or_default().is_empty(),
        "{entry}"
    );
    for field in [
        "code",
        "message",
        "cause",
        "resolution",
        "class",
        "retryable",
        "source",
    ] {
        assert!(entry.get(field).is_some(), "{field} missing in {entry}");
    }
    assert_eq!(entry, prefixed);
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn a_device_reported_again_is_counted_once_with_its_latest_status() {
    let app = spawn_app().await;
    let line = |status| {
        upload_callback(
            "job-again",
            &[("89140000000000000091", "350000000000091", status)],
            (1, 1, 0, 0),
        )
    };

    app.post_callback(line("Device upload request submitted"))
        .await;
    let accepted = app.get_json("/api/v1/jobs/job-again").await;
    app.post_callback(line("Device upload successful")).await;
    let succeeded = app.get_json("/api/v1/jobs/job-again").await;

    assert_eq!(
        (
            accepted["devices_reported"].as_i64(),
            accepted["accepted"].as_i64(),
            accepted["succeeded"].as_i64()
        ),
        (Some(1), Some(1), Some(0))
    );
    assert_eq!(
        (
            succeeded["devices_reported"].as_i64(),
            succeeded["accepted"].as_i64(),
            succeeded["succeeded"].as_i64()
        ),
        (Some(1), Some(0), Some(1))
    );
    let devices = app.get_json("/api/v1/jobs/job-again/devices").await;
    assert_eq!(devices["items"].as_array().unwrap().len(), 1);
    assert_eq!(devices["items"][0]["status"], "succeeded");
}
