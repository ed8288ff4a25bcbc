//! `m2m-listener simulate`: a stand-in for the platform, for load tests, demos and the benchmark.
//!
//! It plans realistic jobs (activations and deactivations with failures carrying real catalog
//! fault codes, uploads split over several callbacks, MO SMS), optionally registers them, and posts
//! their callbacks the way the platform does: a callback not answered 2xx in time is re-sent with
//! `CallbackCount` incremented after the retry interval, until `MaxCallbackThreshold` attempts.
//! One departure: a callback refused with a 4xx (wrong credentials, a source not allowed, not a
//! callback, too large; not 408 or 429) is not re-sent, because against this listener it can only
//! be refused again, and a wrong `--password` should fail the run at once, not after 15 minutes.
//! At the end it checks through the API that every acknowledged callback was stored.

pub mod payloads;
pub mod platform;
pub mod receiver;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};

use crate::catalog;
use crate::client::ApiClient;
use payloads::{CarrierResult, Envelope};

#[derive(Clone, Debug, clap::Args)]
pub struct SimulateOptions {
    /// Also run a Standard Webhooks receiver on this address (configure it as an
    /// `[[events.webhooks]]` url): it verifies signatures and counts events and their latency.
    #[arg(long, value_name = "ADDR")]
    pub receive: Option<std::net::SocketAddr>,
    /// The receiver's signing secret (`whsec_...`; from the environment, not the command line).
    #[arg(long, env = "M2M_SIMULATE_RECEIVE_SECRET", hide_env_values = true)]
    pub receive_secret: Option<String>,
    /// After the callbacks, how long the receiver waits for events still coming.
    #[arg(long, default_value_t = 10)]
    pub receive_wait_s: u64,
    /// The callback URL to post to.
    #[arg(long, default_value = "http://127.0.0.1:9001/")]
    pub url: String,
    /// Callback username (default: the first configured pair, or the generated one).
    #[arg(long)]
    pub username: Option<String>,
    /// Callback password (default: as for --username).
    #[arg(long)]
    pub password: Option<String>,
    /// Activation and deactivation jobs to simulate (half each).
    #[arg(long, default_value_t = 20)]
    pub jobs: usize,
    #[arg(long, default_value_t = 10)]
    pub devices_per_job: usize,
    /// Share of devices whose callback reports a fault (a real catalog code).
    #[arg(long, default_value_t = 0.1)]
    pub failure_ratio: f64,
    /// Upload jobs to simulate.
    #[arg(long, default_value_t = 2)]
    pub uploads: usize,
    #[arg(long, default_value_t = 100)]
    pub upload_lines: usize,
    /// Upload lines per callback: an upload is split over several callbacks, then a final one.
    #[arg(long, default_value_t = 50)]
    pub lines_per_callback: usize,
    /// MO SMS callbacks to send.
    #[arg(long, default_value_t = 5)]
    pub sms: usize,
    /// Share of carrier callbacks sent in the REST API's JSON form.
    #[arg(long, default_value_t = 0.0)]
    pub json_ratio: f64,
    /// Register every job through the API before sending its callbacks.
    #[arg(long)]
    pub register: bool,
    /// Callbacks in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Callbacks started per second (0: as fast as the concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Wait before re-sending a callback that was not acknowledged (the platform waits ~5 minutes).
    #[arg(long, default_value_t = 300_000)]
    pub retry_interval_ms: u64,
    /// Attempts per callback (the platform's MaxCallbackThreshold).
    #[arg(long, default_value_t = 4)]
    pub max_attempts: u32,
    /// An attempt not answered within this is a failed attempt.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Share of callbacks re-sent while their first attempt is still running, as the platform has
    /// been seen to do after ~4 s.
    #[arg(long, default_value_t = 0.0)]
    pub early_redelivery_ratio: f64,
    #[arg(long, default_value_t = 4_000)]
    pub early_redelivery_delay_ms: u64,
    /// Seed of the random choices (failures, JSON form, early re-deliveries).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Skip the final check through the API.
    #[arg(long)]
    pub no_verify: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// The platform's REST side (`--platform-listen`), instead of a one-off run against --url.
    #[command(flatten)]
    pub platform: platform::PlatformOptions,
}

/// What a planned callback is, so that it can be rendered for any attempt and checked afterwards.
#[derive(Clone, Debug)]
enum Payload {
    Carrier {
        request_id: String,
        devices: Vec<(String, String)>,
        mdn: String,
        failure: Option<(String, String)>,
        activate: bool,
        json: bool,
    },
    UploadChunk {
        request_id: String,
        lines: Vec<(String, String, String)>,
        counts: (u32, u32, u32, u32),
    },
    Sms {
        mdn: String,
        message: String,
    },
}

impl Payload {
    fn render(&self, envelope: Envelope<'_>) -> String {
        match self {
            Payload::Carrier {
                request_id,
                devices,
                mdn,
                failure,
                activate,
                json,
            } => {
                let devices: Vec<(&str, &str)> = devices
                    .iter()
                    .map(|(kind, id)| (kind.as_str(), id.as_str()))
                    .collect();
                let result = match failure {
                    Some((code, message)) => CarrierResult::Failed { code, message },
                    None if *activate => CarrierResult::Activated { mdn },
                    None => CarrierResult::Deactivated,
                };
                if *json {
                    payloads::json_carrier_callback(envelope, request_id, &devices, result)
                } else {
                    payloads::carrier_callback(envelope, request_id, &devices, result)
                }
            }
            Payload::UploadChunk {
                request_id,
                lines,
                counts,
            } => {
                let lines: Vec<payloads::UploadLine<'_>> = lines
                    .iter()
                    .map(|(iccid, imei, status)| (iccid.as_str(), imei.as_str(), status.as_str()))
                    .collect();
                payloads::upload_callback(envelope, request_id, &lines, *counts)
            }
            Payload::Sms { mdn, message } => payloads::sms_mo_callback(envelope, mdn, message),
        }
    }
}

/// A job to register, and the callbacks it produces.
struct PlannedJob {
    request_id: String,
    operation: &'static str,
    expected_devices: usize,
}

struct Plan {
    jobs: Vec<PlannedJob>,
    callbacks: Vec<Payload>,
}

fn plan(options: &SimulateOptions, run: &str) -> Plan {
    let mut random = StdRng::seed_from_u64(options.seed);
    let faults: Vec<(String, String)> = catalog::catalog()
        .entries()
        .iter()
        .filter(|entry| entry.source == "thingspace_sync_errors" && !entry.code.contains('~'))
        .map(|entry| {
            (
                format!("CarrierService.{}", entry.code),
                entry.message.clone(),
            )
        })
        .collect();
    let mut jobs = Vec::new();
    let mut callbacks = Vec::new();
    // Device numbers unique to this run, so that repeated runs against one database do not collide.
    let run_number: u64 = run.bytes().fold(0u64, |sum, byte| {
        sum.wrapping_mul(31).wrapping_add(u64::from(byte))
    }) % 1_000_000;
    let mut device = 0u64;
    let mut next_device = || {
        device += 1;
        (
            format!("35{run_number:06}{device:07}"),
            format!("8914{run_number:06}{device:010}"),
            format!("9{run_number:05}{device:04}"),
        )
    };
    for job in 0..options.jobs {
        let activate = job % 2 == 0;
        let request_id = format!("sim-{run}-job-{job:05}");
        for _ in 0..options.devices_per_job {
            let (imei, iccid, mdn) = next_device();
            let failure = (random.random::<f64>() < options.failure_ratio && !faults.is_empty())
                .then(|| faults[random.random_range(0..faults.len())].clone());
            callbacks.push(Payload::Carrier {
                request_id: request_id.clone(),
                devices: vec![("IMEI".to_owned(), imei), ("ICCID".to_owned(), iccid)],
                mdn,
                failure,
                activate,
                json: random.random::<f64>() < options.json_ratio,
            });
        }
        jobs.push(PlannedJob {
            request_id,
            operation: if activate { "activate" } else { "deactivate" },
            expected_devices: options.devices_per_job,
        });
    }
    let chunk = options.lines_per_callback.max(1);
    for upload in 0..options.uploads {
        let request_id = format!("sim-{run}-upload-{upload:04}");
        let total = u32::try_from(options.upload_lines).unwrap_or(u32::MAX);
        let mut sent = 0u32;
        let mut failed_lines = 0u32;
        let lines: Vec<(String, String, String)> = (0..options.upload_lines)
            .map(|_| {
                let (imei, iccid, _) = next_device();
                let status = if random.random::<f64>() < options.failure_ratio {
                    failed_lines += 1;
                    format!("IMEI {imei} is invalid")
                } else {
                    "Device upload successful".to_owned()
                };
                (iccid, imei, status)
            })
            .collect();
        let mut failed_so_far = 0u32;
        for part in lines.chunks(chunk) {
            sent += u32::try_from(part.len()).unwrap_or(0);
            failed_so_far += u32::try_from(
                part.iter()
                    .filter(|line| !line.2.ends_with("successful"))
                    .count(),
            )
            .unwrap_or(0);
            callbacks.push(Payload::UploadChunk {
                request_id: request_id.clone(),
                lines: part.to_vec(),
                counts: (total, total - sent, sent - failed_so_far, failed_so_far),
            });
        }
        // The platform's final message: counts only.
        callbacks.push(Payload::UploadChunk {
            request_id: request_id.clone(),
            lines: Vec::new(),
            counts: (total, 0, total - failed_lines, failed_lines),
        });
        jobs.push(PlannedJob {
            request_id,
            operation: "upload_devices",
            expected_devices: options.upload_lines,
        });
    }
    for message in 0..options.sms {
        let (_, _, mdn) = next_device();
        callbacks.push(Payload::Sms {
            mdn,
            message: format!("sim {run} message {message}: TEMP=21.5"),
        });
    }
    Plan { jobs, callbacks }
}

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    acknowledged: AtomicU64,
    resent: AtomicU64,
    early_redeliveries: AtomicU64,
    given_up: AtomicU64,
    refused: AtomicU64,
}

/// How one attempt ended.
enum Attempt {
    /// Answered 2xx in time.
    Acknowledged,
    /// Answered with a status that re-sending cannot change (see the module's documentation).
    Refused(hyper::StatusCode),
    /// Not answered in time, not reachable, or answered with a status worth retrying (5xx, 408,
    /// 429): re-sent, as the platform does.
    Failed,
}

/// Whether the platform's re-send could get a different answer than `status`.
fn is_final_refusal(status: hyper::StatusCode) -> bool {
    status.is_client_error()
        && status != hyper::StatusCode::REQUEST_TIMEOUT
        && status != hyper::StatusCode::TOO_MANY_REQUESTS
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Spaces out attempts to the requested rate.
struct Pace {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl Pace {
    async fn wait(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + interval;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

struct Driver {
    client: HttpClient,
    url: hyper::Uri,
    username: String,
    password: String,
    options: SimulateOptions,
    slots: Semaphore,
    pace: Pace,
    counters: Counters,
    latencies: std::sync::Mutex<Vec<f64>>,
    /// Callbacks refused for good, by status code.
    refusals: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl Driver {
    /// One attempt.
    async fn attempt(&self, payload: &Payload, callback_count: u32) -> Attempt {
        let Ok(_slot) = self.slots.acquire().await else {
            return Attempt::Failed;
        };
        self.pace.wait().await;
        let body = payload.render(Envelope {
            username: &self.username,
            password: &self.password,
            callback_count,
            max_callback_threshold: self.options.max_attempts,
        });
        let content_type = if body.starts_with('{') {
            "application/json"
        } else {
            "text/xml; charset=utf-8"
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)));
        let Ok(request) = request else {
            return Attempt::Failed;
        };
        self.counters.attempts.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let answered =
            tokio::time::timeout(Duration::from_millis(self.options.timeout_ms), async {
                let response = self.client.request(request).await.ok()?;
                let status = response.status();
                // Drain the body so that the connection goes back to the pool.
                let _ = response.into_body().collect().await;
                Some(status)
            })
            .await;
        match answered {
            Ok(Some(status)) if status.is_success() => {
                if let Ok(mut latencies) = self.latencies.lock() {
                    latencies.push(started.elapsed().as_secs_f64());
                }
                Attempt::Acknowledged
            }
            Ok(Some(status)) if is_final_refusal(status) => Attempt::Refused(status),
            _ => Attempt::Failed,
        }
    }

    /// Sends one callback like the platform: re-sent until acknowledged or out of attempts.
    async fn deliver(self: Arc<Self>, payload: Arc<Payload>, early_redelivery: bool) -> bool {
        if early_redelivery {
            let (driver, payload) = (Arc::clone(&self), Arc::clone(&payload));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(
                    driver.options.early_redelivery_delay_ms,
                ))
                .await;
                driver
                    .counters
                    .early_redeliveries
                    .fetch_add(1, Ordering::Relaxed);
                // Its answer does not decide the callback's fate: the first attempt's does.
                driver.attempt(&payload, 2).await;
            });
        }
        for attempt in 1..=self.options.max_attempts.max(1) {
            match self.attempt(&payload, attempt).await {
                Attempt::Acknowledged => {
                    self.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Attempt::Refused(status) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut refusals) = self.refusals.lock() {
                        *refusals.entry(status.as_u16()).or_default() += 1;
                    }
                    return false;
                }
                Attempt::Failed => {}
            }
            if attempt == self.options.max_attempts {
                break;
            }
            self.counters.resent.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(self.options.retry_interval_ms)).await;
        }
        self.counters.given_up.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// The simulation's result.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub callbacks: u64,
    pub attempts: u64,
    pub acknowledged: u64,
    pub resent: u64,
    pub early_redeliveries: u64,
    /// Callbacks never acknowledged after `--max-attempts` attempts.
    pub given_up: u64,
    /// Callbacks refused for good (a 4xx other than 408 and 429), not re-sent.
    pub refused: u64,
    /// The refusals by status code (`{"403": 4}`).
    pub refused_by_status: std::collections::BTreeMap<u16, u64>,
    /// Acknowledged callbacks that the API does not show (`null` when not verified).
    pub lost: Option<u64>,
    pub seconds: f64,
    pub acknowledged_per_second: f64,
    pub latency_ms: LatencySummary,
    /// What the receiver saw (with `--receive`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver: Option<receiver::ReceiverSummary>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencySummary {
    /// Percentiles of latencies given in seconds, reported in milliseconds.
    pub fn of(latencies: &mut [f64]) -> Self {
        if latencies.is_empty() {
            return Self::default();
        }
        latencies.sort_by(f64::total_cmp);
        let at = |quantile: f64| {
            let index =
                ((latencies.len() as f64 * quantile).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[index] * 1000.0
        };
        Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// Runs the simulation. `api` is used to register jobs and to verify; `None` skips both.
pub async fn run(
    options: SimulateOptions,
    username: String,
    password: String,
    api: Option<ApiClient>,
) -> anyhow::Result<Summary> {
    let receiver = match options.receive {
        Some(address) => {
            let secret = options
                .receive_secret
                .as_deref()
                .context("--receive needs --receive-secret (M2M_SIMULATE_RECEIVE_SECRET)")?;
            Some(receiver::EventReceiver::start(address, secret).await?)
        }
        None => None,
    };
    let now = time::OffsetDateTime::now_utc();
    let run_id = now.unix_timestamp().to_string();
    let since = crate::storage::timestamp(now);
    let plan = plan(&options, &run_id);
    if options.register {
        let api = api
            .as_ref()
            .context("--register needs the API (see --api-url)")?;
        for job in &plan.jobs {
            let registration = json!({"request_id": job.request_id, "operation": job.operation, "expected_devices": job.expected_devices});
            let (status, body) = api
                .send(Method::POST, "/api/v1/jobs", Some(registration.to_string()))
                .await?;
            anyhow::ensure!(
                status.is_success(),
                "registering {} failed: {status} {}",
                job.request_id,
                String::from_utf8_lossy(&body)
            );
        }
    }
    let url: hyper::Uri = options
        .url
        .parse()
        .with_context(|| format!("invalid --url {}", options.url))?;
    let concurrency = options.concurrency.max(1);
    let driver = Arc::new(Driver {
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(concurrency)
            .build_http(),
        url,
        username,
        password,
        slots: Semaphore::new(concurrency),
        pace: Pace {
            interval: (options.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / options.rate)),
            next: Mutex::new(Instant::now()),
        },
        counters: Counters::default(),
        latencies: std::sync::Mutex::new(Vec::with_capacity(plan.callbacks.len())),
        refusals: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        options: options.clone(),
    });
    let started = Instant::now();
    let total = plan.callbacks.len() as u64;
    let progress = tokio::spawn(report_progress(Arc::clone(&driver), total));
    let mut random = StdRng::seed_from_u64(options.seed.wrapping_add(1));
    let mut deliveries = tokio::task::JoinSet::new();
    let payloads: Vec<Arc<Payload>> = plan.callbacks.into_iter().map(Arc::new).collect();
    for payload in &payloads {
        let early = random.random::<f64>() < options.early_redelivery_ratio;
        deliveries.spawn(Arc::clone(&driver).deliver(Arc::clone(payload), early));
    }
    let outcomes = deliveries.join_all().await;
    // Early re-deliveries still running finish within the timeout.
    tokio::time::sleep(Duration::from_millis(
        options.early_redelivery_delay_ms.min(options.timeout_ms) / 10,
    ))
    .await;
    progress.abort();
    let seconds = started.elapsed().as_secs_f64();
    print_progress(&driver, total);
    // Not eprintln!: a closed stderr (`2>&1 | head -1`) must not end the run with a panic.
    let _ = writeln!(std::io::stderr());

    let acknowledged: Vec<&Payload> = payloads
        .iter()
        .zip(&outcomes)
        .filter(|(_, acknowledged)| **acknowledged)
        .map(|(payload, _)| payload.as_ref())
        .collect();
    let lost = match (&api, options.no_verify) {
        (Some(api), false) => Some(count_lost(api, &acknowledged, &since).await?),
        _ => None,
    };
    let mut latencies = driver
        .latencies
        .lock()
        .map(|latencies| latencies.clone())
        .unwrap_or_default();
    let counters = &driver.counters;
    let receiver = match receiver {
        Some(receiver) => {
            // Until no event arrived for a second, or the wait is over.
            let deadline = Instant::now() + Duration::from_secs(options.receive_wait_s);
            let mut last = receiver.summary().requests;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = receiver.summary().requests;
                if now == last && now > 0 {
                    break;
                }
                last = now;
            }
            Some(receiver.summary())
        }
        None => None,
    };
    Ok(Summary {
        receiver,
        callbacks: total,
        attempts: counters.attempts.load(Ordering::Relaxed),
        acknowledged: counters.acknowledged.load(Ordering::Relaxed),
        resent: counters.resent.load(Ordering::Relaxed),
        early_redeliveries: counters.early_redeliveries.load(Ordering::Relaxed),
        given_up: counters.given_up.load(Ordering::Relaxed),
        refused: counters.refused.load(Ordering::Relaxed),
        refused_by_status: driver
            .refusals
            .lock()
            .map(|refusals| refusals.clone())
            .unwrap_or_default(),
        lost,
        seconds,
        acknowledged_per_second: counters.acknowledged.load(Ordering::Relaxed) as f64
            / seconds.max(1e-9),
        latency_ms: LatencySummary::of(&mut latencies),
    })
}

async fn report_progress(driver: Arc<Driver>, total: u64) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticks.tick().await;
        print_progress(&driver, total);
    }
}

/// One progress line, rewritten in place on a terminal.
fn print_progress(driver: &Driver, total: u64) {
    let counters = &driver.counters;
    // A failed write (stderr closed) only loses the progress line.
    let _ = write!(
        std::io::stderr(),
        "\rcallbacks {total}  attempts {}  acknowledged {}  re-sent {}  given up {}  refused {}   ",
        counters.attempts.load(Ordering::Relaxed),
        counters.acknowledged.load(Ordering::Relaxed),
        counters.resent.load(Ordering::Relaxed),
        counters.given_up.load(Ordering::Relaxed),
        counters.refused.load(Ordering::Relaxed),
    );
}

/// Acknowledged callbacks that the API does not show: a carrier callback's device must be among
/// its job's devices, every line of an upload callback too, and every MO SMS must be a stored
/// `sms_mo` delivery.
async fn count_lost(
    api: &ApiClient,
    acknowledged: &[&Payload],
    since: &str,
) -> anyhow::Result<u64> {
    let mut reported: HashMap<String, HashSet<(String, String)>> = HashMap::new();
    let mut lost = 0u64;
    let mut sms_expected = 0u64;
    for payload in acknowledged {
        let (request_id, wanted): (&str, Vec<(String, String)>) = match payload {
            Payload::Carrier {
                request_id,
                devices,
                ..
            } => (request_id, devices.iter().take(1).cloned().collect()),
            Payload::UploadChunk {
                request_id, lines, ..
            } => (
                request_id,
                lines
                    .iter()
                    .map(|(iccid, _, _)| ("ICCID".to_owned(), iccid.clone()))
                    .collect(),
            ),
            Payload::Sms { .. } => {
                sms_expected += 1;
                continue;
            }
        };
        if !reported.contains_key(request_id) {
            let path = format!(
                "/api/v1/jobs/{}/devices",
                form_urlencoded::byte_serialize(request_id.as_bytes()).collect::<String>()
            );
            let (status, body) = api.send(Method::GET, &path, None).await?;
            let mut identifiers = HashSet::new();
            if status.is_success() {
                let page: Value = serde_json::from_slice(&body)?;
                for device in page["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|device| device["status"] != "pending" && device["status"] != "missing")
                {
                    for identifier in device["identifiers"].as_array().into_iter().flatten() {
                        identifiers.insert((
                            identifier["kind"].as_str().unwrap_or_default().to_owned(),
                            identifier["id"].as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                }
            }
            reported.insert(request_id.to_owned(), identifiers);
        }
        let known = &reported[request_id];
        if !wanted.iter().all(|identifier| known.contains(identifier)) {
            lost += 1;
        }
    }
    if sms_expected > 0 {
        let stored = count_stored_sms(api, since).await?;
        lost += sms_expected.saturating_sub(stored);
    }
    Ok(lost)
}

/// Stored `sms_mo` deliveries received since `since` (newest first, so paging stops there).
async fn count_stored_sms(api: &ApiClient, since: &str) -> anyhow::Result<u64> {
    let mut stored = 0u64;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => {
                format!("/api/v1/deliveries?kind=sms_mo&result=stored&limit=1000&cursor={cursor}")
            }
            None => "/api/v1/deliveries?kind=sms_mo&result=stored&limit=1000".to_owned(),
        };
        let (status, body) = api.send(Method::GET, &path, None).await?;
        anyhow::ensure!(status.is_success(), "listing deliveries failed: {status}");
        let page: Value = serde_json::from_slice(&body)?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        let recent = items
            .iter()
            .filter(|item| item["received_at"].as_str().is_some_and(|at| at >= since))
            .count();
        stored += recent as u64;
        match page["next_cursor"].as_str() {
            Some(next) if recent == items.len() => cursor = Some(next.to_owned()),
            _ => break,
        }
    }
    Ok(stored)
}
