//! What a store failure answers and logs, on either backend: a fault a retry would meet again is
//! a 500 on the API (an unavailable store stays a 503, see `storage_faults.rs` and
//! `tests/api_postgres/replicas.rs`), a callback the store refuses is a 503, and either failure is
//! logged once, with its cause, by the edge that answered it.

use std::io::Read;
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use crate::helpers::{
    TestDatabase, fixture, free_port, listener_command, spawn_app, wait_until_ready,
};

#[tokio::test]
async fn a_job_row_the_listener_cannot_read_answers_500_with_a_stable_code_not_503() {
    let app = spawn_app().await;
    let registered = app
        .register(json!({"request_id": "unreadable", "operation": "activate", "label": "batch 9"}))
        .await;
    assert_eq!(registered.status(), 201);
    // A row the mapping cannot read: a label that is not text (a defect of the data or of the
    // code, which no retry repairs). SQLite keeps a blob as a blob in a text column.
    match &app.database {
        TestDatabase::Sqlite(_) => app
            .database
            .execute("UPDATE jobs SET label = x'ff' WHERE request_id = 'unreadable'"),
        TestDatabase::Postgres(_) => app
            .database
            .execute("ALTER TABLE jobs ALTER COLUMN label TYPE integer USING 42"),
    }

    for path in ["/api/v1/jobs/unreadable", "/api/v1/jobs"] {
        let response = app.get_api(path).await;
        let status = response.status();
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(status, 500, "{path}: {body}");
        assert_eq!(body["error"]["code"], "INTERNAL", "{path}: {body}");
    }
    assert_eq!(
        app.get_api("/readyz").await.status(),
        200,
        "one unreadable row does not make the store unavailable"
    );
}

/// Stops a listener process with SIGTERM and returns everything it logged on stdout.
fn stop_and_collect_log(mut child: Child) -> String {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let mut log = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut log).expect("log is text");
    }
    let _ = child.wait();
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_the_store_refuses_gets_503_and_its_failure_is_logged_once_with_its_cause() {
    let directory = tempfile::tempdir().unwrap();
    let (callback_port, api_port) = (free_port(), free_port());
    // The fixture carries this pair.
    let (mut command, database) = listener_command(
        directory.path(),
        callback_port,
        api_port,
        "fleet-ops",
        "s3cret-rotation-A",
    );
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("listener starts");
    wait_until_ready(api_port).await;
    // Every insert of a delivery is refused with this message, as a defect would refuse it.
    let marker = "refused-for-the-log-test";
    match &database {
        TestDatabase::Sqlite(_) => database.execute(&format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON deliveries BEGIN SELECT RAISE(ABORT, '{marker}'); END;"
        )),
        TestDatabase::Postgres(_) => database.execute(&format!(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION '{marker}'; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON deliveries FOR EACH ROW EXECUTE FUNCTION refuse();"
        )),
    }
    let body = String::from_utf8(fixture("deactivate_bare.xml"))
        .unwrap()
        .replace("7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11", "logged-once");
    let refused = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{callback_port}/"))
        .body(body)
        .send()
        .await
        .unwrap()
        .status();
    let log = stop_and_collect_log(child);

    assert_eq!(refused, 503, "the platform retries");
    let mentions: Vec<&str> = log.lines().filter(|line| line.contains(marker)).collect();
    assert_eq!(mentions.len(), 1, "logged once: {mentions:#?}");
    assert!(
        mentions[0].contains("callback not stored") && mentions[0].contains("logged-once"),
        "by the callback edge, with the request id: {}",
        mentions[0]
    );
}
