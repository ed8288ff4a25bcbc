//! Online backup of the SQLite file (SQLite only: on PostgreSQL the command refuses, see
//! `tests/api_postgres/replicas.rs`).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::helpers::{TestApp, Volume, cannot_mount, fixture, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_callbacks_arrive_is_consistent_and_complete() {
    let app = Arc::new(spawn_app().await);
    let template = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let load = {
        let (app, acknowledged, running) = (
            Arc::clone(&app),
            Arc::clone(&acknowledged),
            Arc::clone(&running),
        );
        tokio::spawn(async move {
            let mut index = 0;
            while running.load(Ordering::Relaxed) {
                let body = template.replace(
                    "7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11",
                    &format!("backup-{index}"),
                );
                if app.post_callback(body).await.status() == 200 {
                    acknowledged.fetch_add(1, Ordering::Relaxed);
                }
                index += 1;
            }
        })
    };
    while acknowledged.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = acknowledged.load(Ordering::Relaxed) as i64;
    let target = app.directory.path().join("backup.db");

    let output = Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
        .arg("backup")
        .arg(&target)
        .env_remove("M2M_CONFIG")
        .env("M2M_STORAGE__PATH", &app.database_path)
        .output()
        .unwrap();
    running.store(false, Ordering::Relaxed);
    load.await.unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let copy = rusqlite::Connection::open(&target).unwrap();
    let integrity: String = copy
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let copied: i64 = copy
        .query_row("SELECT count(*) FROM deliveries", [], |row| row.get(0))
        .unwrap();
    assert!(
        copied >= before,
        "the backup holds {copied} deliveries; {before} were acknowledged before it began"
    );
    let refused = Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
        .arg("backup")
        .arg(&target)
        .env("M2M_STORAGE__PATH", &app.database_path)
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "an existing file is not overwritten"
    );
}

/// Runs `m2m-listener backup target` against the app's database.
fn backup(app: &TestApp, target: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
        .arg("backup")
        .arg(target)
        .env_remove("M2M_CONFIG")
        .env("M2M_STORAGE__PATH", &app.database_path)
        .output()
        .unwrap()
}

/// The names in `directory`, sorted.
fn names(directory: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_backup_that_fails_on_a_full_disk_leaves_nothing_behind_and_the_retry_succeeds() {
    let app = spawn_app().await;
    let template = String::from_utf8(fixture("activate_seed004.xml")).unwrap();
    for index in 0..300 {
        let body = template.replace(
            "2c90bd28-ece4-42ef-9f02-7e3bd4fbff33",
            &format!("backup-full-{index}"),
        );
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    let Some(volume) = Volume::mount(&app.directory.path().join("backups"), "256k") else {
        return cannot_mount();
    };
    let target = volume.path.join("m2m-listener.db");

    let failed = backup(&app, &target);
    let left_behind = names(&volume.path);
    volume.remount("size=16m");
    let retried = backup(&app, &target);

    assert!(
        !failed.status.success(),
        "a 256 KiB volume cannot hold the database"
    );
    assert!(
        left_behind.is_empty(),
        "a failed backup leaves nothing: {left_behind:?}"
    );
    assert!(
        retried.status.success(),
        "the retry: {}",
        String::from_utf8_lossy(&retried.stderr)
    );
    assert_eq!(names(&volume.path), ["m2m-listener.db"], "only the backup");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o600,
        "a backup holds callback passwords"
    );
    let copy = rusqlite::Connection::open(&target).unwrap();
    let copied: i64 = copy
        .query_row("SELECT count(*) FROM deliveries", [], |row| row.get(0))
        .unwrap();
    assert_eq!(copied, 300);
}

#[test]
fn maintenance_commands_on_a_database_that_does_not_exist_fail_and_create_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let database = directory.path().join("data").join("m2m-listener.db");
    let target = directory.path().join("backup.db");
    for arguments in [vec!["prune"], vec!["backup", target.to_str().unwrap()]] {
        let output = Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
            .args(&arguments)
            .env_remove("M2M_CONFIG")
            .env("M2M_STORAGE__PATH", &database)
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(1),
            "{arguments:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("failed to open database"),
            "{arguments:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(
        names(directory.path()),
        Vec::<String>::new(),
        "no database and no backup were created"
    );
}

#[tokio::test]
async fn a_backup_copies_the_database_with_the_schema_it_has_and_leaves_it_so() {
    let app = spawn_app().await;
    assert_eq!(
        app.post_callback(fixture("deactivate_bare.xml"))
            .await
            .status(),
        200
    );
    let directory = app.stop().await;
    let database = directory.path().join("m2m-listener.db");
    // The schema of the previous release (version 2): migration 3 undone.
    rusqlite::Connection::open(&database)
        .unwrap()
        .execute_batch(
            "DROP INDEX deliveries_unusual_result;
             CREATE INDEX deliveries_result ON deliveries (result, id);
             CREATE INDEX device_outcomes_delivery ON device_outcomes (delivery_id);
             CREATE INDEX job_device_identifiers_device ON job_device_identifiers (job_device_id);
             PRAGMA user_version = 2;",
        )
        .unwrap();
    let target = directory.path().join("before-the-upgrade.db");

    let output = Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
        .arg("backup")
        .arg(&target)
        .env_remove("M2M_CONFIG")
        .env("M2M_STORAGE__PATH", &database)
        .output()
        .unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let version = |path: &std::path::Path| -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap()
    };
    assert_eq!(
        version(&database),
        2,
        "backup does not migrate the database"
    );
    assert_eq!(version(&target), 2, "the copy holds the schema as it was");
    let copied: i64 = rusqlite::Connection::open(&target)
        .unwrap()
        .query_row("SELECT count(*) FROM deliveries", [], |row| row.get(0))
        .unwrap();
    assert_eq!(copied, 1);
}
