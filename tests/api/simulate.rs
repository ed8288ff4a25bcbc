//! The platform simulator against real listeners.

use std::time::Duration;

use clap::Parser;
use m2m_listener::client::ApiClient;
use m2m_listener::configuration::Settings;
use m2m_listener::simulate::{self, SimulateOptions};

use crate::helpers::{free_port, listener_process, spawn_app, wait_until_ready};

#[derive(Parser)]
struct Arguments {
    #[command(flatten)]
    options: SimulateOptions,
}

fn options(arguments: &[&str]) -> SimulateOptions {
    Arguments::parse_from(std::iter::once("simulate").chain(arguments.iter().copied())).options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_platform_loses_nothing_and_its_jobs_complete() {
    let app = spawn_app().await;
    let options = options(&[
        "--url",
        &app.callback_url,
        "--register",
        "--jobs",
        "6",
        "--devices-per-job",
        "8",
        "--uploads",
        "2",
        "--upload-lines",
        "120",
        "--lines-per-callback",
        "50",
        "--sms",
        "5",
        "--json-ratio",
        "0.3",
        "--early-redelivery-ratio",
        "0.2",
        "--early-redelivery-delay-ms",
        "1",
        "--concurrency",
        "8",
        "--failure-ratio",
        "0.2",
    ]);
    let api = ApiClient::new(&Settings::default(), Some(&app.api_url)).unwrap();

    let summary = simulate::run(options, "test".into(), "test".into(), Some(api))
        .await
        .unwrap();

    assert_eq!(summary.callbacks, 6 * 8 + 2 * (3 + 1) + 5);
    assert_eq!(summary.acknowledged, summary.callbacks);
    assert_eq!((summary.given_up, summary.lost), (0, Some(0)));
    assert!(summary.early_redeliveries > 0);
    let jobs = app.get_json("/api/v1/jobs?limit=100").await;
    let states: Vec<&str> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 8);
    assert!(
        states
            .iter()
            .all(|state| ["completed", "completed_with_errors", "failed"].contains(state)),
        "every registered job is finished: {states:?}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE kind = 'sms_mo' AND result = 'stored'"),
        5
    );
    assert!(app.count("SELECT count(*) FROM deliveries WHERE form = 'json'") > 0);
    assert!(app.count("SELECT count(*) FROM device_outcomes WHERE status = 'failed'") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_sends_bring_every_callback_in_when_the_listener_is_killed_and_restarted_mid_run() {
    let directory = tempfile::tempdir().unwrap();
    let (callback_port, api_port) = (free_port(), free_port());
    let mut first = listener_process(
        directory.path(),
        callback_port,
        api_port,
        "sim",
        "sim-password",
    );
    wait_until_ready(api_port).await;
    let options = options(&[
        "--url",
        &format!("http://127.0.0.1:{callback_port}/"),
        "--jobs",
        "20",
        "--devices-per-job",
        "10",
        "--uploads",
        "0",
        "--sms",
        "0",
        "--rate",
        "100",
        "--concurrency",
        "8",
        "--retry-interval-ms",
        "1500",
        "--timeout-ms",
        "2000",
        "--max-attempts",
        "4",
    ]);
    let api = ApiClient::new(
        &Settings::default(),
        Some(&format!("http://127.0.0.1:{api_port}")),
    )
    .unwrap();
    let simulation = tokio::spawn(simulate::run(
        options,
        "sim".into(),
        "sim-password".into(),
        Some(api),
    ));

    // Two seconds into a two-second run, kill the listener without warning, and bring it back
    // well within the retry window.
    tokio::time::sleep(Duration::from_millis(800)).await;
    first.kill().unwrap();
    first.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = listener_process(
        directory.path(),
        callback_port,
        api_port,
        "sim",
        "sim-password",
    );
    wait_until_ready(api_port).await;
    let summary = simulation.await.unwrap().unwrap();
    let _ = second.kill();
    let _ = second.wait();

    assert_eq!(summary.callbacks, 200);
    assert!(
        summary.resent > 0,
        "the kill refused some attempts: {summary:?}"
    );
    assert_eq!(summary.given_up, 0, "{summary:?}");
    assert_eq!(summary.acknowledged, 200, "{summary:?}");
    assert_eq!(summary.lost, Some(0), "{summary:?}");
}
