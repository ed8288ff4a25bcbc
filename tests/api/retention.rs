//! Retention (raw bodies pruned, what must stay stays) and online backup.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{
    CarrierResult, TestApp, carrier_callback, fixture, spawn_app, spawn_app_with,
};

/// Pretends every delivery so far arrived in 2020.
fn age_everything(app: &TestApp) {
    app.database
        .execute("UPDATE deliveries SET received_at = '2020-01-01T00:00:00.000000Z'");
}

async fn raw_status(app: &TestApp, request_id: &str) -> u16 {
    let listing = app
        .get_json(&format!("/api/v1/deliveries?request_id={request_id}"))
        .await;
    let id = &listing["items"][0]["id"];
    app.get_api(&format!("/api/v1/deliveries/{id}/raw"))
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn old_raw_bodies_are_pruned_except_quarantined_ones_and_those_of_unfinished_jobs() {
    let app = spawn_app_with(|settings| {
        settings.storage.retention_days = 1;
        settings.storage.prune_interval_s = 1;
    })
    .await;
    app.register(json!({"request_id": "done-job", "operation": "activate", "expected_devices": 1}))
        .await;
    app.register(json!({"request_id": "open-job", "operation": "activate", "expected_devices": 2}))
        .await;
    app.post_callback(carrier_callback(
        "done-job",
        &[("IMEI", "350000000000101")],
        CarrierResult::Activated { mdn: "5550000101" },
    ))
    .await;
    app.post_callback(carrier_callback(
        "open-job",
        &[("IMEI", "350000000000102")],
        CarrierResult::Activated { mdn: "5550000102" },
    ))
    .await;
    app.post_callback(fixture("activate_seed004_ambiguous.xml"))
        .await;
    age_everything(&app);
    app.post_callback(carrier_callback(
        "new-job",
        &[("IMEI", "350000000000103")],
        CarrierResult::Activated { mdn: "5550000103" },
    ))
    .await;

    let deadline = Instant::now() + Duration::from_secs(15);
    while raw_status(&app, "done-job").await != 410 {
        assert!(
            Instant::now() < deadline,
            "the old body of a finished job was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert_eq!(
        raw_status(&app, "open-job").await,
        200,
        "unfinished jobs keep their bodies"
    );
    assert_eq!(
        raw_status(&app, "2c90bd28-ece4-42ef-9f02-7e3bd4fbff33").await,
        200,
        "quarantined bodies are kept"
    );
    assert_eq!(
        raw_status(&app, "new-job").await,
        200,
        "recent bodies are kept"
    );
    let outcomes = app.get_json("/api/v1/jobs/done-job/devices").await;
    assert_eq!(
        outcomes["items"][0]["status"], "succeeded",
        "outcomes are never pruned"
    );
}

#[tokio::test]
async fn the_prune_command_prunes_what_is_due() {
    let app = spawn_app().await;
    for index in 0..3 {
        app.register(json!({"request_id": format!("prune-{index}"), "operation": "activate", "expected_devices": 1})).await;
        app.post_callback(carrier_callback(
            &format!("prune-{index}"),
            &[("IMEI", "350000000000111")],
            CarrierResult::Failed {
                code: "X",
                message: "y",
            },
        ))
        .await;
    }
    age_everything(&app);

    let mut prune = Command::new(env!("CARGO_BIN_EXE_m2m-listener"));
    prune.arg("prune").env_remove("M2M_CONFIG");
    app.database.configure(&mut prune);
    let output = prune.output().unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("pruned 3 raw bodies"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(raw_status(&app, "prune-0").await, 410);
}
