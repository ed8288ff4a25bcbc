//! The files the listener writes hold every callback, its raw body and the callback credentials:
//! they are created for the owner only (0600, directories 0700), and an existing database that
//! others can read is reported at start. SQLite only (PostgreSQL keeps nothing on the disk here);
//! the backup file's mode is checked in `backup.rs`.

use crate::helpers::{free_port, spawn_app_with, wait_until_ready};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn beside(database: &Path, suffix: &str) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[tokio::test]
async fn the_database_its_wal_and_shm_the_generated_credentials_and_the_data_directory_are_private()
{
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("new").join("data");
    let database = data.join("m2m-listener.db");
    let app = spawn_app_with(|settings| {
        settings.storage.path = database.clone();
        // None configured: a pair is generated and saved beside the database.
        settings.callback.credentials.clear();
    })
    .await;
    // A probe commit: the WAL and its index exist from here on.
    assert_eq!(app.get_api("/readyz").await.status(), 200);

    let files = [
        database.clone(),
        beside(&database, "-wal"),
        beside(&database, "-shm"),
        data.join("callback-credentials.toml"),
    ];
    let modes: Vec<(PathBuf, u32)> = files
        .iter()
        .map(|file| (file.clone(), mode(file)))
        .collect();
    let directories = [data.clone(), directory.path().join("new")];
    let directory_modes: Vec<(PathBuf, u32)> = directories
        .iter()
        .map(|directory| (directory.clone(), mode(directory)))
        .collect();
    app.stop().await;

    for (file, mode) in modes {
        assert_eq!(mode, 0o600, "{} is {mode:o}", file.display());
    }
    for (directory, mode) in directory_modes {
        assert_eq!(mode, 0o700, "{} is {mode:o}", directory.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_database_readable_by_others_is_reported_at_start_and_left_as_it_is() {
    let directory = tempfile::tempdir().unwrap();
    let database = directory.path().join("shared.db");
    rusqlite::Connection::open(&database)
        .unwrap()
        .execute_batch("CREATE TABLE operator_note (text TEXT)")
        .unwrap();
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (callback_port, api_port) = (free_port(), free_port());
    let output = directory.path().join("listener.out");

    let mut listener = std::process::Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
        .current_dir(directory.path())
        .env_remove("M2M_CONFIG")
        .env("M2M_STORAGE__PATH", &database)
        .env("M2M_CALLBACK__LISTEN", format!("127.0.0.1:{callback_port}"))
        .env("M2M_API__LISTEN", format!("127.0.0.1:{api_port}"))
        .env("M2M_CALLBACK__CREDENTIALS__0__USERNAME", "fleet-ops")
        .env(
            "M2M_CALLBACK__CREDENTIALS__0__PASSWORD",
            "s3cret-rotation-A",
        )
        .env("M2M_TELEMETRY__LEVEL", "warn")
        .stdout(std::fs::File::create(&output).unwrap())
        .stderr(std::fs::File::options().append(true).open(&output).unwrap())
        .spawn()
        .expect("listener starts");
    wait_until_ready(api_port).await;
    // SIGTERM, so that the log is complete.
    let _ = std::process::Command::new("kill")
        .arg(listener.id().to_string())
        .status();
    let stopped = tokio::task::spawn_blocking(move || listener.wait())
        .await
        .unwrap();
    let log = std::fs::read_to_string(&output).unwrap();

    assert!(stopped.is_ok());
    assert!(
        log.contains("readable by other users") && log.contains("shared.db"),
        "{log}"
    );
    assert!(log.contains("644"), "the warning gives the mode: {log}");
    assert_eq!(
        mode(&database),
        0o644,
        "an operator's permissions are not changed behind their back"
    );
}
