//! Storage that cannot commit: 503 for every callback, never a 200, and recovery without restart.

use crate::helpers::{Volume, cannot_mount, fixture, spawn_app_with};

#[tokio::test]
async fn a_locked_database_answers_503_and_recovers_when_released() {
    let app = spawn_app_with(|settings| settings.storage.busy_timeout_ms = 200).await;
    let template = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();
    let body = |tag: &str| template.replace("7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11", tag);

    // Another process holds the write lock, as a backup tool or a stuck script might.
    let blocker = rusqlite::Connection::open(&app.database_path).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    for attempt in 0..3 {
        let response = app.post_callback(body(&format!("locked-{attempt}"))).await;
        assert_eq!(response.status(), 503, "attempt {attempt}");
    }
    let readiness = app.get_api("/readyz").await;
    assert_eq!(readiness.status(), 503);
    // The API's writes meet the same lock: unavailable (retry later), not a fault of the request.
    let registration = app
        .register(serde_json::json!({"request_id": "locked-job", "operation": "activate"}))
        .await;
    assert_eq!(registration.status(), 503);
    let refusal: serde_json::Value =
        serde_json::from_slice(&registration.bytes().await.unwrap()).unwrap();
    assert_eq!(refusal["error"]["code"], "STORAGE_UNAVAILABLE", "{refusal}");

    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);

    let response = app.post_callback(body("locked-0")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.get_api("/readyz").await.status(), 200);
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries"),
        1,
        "nothing refused with 503 was stored"
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM deliveries WHERE request_id = 'locked-0' AND result = 'stored'"
        ),
        1
    );
}

#[tokio::test]
async fn a_database_that_stops_accepting_writes_answers_503_and_recovers() {
    let app = spawn_app_with(|settings| settings.storage.busy_timeout_ms = 200).await;
    let template = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();
    let body = |tag: &str| template.replace("7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11", tag);
    assert_eq!(app.post_callback(body("before")).await.status(), 200);

    // The database refuses writes until the trigger is dropped, whatever the file permissions (the
    // tests may run as root, who ignores them).
    let admin = rusqlite::Connection::open(&app.database_path).unwrap();
    admin
        .execute_batch(
            "CREATE TRIGGER refuse_writes BEFORE INSERT ON deliveries
             BEGIN SELECT RAISE(ABORT, 'database is read-only for maintenance'); END;",
        )
        .unwrap();
    let refused = app.post_callback(body("during")).await;
    admin.execute_batch("DROP TRIGGER refuse_writes").unwrap();
    let accepted = app.post_callback(body("during")).await;

    assert_eq!(refused.status(), 503);
    assert_eq!(accepted.status(), 200);
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE request_id = 'during'"),
        1
    );
}

#[tokio::test]
async fn a_read_only_database_answers_503_until_it_is_writable_again() {
    let directory = tempfile::tempdir().unwrap();
    let Some(volume) = Volume::mount(&directory.path().join("volume"), "16m") else {
        return cannot_mount();
    };
    let database = volume.path.join("m2m-listener.db");
    let template = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();
    let body = |tag: &str| template.replace("7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11", tag);
    let first = spawn_app_with(|settings| settings.storage.path = database.clone()).await;
    assert_eq!(first.post_callback(body("before")).await.status(), 200);
    first.stop().await;

    volume.remount("ro");
    let app = spawn_app_with(|settings| {
        settings.storage.path = database.clone();
        settings.storage.busy_timeout_ms = 200;
    })
    .await;
    for attempt in 0..2 {
        assert_eq!(
            app.post_callback(body("while-read-only")).await.status(),
            503,
            "attempt {attempt}"
        );
    }
    assert_eq!(app.get_api("/readyz").await.status(), 503);

    volume.remount("rw");
    assert_eq!(
        app.post_callback(body("while-read-only")).await.status(),
        200
    );
    assert_eq!(app.get_api("/readyz").await.status(), 200);
    let stored = app.count("SELECT count(*) FROM deliveries WHERE result = 'stored'");
    app.stop().await;
    assert_eq!(stored, 2);
}

#[tokio::test]
async fn a_full_disk_answers_503_never_200_and_recovers_when_space_returns() {
    let directory = tempfile::tempdir().unwrap();
    let Some(volume) = Volume::mount(&directory.path().join("volume"), "1m") else {
        return cannot_mount();
    };
    let database = volume.path.join("m2m-listener.db");
    let app = spawn_app_with(|settings| settings.storage.path = database.clone()).await;
    let template = String::from_utf8(fixture("activate_seed004.xml")).unwrap();
    let body = |index: usize| {
        template.replace(
            "2c90bd28-ece4-42ef-9f02-7e3bd4fbff33",
            &format!("fill-{index}"),
        )
    };

    let mut acknowledged = Vec::new();
    let mut refused = None;
    for index in 0..2000 {
        match app.post_callback(body(index)).await.status().as_u16() {
            200 => acknowledged.push(index),
            503 => {
                refused = Some(index);
                break;
            }
            other => panic!("callback {index} answered {other}"),
        }
    }
    let refused = refused.expect("a 1 MiB volume fills up");
    assert_eq!(
        app.get_api("/readyz").await.status(),
        503,
        "not ready while full"
    );

    volume.remount("size=16m");
    assert_eq!(
        app.post_callback(body(refused)).await.status(),
        200,
        "the refused callback is taken on retry"
    );
    assert_eq!(app.get_api("/readyz").await.status(), 200);
    let database = rusqlite::Connection::open(&app.database_path).unwrap();
    for index in acknowledged.iter().chain([&refused]) {
        let stored: i64 = database
            .query_row(
                "SELECT count(*) FROM deliveries WHERE request_id = ?1",
                [format!("fill-{index}")],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(stored, 1, "acknowledged callback {index} is missing");
    }
    let integrity: String = database
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    drop(database);
    app.stop().await;
}

#[tokio::test]
async fn committed_pages_are_checkpointed_into_the_database_file_off_the_writer() {
    let app = spawn_app_with(|_| {}).await;
    let initial = std::fs::metadata(&app.database_path).unwrap().len();
    let template = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();
    for index in 0..200 {
        let body = template.replace(
            "7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11",
            &format!("checkpoint-{index}"),
        );
        assert_eq!(app.post_callback(body).await.status(), 200);
    }

    // Far below the writer's own auto-checkpoint threshold: only the checkpointer moves pages.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut size = initial;
    while std::time::Instant::now() < deadline && size <= initial + 100 * 1024 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        size = std::fs::metadata(&app.database_path).unwrap().len();
    }

    assert!(
        size > initial + 100 * 1024,
        "the database file stayed at {size} bytes (from {initial})"
    );
}

/// Kills a listener process when the test ends, whatever happens.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the listener on `api_port` answers at all (`/healthz`), ready or not.
async fn wait_until_serving(api_port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(response) = reqwest::get(format!("http://127.0.0.1:{api_port}/healthz")).await {
            if response.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the listener did not start serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_restarted_on_a_read_only_volume_after_a_kill_recovers_when_it_is_writable() {
    use crate::helpers::{free_port, listener_process, wait_until_ready};
    let directory = tempfile::tempdir().unwrap();
    let Some(volume) = Volume::mount(&directory.path().join("volume"), "32m") else {
        return cannot_mount();
    };
    let database = volume.path.join("data").join("m2m-listener.db");
    let (callback_port, api_port) = (free_port(), free_port());
    let (username, password) = ("fleet-ops", "s3cret-rotation-A");
    // The fixture carries this pair.
    let template = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();
    let body = |tag: &str| template.replace("7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11", tag);
    let client = reqwest::Client::new();
    let callback_url = format!("http://127.0.0.1:{callback_port}/");
    let api = |path: &str| format!("http://127.0.0.1:{api_port}{path}");

    let mut killed = listener_process(&volume.path, callback_port, api_port, username, password);
    wait_until_ready(api_port).await;
    for index in 0..20 {
        let response = client
            .post(&callback_url)
            .body(body(&format!("before-kill-{index}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "callback {index} before the kill");
    }
    killed.kill().unwrap(); // SIGKILL
    killed.wait().unwrap();
    let leftovers = ["-wal", "-shm"].map(|suffix| {
        let mut name = database.clone().into_os_string();
        name.push(suffix);
        std::path::PathBuf::from(name)
    });
    for file in &leftovers {
        assert!(
            file.exists(),
            "{} is left behind by the kill",
            file.display()
        );
    }

    volume.remount("ro");
    let restarted = KillOnDrop(listener_process(
        &volume.path,
        callback_port,
        api_port,
        username,
        password,
    ));
    wait_until_serving(api_port).await;
    let refused = client
        .post(&callback_url)
        .body(body("while-read-only"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        503,
        "nothing can be committed on a read-only volume"
    );
    // One read through the API while the volume is read-only.
    let read = client.get(api("/api/v1/deliveries")).send().await.unwrap();
    assert_ne!(
        read.status(),
        500,
        "a read on a read-only volume is not a defect"
    );

    volume.remount("rw");
    let accepted = client
        .post(&callback_url)
        .body(body("while-read-only"))
        .send()
        .await
        .unwrap();
    let accepted_status = accepted.status();
    let accepted_body = accepted.text().await.unwrap();
    let readiness = client.get(api("/readyz")).send().await.unwrap();
    let readiness_status = readiness.status();
    let readiness_body = readiness.text().await.unwrap();
    let listed = client
        .get(api("/api/v1/deliveries?request_id=while-read-only"))
        .send()
        .await
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.bytes().await.unwrap()).unwrap();
    drop(restarted);

    assert_eq!(
        accepted_status, 200,
        "a callback once the volume is writable again: {accepted_body}"
    );
    assert_eq!(readiness_status, 200, "/readyz: {readiness_body}");
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let connection = rusqlite::Connection::open(&database).unwrap();
    let stored: i64 = connection
        .query_row(
            "SELECT count(*) FROM deliveries WHERE result = 'stored'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(stored, 21, "every acknowledged callback is in the database");
}
