//! The acknowledgement benchmark (spec §9): `cargo bench --bench ack`.
//!
//! Side by side, in one run, on the same load of unique callbacks and the same `synchronous`:
//! (a) a bare probe — hyper plus one group-commit writer inserting the raw body into SQLite — and
//! (b) the listener; in two loads of single-device callbacks: jobs of ten callbacks, and one new
//! job per callback (every callback creates its job row and its first device). Both run as their own processes; the load generator is this process. Then: the
//! time to acknowledge a 10,000-line upload, resident memory under load, how cost grows with the
//! number of devices in a callback, and database bytes per callback.
//!
//! Options (after `--`): `--callbacks N` (default 20000), `--connections C` (default 64),
//! `--rounds R` (default 2), `--synchronous full|normal` (default full), `--quick` (small sizes),
//! `--replicas-only` (only the scale-out section: 1, 2 and 3 replicas on PostgreSQL beside SQLite,
//! on the server at `M2M_TEST_POSTGRES_URL`, default this machine's), `--events-only` (only the
//! events section: throughput with events off, on, and on with a local webhook receiver, and the
//! delivery latency to it). With `M2M_BENCH_LISTENER=PATH` the listener measured is the binary at
//! PATH (an earlier release, say) instead of this build's.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use m2m_listener::simulate::LatencySummary;
use m2m_listener::simulate::payloads::{self, CarrierResult, Envelope};

const USERNAME: &str = "bench";
const PASSWORD: &str = "bench-password";
const ACK: &str = concat!(
    r#"<?xml version="1.0" encoding="utf-8"?>"#,
    r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>"#,
    r#"<CallbackResponse xmlns="http://nphase.com/unifiedwebservice/v2"/>"#,
    r#"</s:Body></s:Envelope>"#
);

struct Options {
    callbacks: usize,
    connections: usize,
    rounds: usize,
    synchronous: String,
    quick: bool,
    /// Only the scale-out section (`--replicas-only`).
    replicas_only: bool,
    /// Only the events section (`--events-only`).
    events_only: bool,
    /// Run by `cargo test` (which passes no `--bench`): a small smoke run that keeps the benchmark
    /// working, with no report written.
    smoke: bool,
}

fn options() -> Options {
    let arguments: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        arguments
            .iter()
            .position(|argument| argument == name)
            .and_then(|index| arguments.get(index + 1))
            .cloned()
    };
    let smoke = !arguments.iter().any(|argument| argument == "--bench");
    let quick = smoke || arguments.iter().any(|argument| argument == "--quick");
    Options {
        callbacks: value("--callbacks")
            .and_then(|value| value.parse().ok())
            .unwrap_or(if quick { 2_000 } else { 20_000 }),
        connections: value("--connections")
            .and_then(|value| value.parse().ok())
            .unwrap_or(64),
        rounds: value("--rounds")
            .and_then(|value| value.parse().ok())
            .unwrap_or(if quick { 1 } else { 2 }),
        synchronous: value("--synchronous").unwrap_or_else(|| "full".to_owned()),
        quick,
        replicas_only: arguments
            .iter()
            .any(|argument| argument == "--replicas-only"),
        events_only: arguments.iter().any(|argument| argument == "--events-only"),
        smoke,
    }
}

fn main() {
    let arguments: Vec<String> = std::env::args().collect();
    if let Some(index) = arguments
        .iter()
        .position(|argument| argument == "--probe-server")
    {
        let database = arguments.get(index + 1).cloned().unwrap_or_default();
        let synchronous = arguments
            .get(index + 2)
            .cloned()
            .unwrap_or_else(|| "full".to_owned());
        probe_server(&database, &synchronous);
        return;
    }
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(benchmark(options));
}

// ---------------------------------------------------------------------------------------------
// The probe: hyper + one writer thread, group commit of raw bodies, nothing else.

fn probe_server(database: &str, synchronous: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let connection = rusqlite::Connection::open(database).expect("probe database");
    connection
        .execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous};
             CREATE TABLE IF NOT EXISTS raw (id INTEGER PRIMARY KEY, received_at INTEGER NOT NULL, body BLOB NOT NULL);"
        ))
        .expect("probe schema");
    type Job = (Bytes, tokio::sync::oneshot::Sender<bool>);
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Job>(4096);
    std::thread::spawn(move || {
        let mut connection = connection;
        while let Some(first) = receiver.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < 256 {
                match receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let committed = (|| -> rusqlite::Result<()> {
                let transaction = connection.transaction()?;
                {
                    let mut insert = transaction
                        .prepare_cached("INSERT INTO raw (received_at, body) VALUES (?1, ?2)")?;
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|elapsed| elapsed.as_micros() as i64)
                        .unwrap_or(0);
                    for (body, _) in &batch {
                        insert.execute(rusqlite::params![now, &body[..]])?;
                    }
                }
                transaction.commit()
            })()
            .is_ok();
            for (_, reply) in batch {
                let _ = reply.send(committed);
            }
        }
    });
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!(
            "probe listening on {}",
            listener.local_addr().expect("address")
        );
        let _ = std::io::stdout().flush();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let sender = sender.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let sender = sender.clone();
                        async move {
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|body| body.to_bytes())
                                .unwrap_or_default();
                            let (reply, committed) = tokio::sync::oneshot::channel();
                            let stored = sender.send((body, reply)).await.is_ok()
                                && committed.await.unwrap_or(false);
                            let mut response =
                                Response::new(Full::new(Bytes::from_static(ACK.as_bytes())));
                            if !stored {
                                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Servers under test, as child processes.

struct Server {
    name: &'static str,
    child: Child,
    callback: SocketAddr,
    /// The listener's API (its `/metrics`); the probe has none.
    api: Option<SocketAddr>,
    database: std::path::PathBuf,
    _directory: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, from `/proc/PID/status`.
fn resident_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kilobytes| kilobytes * 1024)
        .unwrap_or(0)
}

impl Server {
    fn resident_bytes(&self) -> u64 {
        resident_bytes(self.child.id())
    }

    /// Stops the server gracefully and returns the database size after a checkpoint.
    fn stop_and_measure_database(mut self) -> u64 {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        if let Ok(connection) = rusqlite::Connection::open(&self.database) {
            let _ = connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
        }
        std::fs::metadata(&self.database)
            .map(|metadata| metadata.len())
            .unwrap_or(0)
    }
}

/// Reads the child's stdout until a line has held each of `markers`, then keeps draining it in a
/// thread (the listener logs every callback; a full pipe would stall it). The address after each
/// marker, in the order of `markers`.
fn addresses_from_output<const N: usize>(child: &mut Child, markers: [&str; N]) -> [SocketAddr; N] {
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    let mut found: [Option<SocketAddr>; N] = [None; N];
    while found.iter().any(Option::is_none) {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("server exited before printing {markers:?}");
        }
        for (marker, slot) in markers.iter().zip(found.iter_mut()) {
            if let Some(rest) = line.split(marker).nth(1) {
                // `http://127.0.0.1:4000/api/v1/ (POST)` or `127.0.0.1:4000`.
                let address = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("http://");
                let address = address.split('/').next().unwrap_or(address);
                *slot = Some(
                    address
                        .parse()
                        .unwrap_or_else(|_| panic!("no address in {line:?}")),
                );
            }
        }
    }
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    found.map(|address| address.expect("every marker found"))
}

fn start_probe(synchronous: &str) -> Server {
    let directory = tempfile::tempdir().expect("directory");
    let database = directory.path().join("probe.db");
    let mut child = Command::new(std::env::current_exe().expect("bench binary"))
        .arg("--probe-server")
        .arg(&database)
        .arg(synchronous)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("probe starts");
    let [callback] = addresses_from_output(&mut child, ["probe listening on "]);
    Server {
        name: "probe",
        child,
        callback,
        api: None,
        database,
        _directory: directory,
    }
}

fn start_listener(synchronous: &str) -> Server {
    start_listener_with("listener", &[("M2M_STORAGE__SYNCHRONOUS", synchronous)])
}

/// The listener on a fresh SQLite file, or wherever `settings` (environment variables) point it.
fn start_listener_with(name: &'static str, settings: &[(&str, &str)]) -> Server {
    let directory = tempfile::tempdir().expect("directory");
    let database = directory.path().join("m2m-listener.db");
    // `M2M_BENCH_LISTENER` runs another build (an earlier release, to compare on one machine).
    let binary = std::env::var_os("M2M_BENCH_LISTENER")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_m2m-listener").into());
    let mut command = Command::new(binary);
    command
        .current_dir(directory.path())
        .env("M2M_STORAGE__PATH", &database)
        .env("M2M_CALLBACK__LISTEN", "127.0.0.1:0")
        .env("M2M_API__LISTEN", "127.0.0.1:0")
        .env("M2M_CALLBACK__CREDENTIALS__0__USERNAME", USERNAME)
        .env("M2M_CALLBACK__CREDENTIALS__0__PASSWORD", PASSWORD)
        .env_remove("RUST_LOG")
        // An `M2M_` variable is a setting to the listener, which refuses one it does not know.
        .env_remove("M2M_BENCH_LISTENER")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (key, value) in settings {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("listener starts");
    let [callback, api] = addresses_from_output(&mut child, ["callbacks: ", "API: "]);
    Server {
        name,
        child,
        callback,
        api: Some(api),
        database,
        _directory: directory,
    }
}

// ---------------------------------------------------------------------------------------------
// Load.

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct LoadResult {
    seconds: f64,
    acknowledged: usize,
    failed: usize,
    latency: LatencySummary,
    peak_resident_bytes: u64,
    /// CPU time (user + system) the servers spent during the load, all of them together.
    server_cpu_seconds: f64,
    /// CPU time this process (the load generator, and the thread draining the servers' logs)
    /// spent during the load.
    generator_cpu_seconds: f64,
}

impl LoadResult {
    /// Server CPU per acknowledged callback, in microseconds.
    fn server_cpu_micros(&self) -> f64 {
        self.server_cpu_seconds * 1e6 / self.acknowledged.max(1) as f64
    }

    /// Load-generator CPU per acknowledged callback, in microseconds.
    fn generator_cpu_micros(&self) -> f64 {
        self.generator_cpu_seconds * 1e6 / self.acknowledged.max(1) as f64
    }

    fn per_second(&self) -> f64 {
        self.acknowledged as f64 / self.seconds
    }
}

/// CPU time (user + system) a process has spent, from `/proc/PID/stat` (`self` for this one), in
/// seconds: fields 14 and 15, in clock ticks of 1/100 s (Linux's `USER_HZ`).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after it are counted from its ')'.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// The listener's writer so far, from its `/metrics`: seconds spent writing batches (each from
/// its transaction's start to its commit, fsync included: `m2m_store_commit_seconds_sum`) and
/// deliveries written (`m2m_store_batch_size_sum`). `None` for the probe.
async fn writer_totals(server: &Server) -> Option<(f64, f64)> {
    let api = server.api?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(format!("http://{api}/metrics"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let response = client.request(request).await.ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    Some((
        value("m2m_store_commit_seconds_sum ")?,
        value("m2m_store_batch_size_sum ")?,
    ))
}

/// The writer's time per delivery between two [`writer_totals`], in microseconds: the cost per
/// callback issue 13 names (`m2m_store_commit_seconds_sum / m2m_store_batch_size_sum`).
fn writer_micros(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    let ((seconds_before, stored_before), (seconds_after, stored_after)) = (before?, after?);
    let stored = stored_after - stored_before;
    (stored > 0.0).then(|| (seconds_after - seconds_before) * 1e6 / stored)
}

/// Posts every body once over `connections` keep-alive connections.
async fn load(server: &Server, bodies: Arc<Vec<Bytes>>, connections: usize) -> LoadResult {
    load_across(&[server], bodies, connections, 1).await
}

/// Posts every body `copies` times over `connections` keep-alive connections spread over
/// `servers` (connection k talks to server k mod n); copy i of a body goes to server i mod n, all
/// at once. Peak RSS is the largest of any one server.
async fn load_across(
    servers: &[&Server],
    bodies: Arc<Vec<Bytes>>,
    connections: usize,
    copies: usize,
) -> LoadResult {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build_http();
    let urls: Arc<Vec<hyper::Uri>> = Arc::new(
        servers
            .iter()
            .map(|server| format!("http://{}/", server.callback).parse().expect("url"))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(0));
    let pids: Vec<u32> = servers.iter().map(|server| server.child.id()).collect();
    let sampler = {
        let (sampling, peak) = (Arc::clone(&sampling), Arc::clone(&peak));
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                for pid in &pids {
                    peak.fetch_max(resident_bytes(*pid), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let server_cpu = || -> f64 {
        servers
            .iter()
            .map(|server| cpu_seconds(&server.child.id().to_string()))
            .sum()
    };
    let (server_cpu_before, generator_cpu_before) = (server_cpu(), cpu_seconds("self"));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for connection in 0..connections {
        let (client, urls, bodies, next, failed) = (
            client.clone(),
            Arc::clone(&urls),
            Arc::clone(&bodies),
            Arc::clone(&next),
            Arc::clone(&failed),
        );
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(index) else { break };
                let sent = Instant::now();
                let mut answered = true;
                let mut copies_sent = Vec::with_capacity(copies);
                for copy in 0..copies {
                    let url = &urls[(connection + copy) % urls.len()];
                    let request = Request::post(url.clone())
                        .header("content-type", "text/xml; charset=utf-8")
                        .body(Full::new(body.clone()))
                        .expect("request");
                    copies_sent.push(client.request(request));
                }
                for response in join_all(copies_sent).await {
                    answered &= match response {
                        Ok(response) => {
                            let ok = response.status().is_success();
                            let _ = response.into_body().collect().await;
                            ok
                        }
                        Err(_) => false,
                    };
                }
                if answered {
                    latencies.push(sent.elapsed().as_secs_f64());
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        });
    }
    let mut latencies: Vec<f64> = workers.join_all().await.into_iter().flatten().collect();
    let seconds = started.elapsed().as_secs_f64();
    let server_cpu_seconds = server_cpu() - server_cpu_before;
    let generator_cpu_seconds = cpu_seconds("self") - generator_cpu_before;
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    LoadResult {
        seconds,
        acknowledged: latencies.len(),
        failed: failed.load(Ordering::Relaxed),
        latency: LatencySummary::of(&mut latencies),
        peak_resident_bytes: peak.load(Ordering::Relaxed),
        server_cpu_seconds,
        generator_cpu_seconds,
    }
}

/// Runs `futures` concurrently; their outputs in order.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|context| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(done.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(context) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

fn envelope() -> Envelope<'static> {
    Envelope {
        username: USERNAME,
        password: PASSWORD,
        ..Envelope::default()
    }
}

/// `count` unique activation callbacks of one device each, `devices_per_job` callbacks per job
/// (10: today's jobs of ten; 1: one new job per callback), `tag` keeping runs apart.
fn carrier_bodies_per_job(count: usize, devices_per_job: usize, tag: &str) -> Vec<Bytes> {
    let devices_per_job = devices_per_job.max(1);
    (0..count)
        .map(|index| {
            let request_id = format!("bench-{tag}-{:06}", index / devices_per_job);
            let imei = format!("35{index:013}");
            let iccid = format!("8914{index:016}");
            let mdn = format!("5{index:09}");
            let body = payloads::carrier_callback(
                envelope(),
                &request_id,
                &[("IMEI", &imei), ("ICCID", &iccid)],
                CarrierResult::Activated { mdn: &mdn },
            );
            Bytes::from(body)
        })
        .collect()
}

/// `count` unique activation callbacks in jobs of 10 devices.
fn carrier_bodies(count: usize, tag: &str) -> Vec<Bytes> {
    carrier_bodies_per_job(count, 10, tag)
}

/// `count` unique upload callbacks of `lines` lines each.
fn upload_bodies(count: usize, lines: usize, tag: &str) -> Vec<Bytes> {
    (0..count)
        .map(|index| {
            let owned: Vec<(String, String, String)> = (0..lines)
                .map(|line| {
                    (
                        format!("8914{index:06}{line:010}"),
                        format!("35{index:05}{line:08}"),
                        "Device upload successful".to_owned(),
                    )
                })
                .collect();
            let borrowed: Vec<payloads::UploadLine<'_>> = owned
                .iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
                .collect();
            let total = u32::try_from(lines).unwrap_or(u32::MAX);
            Bytes::from(payloads::upload_callback(
                envelope(),
                &format!("bench-{tag}-upload-{index}"),
                &borrowed,
                (total, 0, total, 0),
            ))
        })
        .collect()
}

fn mebibytes(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn benchmark(options: Options) {
    let mut report = String::new();
    let mut line = |text: String| {
        println!("{text}");
        report.push_str(&text);
        report.push('\n');
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .map(|line| line.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    line(format!(
        "# m2m-listener acknowledgement benchmark\n\nmachine: {} cores, {cpu}; synchronous = {}; {} unique callbacks per run at {} connections; {} round(s)\n",
        std::thread::available_parallelism()
            .map(|cores| cores.get())
            .unwrap_or(0),
        options.synchronous,
        options.callbacks,
        options.connections,
        options.rounds
    ));

    if options.replicas_only {
        scale_out(&options, &mut line).await;
        return;
    }
    if options.events_only {
        events_on_off(&options, &mut line).await;
        return;
    }

    // (1) Side by side: probe, listener, alternating, fresh databases; in jobs of ten callbacks,
    // and with one new job per callback (a job row and its first device written by every one).
    for (load_name, devices_per_job) in [("jobs of ten", 10), ("one new job per callback", 1)] {
        line(format!(
            "## Durable throughput, side by side: {load_name}\n"
        ));
        line(
        "| round | server | acknowledged/s | p50 ms | p99 ms | max ms | failed | peak RSS MiB | server CPU µs/callback | generator CPU µs/callback | writer µs/callback |"
            .to_owned(),
    );
        line("|---|---|---|---|---|---|---|---|---|---|---|".to_owned());
        let mut probe_rates = Vec::new();
        let mut listener_rates = Vec::new();
        let mut listener_p99 = Vec::new();
        let mut listener_writer = Vec::new();
        let mut listener_peak = 0u64;
        let mut database_bytes_per_callback = 0.0;
        for round in 1..=options.rounds {
            for start in [start_probe as fn(&str) -> Server, start_listener] {
                let server = start(&options.synchronous);
                let warm_up = Arc::new(carrier_bodies_per_job(
                    500,
                    devices_per_job,
                    &format!("warm-{round}-{devices_per_job}-{}", server.name),
                ));
                load(&server, warm_up, options.connections).await;
                let bodies = Arc::new(carrier_bodies_per_job(
                    options.callbacks,
                    devices_per_job,
                    &format!("round-{round}-{devices_per_job}"),
                ));
                let writer_before = writer_totals(&server).await;
                let result = load(&server, bodies, options.connections).await;
                let writer = writer_micros(writer_before, writer_totals(&server).await);
                line(format!(
                    "| {round} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {:.1} | {:.1} | {} |",
                    server.name,
                    result.per_second(),
                    result.latency.p50,
                    result.latency.p99,
                    result.latency.max,
                    result.failed,
                    mebibytes(result.peak_resident_bytes),
                    result.server_cpu_micros(),
                    result.generator_cpu_micros(),
                    writer.map_or("—".to_owned(), |micros| format!("{micros:.1}"))
                ));
                if server.name == "probe" {
                    probe_rates.push(result.per_second());
                    drop(server);
                } else {
                    listener_rates.push(result.per_second());
                    listener_p99.push(result.latency.p99);
                    listener_writer.extend(writer);
                    listener_peak = listener_peak.max(result.peak_resident_bytes);
                    let callbacks = (options.callbacks + 500) as f64;
                    database_bytes_per_callback =
                        server.stop_and_measure_database() as f64 / callbacks;
                }
            }
        }
        let median = |values: &mut Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(0.0)
        };
        let (probe, listener) = (median(&mut probe_rates), median(&mut listener_rates));
        // No figure rather than a zero when the listener's `/metrics` could not be read.
        let writer = if listener_writer.is_empty() {
            "—".to_owned()
        } else {
            format!("{:.1} µs", median(&mut listener_writer))
        };
        line(format!(
            "\nthroughput ratio listener/probe ({load_name}): **{:.2}** (median {listener:.0}/s vs {probe:.0}/s; target ≥ 0.80)  \n\
         listener p99 at {} connections: **{:.2} ms** (worst round; target < 25 ms)  \n\
         listener writer per callback: **{writer}** (median; `m2m_store_commit_seconds_sum / m2m_store_batch_size_sum` over the measured load, fsync included)  \n\
         listener peak RSS under load: **{:.1} MiB** (target < 64 MiB)  \n\
         database: **{:.0} bytes per callback** = {:.2} GB per million callbacks (raw bodies included)\n",
            listener / probe.max(1e-9),
            options.connections,
            listener_p99.iter().cloned().fold(0.0, f64::max),
            mebibytes(listener_peak),
            database_bytes_per_callback,
            database_bytes_per_callback * 1e6 / 1e9
        ));
    }

    // (2) The 10,000-line upload, one at a time.
    let server = start_listener(&options.synchronous);
    let upload_lines = if options.smoke { 1_000 } else { 10_000 };
    let uploads = Arc::new(upload_bodies(
        if options.quick { 2 } else { 5 },
        upload_lines,
        "big",
    ));
    let size = uploads.first().map(Bytes::len).unwrap_or(0);
    let big = load(&server, uploads, 1).await;
    line(format!(
        "## {upload_lines}-line upload ({:.1} MB)\n\nacknowledged in p50 **{:.0} ms**, max {:.0} ms over {} uploads (target for 10,000 lines: < 250 ms); peak RSS {:.1} MiB\n",
        size as f64 / 1e6,
        big.latency.p50,
        big.latency.max,
        big.acknowledged,
        mebibytes(big.peak_resident_bytes)
    ));

    // (3) Cost growth with devices per callback, 16 connections.
    line("## Cost by devices per callback (16 connections)\n".to_owned());
    line("| devices per callback | callbacks | callbacks/s | devices/s | p50 ms | p99 ms | peak RSS MiB |".to_owned());
    line("|---|---|---|---|---|---|---|".to_owned());
    let scale = if options.quick { 10 } else { 1 };
    let sizes: &[(usize, usize)] = if options.smoke {
        &[(1, 500), (100, 50)]
    } else {
        &[(1, 5_000), (100, 500), (1_000, 50), (10_000, 10)]
    };
    for &(devices, count) in sizes {
        let count = (count / scale).max(2);
        let bodies = if devices == 1 {
            carrier_bodies(count, &format!("scale-{devices}"))
        } else {
            upload_bodies(count, devices, &format!("scale-{devices}"))
        };
        let result = load(&server, Arc::new(bodies), 16).await;
        line(format!(
            "| {devices} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} |",
            result.acknowledged,
            result.per_second(),
            result.per_second() * devices as f64,
            result.latency.p50,
            result.latency.p99,
            mebibytes(result.peak_resident_bytes)
        ));
    }
    line(format!(
        "\nlistener RSS after the run: {:.1} MiB",
        mebibytes(server.resident_bytes())
    ));
    drop(server);

    scale_out(&options, &mut line).await;
    events_on_off(&options, &mut line).await;

    if options.smoke {
        println!("\n(smoke run under cargo test; `cargo bench --bench ack` measures)");
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("benchmark-report.md");
    if std::fs::write(&path, &report).is_ok() {
        println!("\n(report written to {})", path.display());
    }
}

// ---------------------------------------------------------------------------------------------
// Events: throughput with the outbox off, on, and on with a webhook endpoint; delivery latency.

const BENCH_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn events_on_off(options: &Options, line: &mut impl FnMut(String)) {
    line("## Events on vs off (jobs of ten)\n".to_owned());
    line("| round | events | acknowledged/s | p50 ms | p99 ms | delivered | delivery p50 ms | delivery p99 ms |".to_owned());
    line("|---|---|---|---|---|---|---|---|".to_owned());
    let mut rates: [Vec<f64>; 3] = Default::default();
    for round in 1..=options.rounds {
        for (index, mode) in ["off", "on", "on + webhook"].into_iter().enumerate() {
            let receiver = m2m_listener::simulate::receiver::EventReceiver::start(
                "127.0.0.1:0".parse().expect("address"),
                BENCH_SECRET,
            )
            .await
            .expect("receiver");
            let url = format!("http://{}/", receiver.address);
            let mut settings = vec![("M2M_STORAGE__SYNCHRONOUS", options.synchronous.as_str())];
            match mode {
                "off" => settings.push(("M2M_EVENTS__ENABLED", "false")),
                "on" => {}
                _ => settings.extend([
                    ("M2M_EVENTS__WEBHOOKS__0__NAME", "bench"),
                    ("M2M_EVENTS__WEBHOOKS__0__URL", url.as_str()),
                    ("M2M_EVENTS__WEBHOOKS__0__SECRET", BENCH_SECRET),
                ]),
            }
            let server = start_listener_with("listener", &settings);
            let warm_up = Arc::new(carrier_bodies_per_job(
                500,
                10,
                &format!("events-warm-{round}-{index}"),
            ));
            load(&server, warm_up, options.connections).await;
            let bodies = Arc::new(carrier_bodies_per_job(
                options.callbacks,
                10,
                &format!("events-{round}-{index}"),
            ));
            let result = load(&server, bodies, options.connections).await;
            rates[index].push(result.per_second());
            let (delivered, p50, p99) = if mode == "on + webhook" {
                // Every callback's outcome, warm-up included (the jobs are not registered, so
                // none finishes).
                let expected = (options.callbacks + 500) as u64;
                let deadline = Instant::now() + Duration::from_secs(120);
                while receiver.summary().events < expected && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let summary = receiver.summary();
                (
                    format!("{} of {expected}", summary.events),
                    format!("{:.1}", summary.latency_ms.p50),
                    format!("{:.1}", summary.latency_ms.p99),
                )
            } else {
                ("-".to_owned(), "-".to_owned(), "-".to_owned())
            };
            line(format!(
                "| {round} | {mode} | {:.0} | {:.2} | {:.2} | {delivered} | {p50} | {p99} |",
                result.per_second(),
                result.latency.p50,
                result.latency.p99,
            ));
            drop(server);
        }
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    };
    let [mut off, mut on, mut webhook] = rates;
    let (off, on, webhook) = (median(&mut off), median(&mut on), median(&mut webhook));
    line(format!(
        "\nthroughput with events on / off: **{:.2}**, with a webhook endpoint / off: **{:.2}** (median {on:.0}/s and {webhook:.0}/s vs {off:.0}/s; target ≥ 0.90)\n",
        on / off.max(1e-9),
        webhook / off.max(1e-9),
    ));
}

// ---------------------------------------------------------------------------------------------
// Scale-out: replicas on one PostgreSQL database.

/// A fresh, empty schema on the benchmark's PostgreSQL server; the URL that selects it.
async fn fresh_schema(name: &str) -> String {
    let base = std::env::var("M2M_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| panic!("PostgreSQL at {base}: {error}"));
    tokio::spawn(connection);
    let schema = format!("m2m_bench_{name}");
    client
        .batch_execute(&format!(
            "SET client_min_messages = warning; DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .expect("schema");
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}options=-c%20search_path%3D{schema}")
}

/// Throughput of 1, 2 and 3 listener processes sharing one PostgreSQL database, beside one
/// listener on SQLite, on the same load; then the same callbacks sent to all three replicas at
/// once (every message stored once, twice refused as a re-delivery).
async fn scale_out(options: &Options, line: &mut impl FnMut(String)) {
    line(format!(
        "## Scale-out: replicas on one PostgreSQL database ({} connections)\n",
        options.connections
    ));
    line("| backend | replicas | acknowledged/s | p50 ms | p99 ms | max ms | failed | peak RSS MiB (largest replica) |".to_owned());
    line("|---|---|---|---|---|---|---|---|".to_owned());
    let report =
        |line: &mut dyn FnMut(String), backend: &str, replicas: usize, result: &LoadResult| {
            line(format!(
                "| {backend} | {replicas} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.1} |",
                result.per_second(),
                result.latency.p50,
                result.latency.p99,
                result.latency.max,
                result.failed,
                mebibytes(result.peak_resident_bytes)
            ));
        };
    let sqlite = start_listener(&options.synchronous);
    load(
        &sqlite,
        Arc::new(carrier_bodies(500, "scale-warm-sqlite")),
        options.connections,
    )
    .await;
    let result = load(
        &sqlite,
        Arc::new(carrier_bodies(options.callbacks, "scale-sqlite")),
        options.connections,
    )
    .await;
    report(line, "SQLite", 1, &result);
    drop(sqlite);
    for replicas in 1..=3 {
        let url = fresh_schema(&format!("{replicas}")).await;
        let servers: Vec<Server> = (0..replicas)
            .map(|_| start_listener_with("replica", &[("M2M_STORAGE__URL", url.as_str())]))
            .collect();
        let targets: Vec<&Server> = servers.iter().collect();
        let tag = format!("scale-pg-{replicas}");
        load_across(
            &targets,
            Arc::new(carrier_bodies(500, &format!("{tag}-warm"))),
            options.connections,
            1,
        )
        .await;
        let result = load_across(
            &targets,
            Arc::new(carrier_bodies(options.callbacks, &tag)),
            options.connections,
            1,
        )
        .await;
        report(line, "PostgreSQL", replicas, &result);
        if replicas == 3 {
            let fan_out = load_across(
                &targets,
                Arc::new(carrier_bodies(options.callbacks / 3, "scale-pg-fan-out")),
                options.connections,
                3,
            )
            .await;
            line(format!(
                "\nSame message to all 3 replicas at once: **{:.0} messages/s** ({:.0} POSTs/s), p50 {:.2} ms, p99 {:.2} ms, {} failed\n",
                fan_out.per_second(),
                fan_out.per_second() * 3.0,
                fan_out.latency.p50,
                fan_out.latency.p99,
                fan_out.failed
            ));
        }
    }
}
