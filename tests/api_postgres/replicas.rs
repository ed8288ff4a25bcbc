//! What only PostgreSQL can show: several listener processes on one database, and a database that
//! goes away and comes back.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use m2m_listener::simulate::payloads::{self, CarrierResult, Envelope};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::helpers::{
    TestDatabase, free_port, fresh_postgres_schema, postgres_base_url, spawn_app_with, unique_name,
    wait_until_ready,
};

const USERNAME: &str = "replica";
const PASSWORD: &str = "replica-password";

/// One listener process of a replica set.
struct Replica {
    child: Child,
    callback_port: u16,
    api_port: u16,
    _directory: tempfile::TempDir,
}

impl Replica {
    /// Starts the real binary on `url`; does not wait for it to be ready.
    fn start(url: &str, settings: &[(&str, &str)]) -> Self {
        let directory = tempfile::tempdir().unwrap();
        let (callback_port, api_port) = (free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_m2m-listener"));
        command
            .current_dir(directory.path())
            .env_remove("M2M_CONFIG")
            .env("M2M_STORAGE__URL", url)
            .env("M2M_CALLBACK__LISTEN", format!("127.0.0.1:{callback_port}"))
            .env("M2M_API__LISTEN", format!("127.0.0.1:{api_port}"))
            .env("M2M_CALLBACK__CREDENTIALS__0__USERNAME", USERNAME)
            .env("M2M_CALLBACK__CREDENTIALS__0__PASSWORD", PASSWORD)
            .env("M2M_TELEMETRY__LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, value) in settings {
            command.env(key, value);
        }
        Self {
            child: command.spawn().expect("listener starts"),
            callback_port,
            api_port,
            _directory: directory,
        }
    }

    fn callback_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.callback_port)
    }

    fn api(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api_port)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three replicas on a fresh schema, started together, all ready.
async fn three_replicas(settings: &[(&str, &str)]) -> (Vec<Replica>, TestDatabase) {
    let url = fresh_postgres_schema(&unique_name());
    let replicas: Vec<Replica> = (0..3).map(|_| Replica::start(&url, settings)).collect();
    for replica in &replicas {
        wait_until_ready(replica.api_port).await;
    }
    (replicas, TestDatabase::Postgres(url))
}

fn callback(request_id: &str, imei: &str, count: u32) -> String {
    let envelope = Envelope {
        username: USERNAME,
        password: PASSWORD,
        callback_count: count,
        ..Envelope::default()
    };
    // Each device gets its own MDN: a shared one would make them one device.
    let mdn = &imei[imei.len() - 10..];
    payloads::carrier_callback(
        envelope,
        request_id,
        &[("IMEI", imei)],
        CarrierResult::Activated { mdn },
    )
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> Option<u16> {
    client
        .post(url)
        .header("Content-Type", "text/xml")
        .body(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()
        .map(|response| response.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_callbacks_posted_to_three_replicas_at_once_are_stored_once_and_jobs_stay_consistent()
 {
    let (replicas, database) = three_replicas(&[]).await;
    // Started together, the replicas applied each migration once.
    assert_eq!(
        database.count("SELECT count(*) FROM schema_migrations"),
        database.count("SELECT max(version) FROM schema_migrations")
    );
    let client = reqwest::Client::new();
    let (jobs, devices) = (10, 30);
    for job in 0..jobs {
        let registration = json!({
            "request_id": format!("fan-{job}"),
            "operation": "activate",
            "devices": (0..devices)
                .map(|device| json!({"kind": "IMEI", "id": format!("35{job:03}{device:010}")}))
                .collect::<Vec<_>>(),
        });
        // Registrations go to any replica, too.
        let response = client
            .post(replicas[job % 3].api("/api/v1/jobs"))
            .header("Content-Type", "application/json")
            .body(registration.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let urls: Arc<Vec<String>> = Arc::new(replicas.iter().map(Replica::callback_url).collect());
    let limit = Arc::new(Semaphore::new(24));
    let mut tasks = Vec::new();
    for job in 0..jobs {
        for device in 0..devices {
            let (client, urls, limit) = (client.clone(), Arc::clone(&urls), Arc::clone(&limit));
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let request_id = format!("fan-{job}");
                let imei = format!("35{job:03}{device:010}");
                // The same message at all three replicas at once, as re-deliveries 1, 2 and 3.
                let answers = tokio::join!(
                    post(&client, &urls[0], callback(&request_id, &imei, 1)),
                    post(&client, &urls[1], callback(&request_id, &imei, 2)),
                    post(&client, &urls[2], callback(&request_id, &imei, 3)),
                );
                [answers.0, answers.1, answers.2]
            }));
        }
    }
    for task in tasks {
        for status in task.await.unwrap() {
            assert_eq!(status, Some(200));
        }
    }

    let messages = (jobs * devices) as i64;
    assert_eq!(
        database.count("SELECT count(*) FROM deliveries WHERE result = 'stored'"),
        messages
    );
    assert_eq!(
        database.count("SELECT count(*) FROM deliveries WHERE result = 'duplicate'"),
        2 * messages
    );
    assert_eq!(
        database.count("SELECT count(*) FROM device_outcomes"),
        messages
    );
    assert_eq!(database.count("SELECT count(*) FROM raw_bodies"), messages);
    for job in 0..jobs {
        let answer: Value = client
            .get(replicas[(job + 1) % 3].api(&format!("/api/v1/jobs/fan-{job}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .map(|body| serde_json::from_slice(&body).unwrap())
            .unwrap();
        assert_eq!(answer["state"], "completed", "{answer}");
        assert_eq!(answer["devices_reported"], devices, "{answer}");
        assert_eq!(answer["succeeded"], devices, "{answer}");
        assert_eq!(answer["pending"], 0, "{answer}");
        assert_eq!(answer["deliveries"], 3 * devices, "{answer}");
        assert_eq!(answer["duplicates"], 2 * devices, "{answer}");
    }
    // Every registered device was matched, none added twice.
    assert_eq!(database.count("SELECT count(*) FROM job_devices"), messages);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_loses_nothing_it_acknowledged() {
    let (mut replicas, database) = three_replicas(&[]).await;
    let client = reqwest::Client::new();
    let urls: Arc<Vec<String>> = Arc::new(replicas.iter().map(Replica::callback_url).collect());
    let (jobs, devices) = (60, 10);
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
    let limit = Arc::new(Semaphore::new(16));
    let mut tasks = Vec::new();
    for index in 0..jobs * devices {
        let (client, urls, limit, acknowledged) = (
            client.clone(),
            Arc::clone(&urls),
            Arc::clone(&limit),
            Arc::clone(&acknowledged),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.unwrap();
            let request_id = format!("kill-{}", index / devices);
            let imei = format!("36{index:013}");
            // A load balancer: the next replica when one does not answer 200.
            for attempt in 0..12 {
                let url = &urls[(index + attempt) % 3];
                let status = post(&client, url, callback(&request_id, &imei, 1)).await;
                if status == Some(200) {
                    acknowledged.lock().unwrap().push(imei);
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }));
    }
    // Let the stream get going, then kill one replica without warning.
    let deadline = Instant::now() + Duration::from_secs(20);
    while acknowledged.lock().unwrap().len() < jobs * devices / 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before_kill = acknowledged.lock().unwrap().len();
    replicas[1].child.kill().unwrap();
    replicas[1].child.wait().unwrap();
    for task in tasks {
        assert!(
            task.await.unwrap(),
            "a callback found no replica to take it"
        );
    }

    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        before_kill < acknowledged.len(),
        "the kill happened mid-stream"
    );
    assert_eq!(acknowledged.len(), jobs * devices);
    // Every acknowledged message is stored (once: a response lost in the kill makes the retry a
    // duplicate, never a second copy).
    let stored = database.rows(
        "SELECT i.identifier FROM deliveries d
         JOIN device_outcomes o ON o.delivery_id = d.id
         JOIN outcome_identifiers i ON i.outcome_id = o.id AND i.kind = 'IMEI'
         WHERE d.result = 'stored'",
    );
    let mut stored: Vec<String> = stored
        .into_iter()
        .filter_map(|row| row[0].clone())
        .collect();
    stored.sort();
    let mut expected = acknowledged;
    expected.sort();
    assert_eq!(stored, expected);
    assert_eq!(
        database.count(&format!(
            "SELECT count(*) FROM jobs WHERE devices_reported <> {devices} OR succeeded <> {devices}"
        )),
        0
    );
}

/// Sums a counter or histogram `_count` series over every replica's `/metrics`.
async fn metric_total(client: &reqwest::Client, replicas: &[Replica], series: &str) -> f64 {
    let mut total = 0.0;
    for replica in replicas {
        let text = client
            .get(replica.api("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        total += text
            .lines()
            .filter(|line| line.starts_with(series))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_sweep_runs_on_every_replica_at_once_and_closes_each_job_once() {
    let (replicas, database) = three_replicas(&[
        ("M2M_JOBS__SWEEP_INTERVAL_MS", "20"),
        ("M2M_JOBS__DEFAULT_TIMEOUT_S", "2"),
    ])
    .await;
    let client = reqwest::Client::new();
    let jobs = 90;
    // Unregistered jobs: their size is unknown, so only the deadline closes them.
    for job in 0..jobs {
        let status = post(
            &client,
            &replicas[job % 3].callback_url(),
            callback(&format!("sweep-{job}"), &format!("37{job:013}"), 1),
        )
        .await;
        assert_eq!(status, Some(200));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while database.count("SELECT count(*) FROM jobs WHERE state IN ('pending', 'in_progress')") > 0
    {
        assert!(
            Instant::now() < deadline,
            "the sweep did not close the jobs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(
        database.count(
            "SELECT count(*) FROM jobs WHERE state = 'completed' AND completed_at IS NOT NULL"
        ),
        jobs as i64
    );
    // Each completion was observed by exactly one replica.
    assert_eq!(
        metric_total(&client, &replicas, "m2m_job_completion_seconds_count").await,
        jobs as f64
    );
}

/// Posts an activation for `request_id` with the `test` pair a test app accepts; the status.
async fn post_as_test(app: &crate::helpers::TestApp, request_id: &str, count: u32) -> u16 {
    let body = payloads::carrier_callback(
        Envelope {
            username: "test",
            password: "test",
            callback_count: count,
            ..Envelope::default()
        },
        request_id,
        &[("IMEI", "350000000009999")],
        CarrierResult::Activated { mdn: "5550009999" },
    );
    app.client
        .post(&app.callback_url)
        .header("Content-Type", "text/xml")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A TCP relay to PostgreSQL that the test can cut (dropping every connection) and restore.
struct Relay {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
    upstream: String,
}

impl Relay {
    fn new(upstream: String) -> Self {
        Self {
            port: free_port(),
            task: None,
            upstream,
        }
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Stops listening and drops every relayed connection (the JoinSet aborts them).
    async fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_gets_503_and_not_ready_and_the_listener_recovers_by_itself() {
    let schema_url = fresh_postgres_schema(&unique_name());
    let mut url = reqwest::Url::parse(&schema_url).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let mut relay = Relay::new(upstream);
    url.set_port(Some(relay.port)).unwrap();
    let relayed = url.to_string();
    let app = spawn_app_with(|settings| {
        settings.storage.url = Some(m2m_listener::domain::Secret::new(relayed.clone()));
        settings.storage.busy_timeout_ms = 1_000;
    })
    .await;
    // The test app accepts the `test` pair.
    let post_test = async |index: u32| post_as_test(&app, &format!("outage-{index}"), index).await;

    // Down from the start: the listener runs, refuses with 503 (the platform retries), not ready.
    assert_eq!(post_test(1).await, 503);
    assert_eq!(app.get_api("/readyz").await.status(), 503);

    // Back: the schema is migrated on first use and the retry is taken.
    relay.up().await;
    let until = Instant::now() + Duration::from_secs(15);
    while post_test(1).await != 200 {
        assert!(Instant::now() < until, "the listener did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.get_api("/readyz").await.status(), 200);

    // Cut again, with live pooled connections: 503 and not ready, then recovery without restart.
    relay.down().await;
    assert_eq!(post_test(2).await, 503);
    assert_eq!(app.get_api("/readyz").await.status(), 503);
    assert_eq!(
        app.get_api("/api/v1/jobs").await.status(),
        503,
        "a read while the database is away is unavailable, not a defect"
    );
    relay.up().await;
    let until = Instant::now() + Duration::from_secs(15);
    while post_test(2).await != 200 {
        assert!(Instant::now() < until, "the listener did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let direct = TestDatabase::Postgres(schema_url);
    assert_eq!(
        direct.count("SELECT count(*) FROM deliveries WHERE result = 'stored'"),
        2
    );
    relay.down().await;
}

#[test]
fn the_backup_command_refuses_on_postgres_and_names_the_tools_to_use() {
    let output = Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
        .args(["backup", "/tmp/never-written.db"])
        .env_remove("M2M_CONFIG")
        .env("M2M_STORAGE__URL", postgres_base_url())
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("pg_dump"));
    assert!(!std::path::Path::new("/tmp/never-written.db").exists());
}

#[test]
fn serving_on_postgres_without_configured_credentials_stops_at_start_naming_the_key() {
    let directory = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
        .current_dir(directory.path())
        .env_remove("M2M_CONFIG")
        .env("M2M_STORAGE__URL", postgres_base_url())
        .env("M2M_CALLBACK__LISTEN", "127.0.0.1:0")
        .env("M2M_API__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("callback.credentials"), "{stderr}");
    assert!(
        !directory.path().join("callback-credentials.toml").exists(),
        "no pair is generated for one replica only"
    );
}

/// A PostgreSQL front on loopback relaying to the real server. With a certificate it answers the
/// SSLRequest "S", speaks TLS with it and relays the decrypted stream: the listener's handshake and
/// certificate check are real, and a client that does not speak TLS gets nowhere. Without one it
/// answers "N" and relays in plain text: what a man in the middle would do to read the password.
async fn front(upstream: String, certificate: Option<&rcgen::CertifiedKey<rcgen::KeyPair>>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor = certificate.map(|certificate| {
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(certificate.signing_key.serialize_der())
                .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certificate.cert.der().clone()], key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // SSLRequest: length 8, code 80877103.
                let mut request = [0u8; 8];
                if inbound.read_exact(&mut request).await.is_err()
                    || request != [0, 0, 0, 8, 4, 210, 22, 47]
                {
                    return;
                }
                let answer: &[u8] = if acceptor.is_some() { b"S" } else { b"N" };
                if inbound.write_all(answer).await.is_err() {
                    return;
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(mut secured) = acceptor.accept(inbound).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut secured, &mut outbound).await;
                        }
                    }
                    None => {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }
            });
        }
    });
    port
}

/// A fresh schema's URL pointed at a [`front`] with `certificate`, and the schema's direct URL.
async fn through_front(
    certificate: Option<&rcgen::CertifiedKey<rcgen::KeyPair>>,
) -> (reqwest::Url, String) {
    let schema_url = fresh_postgres_schema(&unique_name());
    let parsed = reqwest::Url::parse(&schema_url).unwrap();
    let upstream = format!(
        "{}:{}",
        parsed.host_str().unwrap(),
        parsed.port().unwrap_or(5432)
    );
    let port = front(upstream, certificate).await;
    let mut url = parsed;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(port)).unwrap();
    (url, schema_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_used_and_the_certificate_checked_against_storage_ca_file() {
    let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let impostor = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (mut url, schema_url) = through_front(Some(&server)).await;
    url.query_pairs_mut().append_pair("sslmode", "require");
    let url = url.to_string();
    let directory = tempfile::tempdir().unwrap();
    let trusted = directory.path().join("server-ca.pem");
    std::fs::write(&trusted, server.cert.pem()).unwrap();
    let untrusted = directory.path().join("other-ca.pem");
    std::fs::write(&untrusted, impostor.cert.pem()).unwrap();

    let post = async |app: &crate::helpers::TestApp, tag: &str| {
        post_as_test(app, &format!("tls-{tag}"), 1).await
    };

    // The front speaks only TLS, so a 200 means the connection was encrypted; with the server's CA
    // configured, its certificate was checked too.
    for (tag, ca_file) in [("verified", Some(trusted)), ("encrypted", None)] {
        let app = spawn_app_with(|settings| {
            settings.storage.url = Some(m2m_listener::domain::Secret::new(url.clone()));
            settings.storage.ca_file = ca_file.clone();
        })
        .await;
        assert_eq!(post(&app, tag).await, 200, "{tag}");
        assert_eq!(app.get_api("/readyz").await.status(), 200, "{tag}");
    }
    // A certificate that does not chain to storage.ca_file is refused: nothing is acknowledged.
    let app = spawn_app_with(|settings| {
        settings.storage.url = Some(m2m_listener::domain::Secret::new(url.clone()));
        settings.storage.ca_file = Some(untrusted.clone());
        settings.storage.busy_timeout_ms = 1_000;
    })
    .await;
    assert_eq!(post(&app, "impostor").await, 503);
    assert_eq!(app.get_api("/readyz").await.status(), 503);

    let direct = TestDatabase::Postgres(schema_url);
    assert_eq!(
        direct.value("SELECT string_agg(request_id, ',' ORDER BY request_id) FROM deliveries"),
        Some("tls-encrypted,tls-verified".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_storage_ca_file_a_server_declining_tls_is_refused_not_used_in_plain_text() {
    let (url, _) = through_front(None).await;
    let url = url.to_string();
    let directory = tempfile::tempdir().unwrap();
    let ca = directory.path().join("ca.pem");
    let certificate = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(&ca, certificate.cert.pem()).unwrap();
    let post = async |app: &crate::helpers::TestApp| post_as_test(app, "downgrade", 1).await;

    // sslmode=prefer (the default) without a CA accepts the plain connection, as libpq does...
    let lenient = spawn_app_with(|settings| {
        settings.storage.url = Some(m2m_listener::domain::Secret::new(url.clone()));
    })
    .await;
    assert_eq!(post(&lenient).await, 200);
    // ...but with storage.ca_file TLS is required: no plain-text fallback.
    let strict = spawn_app_with(|settings| {
        settings.storage.url = Some(m2m_listener::domain::Secret::new(url.clone()));
        settings.storage.ca_file = Some(ca.clone());
        settings.storage.busy_timeout_ms = 1_000;
    })
    .await;
    assert_eq!(post(&strict).await, 503);
    assert_eq!(strict.get_api("/readyz").await.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_registration_sent_to_three_replicas_at_once_creates_one_job() {
    let (replicas, database) = three_replicas(&[]).await;
    let client = reqwest::Client::new();
    for round in 0..20 {
        let registration = json!({
            "request_id": format!("register-{round}"),
            "operation": "activate",
            "expected_devices": 2,
        })
        .to_string();
        let register = |replica: &Replica| {
            client
                .post(replica.api("/api/v1/jobs"))
                .header("Content-Type", "application/json")
                .body(registration.clone())
                .send()
        };
        let answers = tokio::join!(
            register(&replicas[0]),
            register(&replicas[1]),
            register(&replicas[2]),
        );
        let mut statuses: Vec<u16> = [answers.0, answers.1, answers.2]
            .into_iter()
            .map(|answer| answer.unwrap().status().as_u16())
            .collect();
        statuses.sort();
        // One creates it; the others find the same registration already there.
        assert_eq!(statuses, [200, 200, 201], "round {round}");
    }
    assert_eq!(
        database.count("SELECT count(*) FROM jobs WHERE registered"),
        20
    );
    // A different registration for a registered request id conflicts, on any replica.
    let conflicting = client
        .post(replicas[2].api("/api/v1/jobs"))
        .header("Content-Type", "application/json")
        .body(json!({"request_id": "register-0", "operation": "deactivate"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(conflicting.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_row_held_by_another_transaction_gets_503_without_taking_the_replica_out() {
    let app = spawn_app_with(|settings| settings.storage.busy_timeout_ms = 500).await;
    assert_eq!(post_as_test(&app, "held-job", 1).await, 200);
    let crate::helpers::TestDatabase::Postgres(url) = app.database.clone() else {
        unreachable!("the PostgreSQL suite")
    };
    // Another session (another replica, an operator's shell) holds the job's row.
    let (locked, held) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let mut transaction = client.transaction().unwrap();
        transaction
            .execute(
                "SELECT id FROM jobs WHERE request_id = 'held-job' FOR UPDATE",
                &[],
            )
            .unwrap();
        locked.send(()).unwrap();
        let _ = released.recv();
        transaction.rollback().unwrap();
    });
    held.recv().unwrap();

    assert_eq!(post_as_test(&app, "held-job", 2).await, 503);
    let registration = app
        .register(serde_json::json!({"request_id": "held-job", "operation": "activate"}))
        .await;
    assert_eq!(
        registration.status(),
        503,
        "a held row is retried later, not a fault of the request"
    );
    assert_eq!(
        app.get_api("/readyz").await.status(),
        200,
        "one busy row is not a database fault"
    );

    release.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(post_as_test(&app, "held-job", 3).await, 200);
}

/// Three replicas dispatch one outbox: every event is delivered, each once, and no attempt is made
/// by two replicas (each attempt number of an event is recorded by one replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_deliver_every_event_and_no_two_make_the_same_attempt() {
    let receiver = crate::events::Receiver::start().await;
    let url = receiver.url.clone();
    let settings = [
        ("M2M_EVENTS__POLL_INTERVAL_MS", "20"),
        ("M2M_EVENTS__WEBHOOKS__0__NAME", "ops"),
        ("M2M_EVENTS__WEBHOOKS__0__URL", url.as_str()),
        ("M2M_EVENTS__WEBHOOKS__0__SECRET", crate::events::SECRET),
        ("M2M_EVENTS__WEBHOOKS__0__TIMEOUT_MS", "5000"),
    ];
    let (replicas, database) = three_replicas(&settings).await;
    let client = reqwest::Client::new();
    let mut senders = tokio::task::JoinSet::new();
    for index in 0..60 {
        let (client, url) = (client.clone(), replicas[index % 3].callback_url());
        senders.spawn(async move {
            let imei = format!("3500000009{index:05}");
            let body = callback(&format!("evt-replica-{index}"), &imei, 1);
            assert_eq!(post(&client, &url, body).await, Some(200));
        });
    }
    senders.join_all().await;
    let events = database.count("SELECT count(*) FROM events");
    assert!(events >= 60, "an outcome per callback at least: {events}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let delivered = database.count(
            "SELECT count(*) FROM event_deliveries WHERE sink = 'ops' AND state = 'delivered'",
        );
        if delivered == events {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} of {events} delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = receiver.received();
    let mut ids: Vec<&str> = received.iter().map(|request| request.id.as_str()).collect();
    ids.sort_unstable();
    let total = ids.len();
    ids.dedup();
    assert_eq!(ids.len() as i64, events, "every event received");
    assert_eq!(total, ids.len(), "none received twice");
    assert_eq!(
        database.count("SELECT count(*) FROM event_attempts"),
        events,
        "one attempt each"
    );
    let replicas_used = database.count("SELECT count(DISTINCT replica) FROM event_attempts");
    assert!(replicas_used >= 1);
    assert_eq!(
        database.count(
            "SELECT count(*) FROM (SELECT event_id, attempt FROM event_attempts
              GROUP BY event_id, attempt HAVING count(*) > 1) doubled"
        ),
        0
    );
    drop(replicas);
}
