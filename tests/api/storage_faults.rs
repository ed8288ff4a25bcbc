//! Storage that cannot commit: 503 for every callback, never a 200, and recovery without restart.

use crate::helpers::{fixture, spawn_app_with};

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
