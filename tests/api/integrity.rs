//! The SQLite writer declares its tables' references but does not have SQLite check them (see
//! `storage::sqlite::connection::open_writer`): this holds it to what it declares, after every
//! kind of write, and holds each job's counters to what its devices say.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{
    CarrierResult, TestApp, carrier_callback, fixture, spawn_app_with, upload_callback,
    with_callback_count,
};

/// Each job's counters, recounted from its devices: (request_id, stored, recounted).
fn counters_against_devices(app: &TestApp) -> Vec<Vec<Option<String>>> {
    app.database.rows(
        "SELECT j.request_id,
                j.devices_reported || '/' || j.succeeded || '/' || j.failed || '/' || j.accepted,
                (SELECT count(status) || '/' || count(CASE status WHEN 'succeeded' THEN 1 END) || '/'
                        || count(CASE status WHEN 'failed' THEN 1 END) || '/'
                        || count(CASE status WHEN 'accepted' THEN 1 END)
                   FROM job_devices d WHERE d.job_id = j.id)
           FROM jobs j ORDER BY j.request_id",
    )
}

#[tokio::test]
async fn every_stored_reference_points_at_a_row_after_every_kind_of_write() {
    let app = spawn_app_with(|settings| {
        settings.storage.retention_days = 1;
        settings.storage.prune_interval_s = 1;
        settings.jobs.sweep_interval_ms = 200;
    })
    .await;
    // A registered job, reported by registered and unregistered devices; one that times out.
    app.register(json!({"request_id": "registered", "operation": "activate",
        "devices": [{"kind": "iccid", "id": "8900000000000000001"}, {"kind": "imei", "id": "350000000000002"}]}))
        .await;
    app.register(
        json!({"request_id": "times-out", "operation": "deactivate", "timeout_s": 1,
        "devices": [{"kind": "iccid", "id": "8900000000000000009"}]}),
    )
    .await;
    let mut bodies = vec![
        carrier_callback(
            "registered",
            &[
                ("ICCID", "8900000000000000001"),
                ("IMEI", "350000000000001"),
            ],
            CarrierResult::Activated { mdn: "5550000001" },
        ),
        carrier_callback(
            "registered",
            &[("ICCID", "8900000000000000003")],
            CarrierResult::Failed {
                code: "CarrierService.REQUEST_FAILED.DeviceAlreadyActive",
                message: "already active",
            },
        ),
        upload_callback(
            "upload",
            &[
                ("8900000000000000101", "350000000000101", "Success"),
                ("8900000000000000102", "350000000000102", "Failed"),
            ],
            (2, 0, 1, 1),
        ),
    ];
    // Jobs created by their callbacks, several callbacks per job and per device, sent at once
    // so that batches create jobs and report the same device twice.
    for job in 0..40 {
        for device in 0..3 {
            for result in [
                CarrierResult::Failed {
                    code: "CarrierService.REQUEST_FAILED.X",
                    message: "no",
                },
                CarrierResult::Activated { mdn: "5550000002" },
            ] {
                bodies.push(carrier_callback(
                    &format!("job-{job}"),
                    &[
                        ("ICCID", &format!("89{job:09}{device:08}")),
                        ("IMEI", &format!("35{job:06}{device:07}")),
                    ],
                    result,
                ));
            }
        }
    }
    let app = Arc::new(app);
    let mut requests = tokio::task::JoinSet::new();
    for body in bodies.clone() {
        let app = Arc::clone(&app);
        requests.spawn(async move { app.post_callback(body).await.status() });
    }
    let statuses = requests.join_all().await;
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    // Re-deliveries, device messages (an MO SMS, a NIDD uplink, each delivered twice) and a
    // body that cannot be parsed.
    for body in [
        bodies[0].clone().into_bytes(),
        fixture("sms_mo.xml"),
        with_callback_count("sms_mo.xml", 2),
        fixture("json_nidd_uplink.json"),
        String::from_utf8(fixture("json_nidd_uplink.json"))
            .expect("UTF-8 fixture")
            .replace("\"callbackCount\": 1", "\"callbackCount\": 2")
            .into_bytes(),
        fixture("activate_seed004_malformed.xml"),
    ] {
        assert_eq!(app.post_callback(body).await.status(), 200);
    }

    // The sweep times a job out, and the prune removes old raw bodies.
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.count("SELECT count(*) FROM jobs WHERE state = 'timed_out'") == 0 {
        assert!(Instant::now() < deadline, "the sweep never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.database
        .execute("UPDATE deliveries SET received_at = '2020-01-01T00:00:00.000000Z'");
    app.database
        .execute("UPDATE jobs SET state = 'completed' WHERE state IN ('pending', 'in_progress')");
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.count("SELECT count(*) FROM raw_bodies") > 1 {
        assert!(Instant::now() < deadline, "the prune never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Messages are facts: the prune of raw bodies leaves them (and their identifiers) as they were.
    assert_eq!(app.count("SELECT count(*) FROM device_messages"), 2);
    assert_eq!(app.count("SELECT count(*) FROM message_identifiers"), 2 + 6);
    let violations = app.database.rows("PRAGMA foreign_key_check");
    assert!(violations.is_empty(), "dangling references: {violations:?}");
    assert_eq!(
        app.database.value("PRAGMA integrity_check").as_deref(),
        Some("ok")
    );
    for row in counters_against_devices(&app) {
        assert_eq!(
            row[1], row[2],
            "job {:?}: stored counters vs its devices",
            row[0]
        );
    }
    let created = app.count("SELECT count(*) FROM jobs WHERE request_id LIKE 'job-%'");
    assert_eq!(created, 40);
    // Each job created by its callbacks has its three devices, each reported once per callback.
    assert_eq!(
        app.count(
            "SELECT count(*) FROM jobs WHERE request_id LIKE 'job-%' AND devices_reported = 3
               AND deliveries = 6"
        ),
        40
    );
}
