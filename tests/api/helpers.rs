//! Starts the real listener on port 0 with a temporary database, and talks to it over HTTP.
// Shared by two test binaries; each uses only part of it.
#![allow(dead_code)]

use std::path::PathBuf;

use m2m_listener::configuration::{CredentialSettings, Settings};
use m2m_listener::domain::Secret;
use m2m_listener::startup::Application;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Which storage backend the suite runs on: each test binary sets `crate::BACKEND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server the suite uses: `M2M_TEST_POSTGRES_URL`, else this machine's.
pub fn postgres_base_url() -> String {
    std::env::var("M2M_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Runs `work` with a synchronous PostgreSQL client on a thread of its own (the `postgres` crate
/// runs its own runtime, which cannot start inside the test's).
fn with_postgres<T: Send + 'static>(
    url: &str,
    work: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error> + Send + 'static,
) -> T {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|error| {
            panic!(
                "PostgreSQL is not reachable at {url} ({error}): start it, set M2M_TEST_POSTGRES_URL, or run .ci/run, which installs it"
            )
        });
        work(&mut client)
    })
    .join()
    .expect("PostgreSQL thread")
    .expect("PostgreSQL statement")
}

/// A schema of its own for one test (or one listener directory), created empty; returns the URL
/// that selects it. Schemas left by earlier runs whose process is gone are dropped first.
pub fn fresh_postgres_schema(name: &str) -> String {
    static CLEANED: std::sync::Once = std::sync::Once::new();
    let base = postgres_base_url();
    CLEANED.call_once(|| {
        with_postgres(&base, |client| {
            let stale: Vec<String> = client
                .query(
                    "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'm2m\\_t\\_%'",
                    &[],
                )?
                .iter()
                .map(|row| row.get::<_, String>(0))
                .filter(|schema| {
                    let pid = schema.split('_').nth(2).unwrap_or("");
                    !std::path::Path::new(&format!("/proc/{pid}")).exists()
                })
                .collect();
            for schema in stale {
                client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
            }
            Ok(())
        });
    });
    let schema = format!("m2m_t_{}_{name}", std::process::id());
    let create = format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}");
    with_postgres(&base, move |client| client.batch_execute(&create));
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}options=-c%20search_path%3D{schema}")
}

/// A name unique within this test process.
pub fn unique_name() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_string()
}

/// A connection to the test app's SQLite file that waits for the listener's writer.
fn open_sqlite(path: &std::path::Path) -> rusqlite::Connection {
    let connection = rusqlite::Connection::open(path).expect("database opens");
    connection
        .busy_timeout(std::time::Duration::from_secs(5))
        .expect("busy timeout");
    connection
}

/// The database a test app writes to, for checks that look at the stored rows themselves.
#[derive(Clone, Debug)]
pub enum TestDatabase {
    Sqlite(PathBuf),
    Postgres(String),
}

impl TestDatabase {
    /// Every row of `sql` as text (NULL as `None`); the SQL must suit both backends.
    pub fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        match self {
            TestDatabase::Sqlite(path) => {
                let connection = open_sqlite(path);
                let mut statement = connection.prepare(sql).expect(sql);
                let width = statement.column_count();
                statement
                    .query_map([], |row| {
                        (0..width)
                            .map(|index| {
                                Ok(match row.get_ref(index)? {
                                    rusqlite::types::ValueRef::Null => None,
                                    rusqlite::types::ValueRef::Integer(value) => {
                                        Some(value.to_string())
                                    }
                                    rusqlite::types::ValueRef::Real(value) => {
                                        Some(value.to_string())
                                    }
                                    rusqlite::types::ValueRef::Text(text)
                                    | rusqlite::types::ValueRef::Blob(text) => {
                                        Some(String::from_utf8_lossy(text).into_owned())
                                    }
                                })
                            })
                            .collect()
                    })
                    .expect(sql)
                    .collect::<rusqlite::Result<_>>()
                    .expect(sql)
            }
            TestDatabase::Postgres(url) => {
                let sql = sql.to_owned();
                with_postgres(url, move |client| {
                    Ok(client
                        .simple_query(&sql)?
                        .into_iter()
                        .filter_map(|message| match message {
                            postgres::SimpleQueryMessage::Row(row) => Some(
                                (0..row.len())
                                    .map(|index| row.get(index).map(str::to_owned))
                                    .collect(),
                            ),
                            _ => None,
                        })
                        .collect())
                })
            }
        }
    }

    /// The one value `sql` selects, as text.
    pub fn value(&self, sql: &str) -> Option<String> {
        let rows = self.rows(sql);
        assert_eq!(rows.len(), 1, "{sql} selected {} rows", rows.len());
        rows[0][0].clone()
    }

    /// The one number `sql` selects.
    pub fn count(&self, sql: &str) -> i64 {
        self.value(sql)
            .unwrap_or_else(|| panic!("{sql} selected NULL"))
            .parse()
            .expect(sql)
    }

    /// Runs a statement that changes rows.
    pub fn execute(&self, sql: &str) {
        match self {
            TestDatabase::Sqlite(path) => {
                open_sqlite(path).execute_batch(sql).expect(sql);
            }
            TestDatabase::Postgres(url) => {
                let sql = sql.to_owned();
                with_postgres(url, move |client| client.batch_execute(&sql));
            }
        }
    }

    /// Points a listener process (or CLI command) at this database.
    pub fn configure(&self, command: &mut std::process::Command) {
        match self {
            TestDatabase::Sqlite(path) => {
                command.env("M2M_STORAGE__PATH", path);
            }
            TestDatabase::Postgres(url) => {
                command.env("M2M_STORAGE__URL", url);
            }
        }
    }
}

pub struct TestApp {
    pub callback_url: String,
    pub api_url: String,
    pub database_path: PathBuf,
    pub database: TestDatabase,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// Holds the database directory until the test ends.
    pub directory: tempfile::TempDir,
}

/// The pairs every test app accepts: the empty pair of the seed 004 example, the `test` pair of the
/// seed 001 example, and a rotation pair.
pub fn test_credentials() -> Vec<CredentialSettings> {
    [
        ("", "", None),
        ("test", "test", Some("seed-account")),
        ("fleet-ops", "s3cret-rotation-A", None),
        ("fleet-ops", "s3cret-rotation-B", None),
    ]
    .into_iter()
    .map(|(username, password, account)| CredentialSettings {
        username: username.to_owned(),
        password: Secret::new(password),
        account: account.map(str::to_owned),
    })
    .collect()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    let directory = tempfile::tempdir().expect("temporary directory");
    let mut settings = Settings::default();
    settings.callback.listen = "127.0.0.1:0".parse().expect("address");
    settings.api.listen = "127.0.0.1:0".parse().expect("address");
    settings.storage.path = directory.path().join("m2m-listener.db");
    if crate::BACKEND == Backend::Postgres {
        settings.storage.url = Some(Secret::new(fresh_postgres_schema(&unique_name())));
    }
    settings.callback.credentials = test_credentials();
    settings.shutdown.drain_timeout_s = 5;
    customise(&mut settings);
    settings.validate().expect("test settings are valid");

    let application = Application::build(&settings)
        .await
        .expect("application builds");
    let callback_url = format!(
        "http://{}/",
        application.callback_address().expect("callback address")
    );
    let api_url = format!("http://{}", application.api_address().expect("api address"));
    let database = match settings.storage.postgres_url() {
        Some(url) => TestDatabase::Postgres(url.to_owned()),
        None => TestDatabase::Sqlite(
            application
                .database_path()
                .expect("a SQLite file")
                .to_owned(),
        ),
    };
    let database_path = settings.storage.path.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        callback_url,
        api_url,
        database_path,
        database,
        client: reqwest::Client::new(),
        stop: Some(stop),
        server: Some(server),
        directory,
    }
}

/// The schema name `scripts/make-upgrade-fixture.py` dumps PostgreSQL under.
pub const DUMPED_POSTGRES_SCHEMA: &str = "m2m_upgrade_fixture";

/// The app on a copy of a database written elsewhere (by a released binary: see
/// `tests/api/upgrade.rs`): on SQLite the file `seed`, copied into the test directory (0600, as
/// the listener creates its own); on PostgreSQL the plain-SQL dump `seed` of schema
/// [`DUMPED_POSTGRES_SCHEMA`], loaded into the test's fresh schema. The original is not touched.
pub async fn spawn_app_on(
    seed: &std::path::Path,
    customise: impl FnOnce(&mut Settings),
) -> TestApp {
    let seed = seed.to_owned();
    spawn_app_with(move |settings| {
        match settings.storage.postgres_url() {
            Some(url) => load_postgres_dump(url, &seed),
            None => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::copy(&seed, &settings.storage.path)
                    .unwrap_or_else(|error| panic!("{}: {error}", seed.display()));
                std::fs::set_permissions(
                    &settings.storage.path,
                    std::fs::Permissions::from_mode(0o600),
                )
                .expect("database mode");
            }
        }
        customise(settings);
    })
    .await
}

/// Loads a `pg_dump` of [`DUMPED_POSTGRES_SCHEMA`] into the schema that `url`'s search path
/// names: the dump's qualified names become unqualified, and its own schema creation and empty
/// search path (and its comments, which name the schema) are left out, so that everything lands
/// in the test's schema.
fn load_postgres_dump(url: &str, dump: &std::path::Path) {
    let text =
        std::fs::read_to_string(dump).unwrap_or_else(|error| panic!("{}: {error}", dump.display()));
    let create_schema = format!("CREATE SCHEMA {DUMPED_POSTGRES_SCHEMA};");
    let qualified = format!("{DUMPED_POSTGRES_SCHEMA}.");
    let sql: String = text
        .lines()
        .filter(|line| {
            !line.starts_with("--")
                && line.trim() != create_schema
                && !line.starts_with("SELECT pg_catalog.set_config('search_path'")
        })
        .map(|line| format!("{}\n", line.replace(&qualified, "")))
        .collect();
    assert!(
        !sql.contains(DUMPED_POSTGRES_SCHEMA),
        "{}: the dump names its schema where the loader does not expect it",
        dump.display()
    );
    TestDatabase::Postgres(url.to_owned()).execute(&sql);
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// A fixture with its `CallbackCount` set to `count`.
pub fn with_callback_count(name: &str, count: u32) -> Vec<u8> {
    let body = String::from_utf8(fixture(name)).expect("UTF-8 fixture");
    let start = body
        .find("<CallbackCount>")
        .expect("fixture has a CallbackCount")
        + "<CallbackCount>".len();
    let end = start + body[start..].find('<').expect("closing tag");
    format!("{}{count}{}", &body[..start], &body[end..]).into_bytes()
}

impl TestApp {
    pub async fn post_callback(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(&self.callback_url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .body(body)
            .send()
            .await
            .expect("callback request sent")
    }

    pub async fn get_api(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.api_url))
            .send()
            .await
            .expect("API request sent")
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.get_api(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON body")
    }

    /// The one number `sql` selects from the real database.
    pub fn count(&self, sql: &str) -> i64 {
        self.database.count(sql)
    }

    /// Sends `body` with chunked transfer encoding (no Content-Length) over a raw connection and
    /// returns the raw response head.
    pub async fn post_chunked(&self, body: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self
            .callback_url
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let mut request = format!(
            "POST / HTTP/1.1\r\nHost: {address}\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for chunk in body.chunks(500) {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        // The server may answer 413 and close before reading everything: ignore write errors.
        let _ = stream.write_all(&request).await;
        let mut response = vec![0u8; 4096];
        let read = stream.read(&mut response).await.unwrap_or(0);
        String::from_utf8_lossy(&response[..read]).into_owned()
    }

    /// Stops the server the way SIGTERM does, waits for it, and hands back the database directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server stopped cleanly");
        }
        let placeholder = tempfile::tempdir().expect("temporary directory");
        std::mem::replace(&mut self.directory, placeholder)
    }
}

pub use m2m_listener::simulate::payloads::CarrierResult;
use m2m_listener::simulate::payloads::{self, Envelope};

/// A carrier-service callback with the empty credentials of seed 004 (see `simulate::payloads`).
pub fn carrier_callback(
    request_id: &str,
    devices: &[(&str, &str)],
    result: CarrierResult<'_>,
) -> String {
    payloads::carrier_callback(Envelope::default(), request_id, devices, result)
}

/// An upload callback with the `test` credentials of seed 001.
pub fn upload_callback(
    request_id: &str,
    lines: &[payloads::UploadLine<'_>],
    counts: (u32, u32, u32, u32),
) -> String {
    let envelope = Envelope {
        username: "test",
        password: "test",
        ..Envelope::default()
    };
    payloads::upload_callback(envelope, request_id, lines, counts)
}

impl TestApp {
    pub async fn register(&self, registration: serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}/api/v1/jobs", self.api_url))
            .header("Content-Type", "application/json")
            .body(registration.to_string())
            .send()
            .await
            .expect("registration sent")
    }
}

/// A free TCP port on loopback (for listeners run as their own process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary on fixed ports with the database under `directory`, so that it can be killed
/// and restarted on the same data. Accepts `username`/`password`.
pub fn listener_process(
    directory: &std::path::Path,
    callback_port: u16,
    api_port: u16,
    username: &str,
    password: &str,
) -> std::process::Child {
    let (mut command, _) = listener_command(directory, callback_port, api_port, username, password);
    command
        .env("M2M_TELEMETRY__LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("listener starts")
}

/// The command [`listener_process`] runs (default log level, output inherited), and the database
/// it will use.
pub fn listener_command(
    directory: &std::path::Path,
    callback_port: u16,
    api_port: u16,
    username: &str,
    password: &str,
) -> (std::process::Command, TestDatabase) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_m2m-listener"));
    let database = if crate::BACKEND == Backend::Postgres {
        // One schema per directory: a restarted listener finds its data again.
        static SCHEMAS: std::sync::Mutex<Vec<(PathBuf, String)>> =
            std::sync::Mutex::new(Vec::new());
        let mut schemas = SCHEMAS.lock().expect("schemas");
        let url = match schemas.iter().find(|(known, _)| known == directory) {
            Some((_, url)) => url.clone(),
            None => {
                let url = fresh_postgres_schema(&unique_name());
                schemas.push((directory.to_owned(), url.clone()));
                url
            }
        };
        TestDatabase::Postgres(url)
    } else {
        TestDatabase::Sqlite(directory.join("data").join("m2m-listener.db"))
    };
    if let TestDatabase::Postgres(url) = &database {
        command.env("M2M_STORAGE__URL", url);
    }
    command
        .current_dir(directory)
        .env_remove("M2M_CONFIG")
        .env_remove("RUST_LOG")
        .env("M2M_CALLBACK__LISTEN", format!("127.0.0.1:{callback_port}"))
        .env("M2M_API__LISTEN", format!("127.0.0.1:{api_port}"))
        .env("M2M_CALLBACK__CREDENTIALS__0__USERNAME", username)
        .env("M2M_CALLBACK__CREDENTIALS__0__PASSWORD", password);
    (command, database)
}

/// Waits until the listener on `api_port` answers `/readyz` with 200.
pub async fn wait_until_ready(api_port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(response) = reqwest::get(format!("http://127.0.0.1:{api_port}/readyz")).await {
            if response.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the listener did not become ready");
}

/// Waits until the listener `child` on `api_port` is ready, or says that it exited first (on a
/// port another process took between [`free_port`] and its bind, say) or never became ready.
pub async fn ready_or_exited(api_port: u16, child: &mut std::process::Child) -> Result<(), String> {
    // Generous: a busy two-core machine starting a PostgreSQL-backed listener is slow.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the listener exited before it was ready ({status})"
            ));
        }
        if let Ok(response) = reqwest::get(format!("http://127.0.0.1:{api_port}/readyz")).await {
            if response.status() == 200 {
                return Ok(());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    Err("the listener did not become ready".to_owned())
}

/// A tmpfs the test mounts itself, so that "read-only" and "full" are real even for root (who
/// ignores file permissions). Unmounted on drop.
pub struct Volume {
    pub path: std::path::PathBuf,
}

impl Volume {
    /// `None` when this process may not mount (not root, or no CAP_SYS_ADMIN).
    pub fn mount(path: &std::path::Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(path).ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "m2m-test"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Self {
            path: path.to_owned(),
        })
    }

    pub fn remount(&self, options: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.path)
            .status()
            .expect("mount runs");
        assert!(status.success(), "remount {options}");
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

pub fn cannot_mount() {
    // Only a machine that forbids mounting gets here; CI runs as root and mounts.
    eprintln!("this test needs permission to mount a tmpfs (root); not run here");
}

/// What a process writes on `reader` up to the first line containing `marker` (or its end, or
/// 30 seconds).
pub fn read_until(reader: &mut impl std::io::BufRead, marker: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = String::new();
    while std::time::Instant::now() < deadline {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
        if line.contains(marker) {
            break;
        }
    }
    seen
}

/// SIGTERM, as an operator or a service manager stops the listener (it drains, then exits).
pub fn terminate(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// A mobile-originated SMS from `mdn` with the empty credentials of seed 004.
pub fn sms_mo_callback(mdn: &str, message: &str) -> String {
    payloads::sms_mo_callback(Envelope::default(), mdn, message)
}
