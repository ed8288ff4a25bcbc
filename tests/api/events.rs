//! The event outbox (issue 15): events written with their cause, the feed, Standard Webhooks
//! endpoints (a real HTTP receiver here, signatures checked by the Python `standardwebhooks`
//! package), NATS JetStream (the real nats-server at 127.0.0.1:4222).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use m2m_listener::configuration::{NatsSettings, Settings, WebhookSettings};
use m2m_listener::domain::Secret;
use serde_json::{Value, json};

use crate::helpers::{
    CarrierResult, carrier_callback, sms_mo_callback, spawn_app_with, with_callback_count,
};

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the receiver was sent.
#[derive(Clone, Debug)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: String,
}

/// How the receiver answers: statuses in turn (then 200), or never.
#[derive(Default)]
struct Script {
    statuses: VecDeque<(u16, Option<&'static str>)>,
    hang: bool,
}

/// A real HTTP endpoint on loopback that records every request.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Script>>,
}

impl Receiver {
    pub async fn start() -> Self {
        Self::start_on(0).await
    }

    pub async fn start_on(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("receiver binds");
        let port = listener.local_addr().expect("address").port();
        let receiver = Receiver {
            url: format!("http://127.0.0.1:{port}/hooks"),
            received: Arc::default(),
            script: Arc::default(),
        };
        let serving = receiver.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let serving = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let serving = serving.clone();
                        async move { serving.answer(request).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        receiver
    }

    async fn answer(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (id, timestamp, signature) = (
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        );
        let body = request
            .into_body()
            .collect()
            .await
            .map(|body| body.to_bytes())
            .unwrap_or_default();
        let (hang, answer) = {
            let mut script = self.script.lock().unwrap();
            (script.hang, script.statuses.pop_front())
        };
        if hang {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        self.received.lock().unwrap().push(Received {
            id,
            timestamp,
            signature,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        let (status, retry_after) = answer.unwrap_or((200, None));
        let mut response = hyper::Response::builder().status(status);
        if let Some(retry_after) = retry_after {
            response = response.header("retry-after", retry_after);
        }
        Ok(response.body(Full::new(Bytes::new())).expect("response"))
    }

    fn answer_with(&self, statuses: &[(u16, Option<&'static str>)]) {
        self.script.lock().unwrap().statuses = statuses.iter().copied().collect();
    }

    fn hang(&self) {
        self.script.lock().unwrap().hang = true;
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `count` requests arrived (or panics after 20 s).
    pub async fn wait_for(&self, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver got {} of {count} requests: {received:?}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn webhook(name: &str, url: &str, events: &[&str]) -> WebhookSettings {
    WebhookSettings {
        name: name.to_owned(),
        url: url.to_owned(),
        secret: Some(Secret::new(SECRET)),
        secrets: Vec::new(),
        events: events.iter().map(|event| (*event).to_owned()).collect(),
        retry_schedule_s: vec![1, 1],
        timeout_ms: 2000,
    }
}

/// Fast polling for tests.
pub fn fast(settings: &mut Settings) {
    settings.events.poll_interval_ms = 50;
}

/// Checks every request's signature with the Python `standardwebhooks` package (not our code);
/// returns how many it verified.
pub fn verify_with_python(received: &[Received]) -> usize {
    let requests: Vec<Value> = received
        .iter()
        .map(|request| {
            json!({"id": request.id, "timestamp": request.timestamp,
                   "signature": request.signature, "body": request.body})
        })
        .collect();
    let script = r#"
import json, sys
from standardwebhooks import Webhook
requests = json.load(sys.stdin)
hook = Webhook(sys.argv[1])
for request in requests:
    hook.verify(request["body"], {"webhook-id": request["id"],
                                  "webhook-timestamp": request["timestamp"],
                                  "webhook-signature": request["signature"]})
print(len(requests))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, SECRET])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (pip install standardwebhooks)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(Value::Array(requests).to_string().as_bytes())
        .expect("written");
    let output = child.wait_with_output().expect("python3 finishes");
    assert!(
        output.status.success(),
        "standardwebhooks refused a signature: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("a count")
}

/// Polls `check` on the event's detail until it holds (or panics after 20 s).
async fn wait_for_detail(
    app: &crate::helpers::TestApp,
    id: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let detail = app.get_json(&format!("/api/v1/events/{id}")).await;
        if check(&detail) {
            return detail;
        }
        assert!(Instant::now() < deadline, "never reached: {detail}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn finish_a_job(app: &crate::helpers::TestApp, request_id: &str) {
    let registered = app
        .register(json!({"request_id": request_id, "operation": "activate",
                         "devices": [{"kind": "IMEI", "id": "350000000000101"}]}))
        .await;
    assert_eq!(registered.status(), 201);
    let body = carrier_callback(
        request_id,
        &[("IMEI", "350000000000101")],
        CarrierResult::Activated { mdn: "5550000101" },
    );
    assert_eq!(app.post_callback(body).await.status(), 200);
}

#[tokio::test]
async fn a_jobs_last_callback_sends_one_job_finished_event_whose_signature_python_standardwebhooks_accepts()
 {
    let receiver = Receiver::start().await;
    let url = receiver.url.clone();
    let app = spawn_app_with(move |settings| {
        fast(settings);
        settings.events.webhooks = vec![webhook("ops", &url, &["job.finished"])];
    })
    .await;
    finish_a_job(&app, "evt-job-1").await;

    let received = receiver.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = if receiver.received().len() > received.len() {
        receiver.received()
    } else {
        received
    };
    assert_eq!(received.len(), 1, "one event: {received:?}");
    let body: Value = serde_json::from_str(&received[0].body).expect("JSON body");
    assert_eq!(body["type"], "job.finished");
    assert_eq!(body["id"], received[0].id);
    assert!(received[0].id.starts_with("evt_"));
    assert_eq!(body["data"]["request_id"], "evt-job-1");
    assert_eq!(body["data"]["state"], "completed");
    assert_eq!(
        body["data"],
        app.get_json("/api/v1/jobs/evt-job-1").await,
        "the data is the job as the API returns it"
    );
    assert_eq!(verify_with_python(&received), 1);

    let detail = wait_for_detail(&app, &received[0].id, |detail| {
        detail["deliveries"][0]["state"] == "delivered"
    })
    .await;
    assert_eq!(detail["attempts"].as_array().map(Vec::len), Some(1));
    assert_eq!(detail["attempts"][0]["status"], 200);
    assert_eq!(detail["attempts"][0]["result"], "delivered");
}

#[tokio::test]
async fn the_feed_lists_each_fact_once_oldest_first_and_resumes_after_a_cursor() {
    let app = spawn_app_with(|_| {}).await;
    finish_a_job(&app, "evt-feed").await;
    // A re-delivery of the same callback is no new fact.
    let again = carrier_callback(
        "evt-feed",
        &[("IMEI", "350000000000101")],
        CarrierResult::Activated { mdn: "5550000101" },
    );
    assert_eq!(app.post_callback(again).await.status(), 200);
    assert_eq!(
        app.post_callback(sms_mo_callback("5550000101", "hello"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post_callback(crate::helpers::fixture("activate_seed004_ambiguous.xml"))
            .await
            .status(),
        200
    );

    let feed = app.get_json("/api/v1/events").await;
    let types: Vec<&str> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "device.outcome",
            "job.finished",
            "device.message",
            "delivery.quarantined"
        ],
        "{feed}"
    );
    let message = &feed["items"][2]["data"];
    assert_eq!(message["text"], "hello");
    assert_eq!(feed["items"][0]["data"]["status"], "succeeded");

    let first = app.get_json("/api/v1/events?limit=2").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_owned();
    let rest = app
        .get_json(&format!("/api/v1/events?after={cursor}"))
        .await;
    assert_eq!(rest["items"][0]["type"], "device.message");
    assert!(rest["next_cursor"].is_null());

    let jobs = app.get_json("/api/v1/events?type=job.finished").await;
    assert_eq!(jobs["items"].as_array().unwrap().len(), 1);
    assert_eq!(app.get_api("/api/v1/events?type=nope").await.status(), 400);
    assert_eq!(app.get_api("/api/v1/events?after=12").await.status(), 400);
    assert_eq!(app.get_api("/api/v1/events/evt_x").await.status(), 400);
    assert_eq!(
        app.get_api("/api/v1/events/evt_000000099999")
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn with_events_off_nothing_is_recorded() {
    let app = spawn_app_with(|settings| settings.events.enabled = false).await;
    finish_a_job(&app, "evt-off").await;
    assert_eq!(app.count("SELECT count(*) FROM events"), 0);
    let feed = app.get_json("/api/v1/events").await;
    assert_eq!(feed["items"], json!([]));
}

#[tokio::test]
async fn a_receiver_answering_500_then_200_gets_the_event_at_the_next_scheduled_attempt() {
    let receiver = Receiver::start().await;
    receiver.answer_with(&[(500, None)]);
    let url = receiver.url.clone();
    let app = spawn_app_with(move |settings| {
        fast(settings);
        settings.events.webhooks = vec![webhook("ops", &url, &["job.finished"])];
    })
    .await;
    finish_a_job(&app, "evt-retry").await;
    let received = receiver.wait_for(2).await;
    assert_eq!(received[0].id, received[1].id, "the same webhook-id");
    assert_eq!(received[0].body, received[1].body);
    let detail = wait_for_detail(&app, &received[0].id, |detail| {
        detail["deliveries"][0]["state"] == "delivered"
    })
    .await;
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{detail}");
    assert_eq!(
        (&attempts[0]["status"], &attempts[0]["result"]),
        (&json!(500), &json!("failed"))
    );
    assert_eq!(
        (&attempts[1]["status"], &attempts[1]["result"]),
        (&json!(200), &json!("delivered"))
    );
    assert_eq!(attempts[1]["attempt"], 2);
    assert_eq!(verify_with_python(&received), 2);
}

#[tokio::test]
async fn an_endpoint_that_keeps_failing_is_dead_lettered_and_a_redelivery_is_a_recorded_manual_attempt()
 {
    let receiver = Receiver::start().await;
    receiver.answer_with(&[(503, Some("0")), (301, None), (500, None)]);
    let url = receiver.url.clone();
    let app = spawn_app_with(move |settings| {
        fast(settings);
        settings.events.webhooks = vec![webhook("ops", &url, &["job.finished"])];
    })
    .await;
    finish_a_job(&app, "evt-dead").await;
    let received = receiver.wait_for(3).await;
    let id = received[0].id.clone();
    let detail = wait_for_detail(&app, &id, |detail| {
        detail["deliveries"][0]["state"] == "dead"
    })
    .await;
    assert_eq!(detail["attempts"].as_array().unwrap().len(), 3, "{detail}");
    let dead = app
        .client
        .post(format!("{}/api/v1/events/{id}/redeliver", app.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(dead.status(), 202);
    receiver.wait_for(4).await;
    let detail = wait_for_detail(&app, &id, |detail| {
        detail["deliveries"][0]["state"] == "delivered"
    })
    .await;
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 4);
    assert_eq!(attempts[3]["manual"], true);
    assert_eq!(attempts[3]["attempt"], 4);
}

#[tokio::test]
async fn a_receiver_answering_410_is_disabled_and_sent_nothing_more() {
    let receiver = Receiver::start().await;
    receiver.answer_with(&[(410, None)]);
    let url = receiver.url.clone();
    let app = spawn_app_with(move |settings| {
        fast(settings);
        settings.events.webhooks = vec![webhook("ops", &url, &["device.outcome"])];
    })
    .await;
    finish_a_job(&app, "evt-gone").await;
    let received = receiver.wait_for(1).await;
    wait_for_detail(&app, &received[0].id, |detail| {
        detail["deliveries"][0]["state"] == "disabled"
    })
    .await;
    // Later events are held, not sent.
    let body = carrier_callback(
        "evt-gone-2",
        &[("IMEI", "350000000000102")],
        CarrierResult::Activated { mdn: "5550000102" },
    );
    assert_eq!(app.post_callback(body).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1);
    let metrics = app.get_api("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"m2m_event_attempts_total{result="disabled",sink="ops"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"m2m_events_pending{sink="ops"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_dead_endpoint_delays_neither_callbacks_nor_another_endpoint() {
    let stuck = Receiver::start().await;
    stuck.hang();
    let healthy = Receiver::start().await;
    let (stuck_url, healthy_url) = (stuck.url.clone(), healthy.url.clone());
    let app = spawn_app_with(move |settings| {
        fast(settings);
        let mut slow = webhook("stuck", &stuck_url, &[]);
        slow.timeout_ms = 60_000;
        settings.events.webhooks = vec![slow, webhook("healthy", &healthy_url, &[])];
    })
    .await;
    for index in 0..5 {
        let body = carrier_callback(
            &format!("evt-stuck-{index}"),
            &[("IMEI", "350000000000103")],
            CarrierResult::Activated { mdn: "5550000103" },
        );
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    let received = healthy.wait_for(5).await;
    assert_eq!(received.len(), 5);
    assert!(stuck.received().is_empty(), "the stuck one never answers");
}

#[tokio::test]
async fn events_reach_jetstream_once_each_with_the_event_id_as_nats_msg_id() {
    let stream = format!(
        "M2M_TEST_{}_{}",
        std::process::id(),
        crate::helpers::unique_name()
    );
    let prefix = format!("m2mtest.{}", stream.to_lowercase());
    let nats = NatsSettings {
        url: "nats://127.0.0.1:4222".into(),
        stream: stream.clone(),
        subject_prefix: prefix.clone(),
        events: Vec::new(),
        retry_schedule_s: vec![1, 1],
        timeout_ms: 2000,
    };
    let configured = nats.clone();
    let app = spawn_app_with(move |settings| {
        fast(settings);
        settings.events.nats = Some(configured);
    })
    .await;
    finish_a_job(&app, "evt-nats").await;
    let feed = app.get_json("/api/v1/events").await;
    let ids: Vec<String> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "an outcome and the job: {feed}");
    for id in &ids {
        wait_for_detail(&app, id, |detail| {
            detail["deliveries"][0]["state"] == "delivered"
        })
        .await;
    }
    // A second publish of the same event (a lost acknowledgement, a kill before it was recorded)
    // is dropped by the stream's duplicate window.
    app.client
        .post(format!(
            "{}/api/v1/events/{}/redeliver",
            app.api_url, ids[0]
        ))
        .send()
        .await
        .unwrap();
    wait_for_detail(&app, &ids[0], |detail| {
        detail["attempts"].as_array().map(Vec::len) == Some(2)
            && detail["deliveries"][0]["state"] == "delivered"
    })
    .await;

    let messages = jetstream_messages(&stream).await;
    let mut seen: Vec<String> = messages.iter().map(|(id, _, _)| id.clone()).collect();
    seen.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(seen, expected, "each event once");
    for (id, subject, body) in &messages {
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(&body["id"], id);
        assert_eq!(
            subject,
            &format!("{prefix}.{}", body["type"].as_str().unwrap())
        );
    }
    let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let _ = async_nats::jetstream::new(client)
        .delete_stream(&stream)
        .await;
}

/// Every message in `stream`: (Nats-Msg-Id, subject, body).
pub async fn jetstream_messages(stream: &str) -> Vec<(String, String, String)> {
    let client = async_nats::connect("nats://127.0.0.1:4222")
        .await
        .expect("nats-server at 127.0.0.1:4222 (.ci/run starts one)");
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream(stream).await.expect("the stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut messages = Vec::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            let id = message
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|value| value.as_str().to_owned())
                .unwrap_or_default();
            messages.push((
                id,
                message.subject.to_string(),
                String::from_utf8_lossy(&message.payload).into_owned(),
            ));
        }
    }
    messages
}

#[tokio::test]
async fn a_redelivered_callback_adds_no_event_and_check_config_masks_webhook_secrets() {
    let app = spawn_app_with(|_| {}).await;
    let body = with_callback_count("deactivate_bare.xml", 1);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let before = app.count("SELECT count(*) FROM events");
    let again = with_callback_count("deactivate_bare.xml", 2);
    assert_eq!(app.post_callback(again).await.status(), 200);
    assert_eq!(app.count("SELECT count(*) FROM events"), before);

    let mut settings = Settings::default();
    settings.events.webhooks = vec![webhook("ops", "http://127.0.0.1:9/", &[])];
    let shown = settings.to_masked_toml();
    assert!(
        !shown.contains(SECRET.trim_start_matches("whsec_")),
        "{shown}"
    );
}

#[tokio::test]
async fn a_reprocessed_quarantined_delivery_emits_its_outcomes_once() {
    let app = spawn_app_with(|_| {}).await;
    let quarantined = crate::helpers::fixture("activate_seed004_ambiguous.xml");
    assert_eq!(app.post_callback(quarantined).await.status(), 200);
    let feed = app.get_json("/api/v1/events").await;
    assert_eq!(feed["items"][0]["type"], "delivery.quarantined", "{feed}");
    let id = feed["items"][0]["data"]["delivery_id"].as_i64().unwrap();
    let malformed = crate::helpers::fixture("activate_seed004_malformed.xml");
    let hex: String = malformed.iter().map(|byte| format!("{byte:02x}")).collect();
    match &app.database {
        crate::helpers::TestDatabase::Sqlite(_) => app.database.execute(&format!(
            "UPDATE raw_bodies SET body = x'{hex}' WHERE delivery_id = {id}"
        )),
        crate::helpers::TestDatabase::Postgres(_) => app.database.execute(&format!(
            "UPDATE raw_bodies SET body = '\\x{hex}'::bytea WHERE delivery_id = {id}"
        )),
    }
    for _ in 0..2 {
        let answer = app
            .client
            .post(format!("{}/api/v1/deliveries/{id}/reprocess", app.api_url))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let outcomes = app.get_json("/api/v1/events?type=device.outcome").await;
    let outcomes = outcomes["items"].as_array().unwrap();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[0]["data"]["delivery_id"], id);
    assert_eq!(
        app.get_json("/api/v1/events?type=delivery.quarantined")
            .await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// The `[events]` settings of a listener process, as a config file in `directory`.
pub fn events_config(directory: &std::path::Path, url: &str) -> std::path::PathBuf {
    let path = directory.join("events.toml");
    std::fs::write(
        &path,
        format!(
            "[events]\npoll_interval_ms = 50\n\n[[events.webhooks]]\nname = \"ops\"\nurl = \"{url}\"\n\
             secret = \"{SECRET}\"\nretry_schedule_s = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n\
             timeout_ms = 2000\n"
        ),
    )
    .expect("config written");
    path
}

/// The real binary on `directory` with the settings file `config`, accepting the `fleet-ops` pair
/// (see [`fleet_envelope`]), so that a test can kill it and start it again on the same data.
fn configured_listener(
    directory: &std::path::Path,
    callback_port: u16,
    api_port: u16,
    config: &std::path::Path,
) -> std::process::Child {
    let (mut command, _) = crate::helpers::listener_command(
        directory,
        callback_port,
        api_port,
        "fleet-ops",
        "s3cret-rotation-A",
    );
    command
        .env("M2M_CONFIG", config)
        .env("M2M_TELEMETRY__LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("listener starts")
}

/// Callbacks with the credentials [`configured_listener`] accepts.
fn fleet_envelope() -> m2m_listener::simulate::payloads::Envelope<'static> {
    m2m_listener::simulate::payloads::Envelope {
        username: "fleet-ops",
        password: "s3cret-rotation-A",
        ..Default::default()
    }
}

/// How long a restarted listener may take to send every event its killed predecessor left: an
/// event that one had leased mid-attempt is tried again once the lease expires, at once on SQLite
/// (one process owns the file, so a start clears every lease) but only after the attempt's
/// timeout (2 s in these configurations) and the lease's margin on PostgreSQL, where another
/// replica may hold it. That, and room for a busy machine.
fn after_a_killed_lease() -> Duration {
    m2m_listener::storage::events::lease_for(Duration::from_millis(2000)) + Duration::from_secs(30)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_receiver_down_and_the_listener_killed_every_event_arrives_after_both_restart() {
    use crate::helpers::{free_port, wait_until_ready};
    let directory = tempfile::tempdir().unwrap();
    let receiver_port = free_port();
    let url = format!("http://127.0.0.1:{receiver_port}/hooks");
    let config = events_config(directory.path(), &url);
    let (callback_port, api_port) = (free_port(), free_port());
    let start = || configured_listener(directory.path(), callback_port, api_port, &config);
    let client = reqwest::Client::new();
    let mut listener = start();
    wait_until_ready(api_port).await;
    let envelope = fleet_envelope();
    for index in 0..10 {
        let body = m2m_listener::simulate::payloads::carrier_callback(
            envelope,
            &format!("evt-kill-{index}"),
            &[("IMEI", "350000000000104")],
            CarrierResult::Activated { mdn: "5550000104" },
        );
        let answer = client
            .post(format!("http://127.0.0.1:{callback_port}/"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let api = format!("http://127.0.0.1:{api_port}");
    let feed: Value = client
        .get(format!("{api}/api/v1/events?limit=1000"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|bytes| serde_json::from_slice(&bytes).unwrap())
        .unwrap();
    let ids: Vec<String> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 10, "an outcome per callback: {feed}");
    // Some attempts fail against the closed port before the kill.
    tokio::time::sleep(Duration::from_millis(700)).await;
    listener.kill().unwrap();
    listener.wait().unwrap();

    let receiver = Receiver::start_on(receiver_port).await;
    let mut listener = start();
    wait_until_ready(api_port).await;
    let deadline = Instant::now() + after_a_killed_lease();
    loop {
        let seen: std::collections::BTreeSet<String> =
            receiver.received().into_iter().map(|r| r.id).collect();
        if ids.iter().all(|id| seen.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still missing: {ids:?} vs {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        verify_with_python(&receiver.received()),
        receiver.received().len()
    );
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let detail: Value = client
                .get(format!("{api}/api/v1/events/{id}"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .map(|bytes| serde_json::from_slice(&bytes).unwrap())
                .unwrap();
            if detail["deliveries"][0]["state"] == "delivered" {
                let attempts = detail["attempts"].as_array().unwrap();
                let numbers: Vec<i64> = attempts
                    .iter()
                    .map(|attempt| attempt["attempt"].as_i64().unwrap())
                    .collect();
                assert!(
                    attempts.len() >= 2,
                    "a failed attempt before the kill: {detail}"
                );
                assert_eq!(attempts.last().unwrap()["result"], "delivered");
                assert!(
                    numbers.windows(2).all(|pair| pair[0] < pair[1]),
                    "each attempt once, in order: {detail}"
                );
                assert!(
                    attempts[..attempts.len() - 1]
                        .iter()
                        .all(|attempt| attempt["result"] == "failed"
                            && attempt["status"].is_null()
                            && attempt["error"].is_string()),
                    "{detail}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "{detail}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    listener.kill().unwrap();
    listener.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_jetstream_once_each_also_when_the_listener_is_killed_mid_publish() {
    use crate::helpers::{free_port, wait_until_ready};
    let directory = tempfile::tempdir().unwrap();
    let stream = format!(
        "M2M_KILL_{}_{}",
        std::process::id(),
        crate::helpers::unique_name()
    );
    let prefix = format!("m2mkill.{}", stream.to_lowercase());
    let config = directory.path().join("events.toml");
    std::fs::write(
        &config,
        format!(
            "[events]\npoll_interval_ms = 20\n\n[events.nats]\nurl = \"nats://127.0.0.1:4222\"\n\
             stream = \"{stream}\"\nsubject_prefix = \"{prefix}\"\nretry_schedule_s = [1, 1, 1, 1, 1]\n\
             timeout_ms = 2000\n"
        ),
    )
    .unwrap();
    let (callback_port, api_port) = (free_port(), free_port());
    let start = || configured_listener(directory.path(), callback_port, api_port, &config);
    let client = reqwest::Client::new();
    let envelope = fleet_envelope();
    let mut listener = start();
    wait_until_ready(api_port).await;
    // Callbacks keep arriving while events are published; the kill lands mid-stream.
    let sender = {
        let client = client.clone();
        tokio::spawn(async move {
            for index in 0..400 {
                let body = m2m_listener::simulate::payloads::carrier_callback(
                    envelope,
                    &format!("evt-nats-kill-{index}"),
                    &[("IMEI", "350000000000105")],
                    CarrierResult::Activated { mdn: "5550000105" },
                );
                if client
                    .post(format!("http://127.0.0.1:{callback_port}/"))
                    .body(body)
                    .send()
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    // Killed once some events exist (and are being published), while callbacks still arrive: a
    // fixed delay found none yet on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page: Value = match client
            .get(format!(
                "http://127.0.0.1:{api_port}/api/v1/events?limit=20"
            ))
            .send()
            .await
        {
            Ok(response) => serde_json::from_slice(&response.bytes().await.unwrap_or_default())
                .unwrap_or_default(),
            Err(_) => Value::Null,
        };
        if page["items"]
            .as_array()
            .is_some_and(|items| items.len() >= 20)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no events were recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listener.kill().unwrap();
    listener.wait().unwrap();
    let _ = sender.await;
    let mut listener = start();
    wait_until_ready(api_port).await;
    let api = format!("http://127.0.0.1:{api_port}");
    let mut ids = Vec::new();
    let mut after = String::new();
    loop {
        let page: Value = client
            .get(format!("{api}/api/v1/events?limit=500&after={after}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .map(|bytes| serde_json::from_slice(&bytes).unwrap())
            .unwrap();
        for item in page["items"].as_array().unwrap() {
            ids.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => after = cursor.to_owned(),
            None => break,
        }
    }
    assert!(!ids.is_empty());
    let deadline = Instant::now() + after_a_killed_lease();
    let messages = loop {
        let messages = jetstream_messages(&stream).await;
        if messages.len() >= ids.len() {
            break messages;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} events in the stream",
            messages.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut seen: Vec<String> = messages.into_iter().map(|(id, _, _)| id).collect();
    seen.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(seen, expected, "each event once");
    listener.kill().unwrap();
    listener.wait().unwrap();
    let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let _ = async_nats::jetstream::new(client)
        .delete_stream(&stream)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulators_receiver_verifies_and_counts_every_event_and_refuses_a_bad_signature() {
    use clap::Parser;
    #[derive(Parser)]
    struct Arguments {
        #[command(flatten)]
        options: m2m_listener::simulate::SimulateOptions,
    }
    let port = crate::helpers::free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let configured = url.clone();
    let app = spawn_app_with(move |settings| {
        fast(settings);
        settings.events.webhooks = vec![webhook("demo", &configured, &[])];
    })
    .await;
    let address = format!("127.0.0.1:{port}");
    let options = Arguments::parse_from([
        "simulate",
        "--url",
        &app.callback_url,
        "--register",
        "--jobs",
        "2",
        "--devices-per-job",
        "3",
        "--uploads",
        "0",
        "--sms",
        "1",
        "--receive",
        &address,
        "--receive-secret",
        SECRET,
        "--receive-wait-s",
        "10",
    ])
    .options;
    let api =
        m2m_listener::client::ApiClient::new(&Settings::default(), Some(&app.api_url)).unwrap();
    let summary = m2m_listener::simulate::run(options, "test".into(), "test".into(), Some(api))
        .await
        .unwrap();
    let receiver = summary.receiver.expect("the receiver ran");
    let recorded = app.count("SELECT count(*) FROM events");
    assert_eq!(receiver.events as i64, recorded, "{receiver:?}");
    assert_eq!(receiver.bad_signatures, 0);
    assert_eq!(receiver.by_type.get("job.finished"), Some(&2));
    // The receiver listens on past the run only inside `run`; a forged request needs one of its
    // own: the same checks run in `receiver.rs`, tested here through a real request.
    let forged = m2m_listener::simulate::receiver::EventReceiver::start(
        "127.0.0.1:0".parse().unwrap(),
        SECRET,
    )
    .await
    .unwrap();
    let answer = reqwest::Client::new()
        .post(format!("http://{}/", forged.address))
        .header("webhook-id", "evt_000000000001")
        .header(
            "webhook-timestamp",
            time::OffsetDateTime::now_utc().unix_timestamp().to_string(),
        )
        .header("webhook-signature", "v1,Zm9yZ2Vk")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    assert_eq!(forged.summary().bad_signatures, 1);
}

#[tokio::test]
async fn events_past_their_retention_are_pruned_at_start_with_their_attempts() {
    let app = spawn_app_with(|_| {}).await;
    finish_a_job(&app, "evt-old").await;
    finish_a_job(&app, "evt-new").await;
    assert_eq!(app.count("SELECT count(*) FROM events"), 4);
    app.database.execute(
        "UPDATE events SET created_at = '2001-01-01T00:00:00.000000Z'
         WHERE data LIKE '%evt-old%'",
    );
    let database = app.database.clone();
    let directory = app.stop().await;
    let restarted = spawn_app_with(move |settings| match &database {
        crate::helpers::TestDatabase::Sqlite(path) => settings.storage.path = path.clone(),
        crate::helpers::TestDatabase::Postgres(url) => {
            settings.storage.url = Some(Secret::new(url.clone()))
        }
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while restarted.count("SELECT count(*) FROM events") != 2 {
        assert!(Instant::now() < deadline, "the old events are still there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = restarted.get_json("/api/v1/events").await;
    assert!(
        kept["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|item| item["data"].to_string().contains("evt-new")),
        "{kept}"
    );
    drop(directory);
}

#[test]
fn sinks_with_events_off_an_unknown_type_or_a_bad_secret_are_refused_naming_the_key_not_the_secret()
{
    let mut settings = Settings::default();
    settings.events.webhooks = vec![webhook("ops", "http://127.0.0.1:9/", &[])];
    settings.validate().expect("valid");
    settings.events.enabled = false;
    let refused = settings.validate().unwrap_err().to_string();
    assert!(refused.contains("events.enabled"), "{refused}");
    settings.events.enabled = true;
    settings.events.webhooks[0].events = vec!["job.done".into()];
    let refused = settings.validate().unwrap_err().to_string();
    assert!(refused.contains("events.webhooks[0].events"), "{refused}");
    settings.events.webhooks[0].events.clear();
    settings.events.webhooks[0].secret = Some(Secret::new("whsec_short-and-not-base64!"));
    let refused = settings.validate().unwrap_err().to_string();
    assert!(refused.contains("events.webhooks[0].secret"), "{refused}");
    assert!(!refused.contains("short-and-not-base64"), "{refused}");
    settings.events.webhooks[0].secret = Some(Secret::new(SECRET));
    settings.events.webhooks[0].url = "ftp://example".into();
    let refused = settings.validate().unwrap_err().to_string();
    assert!(refused.contains("events.webhooks[0].url"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_commands_list_show_and_redeliver_through_the_api() {
    let receiver = Receiver::start().await;
    let url = receiver.url.clone();
    let app = spawn_app_with(move |settings| {
        fast(settings);
        settings.events.webhooks = vec![webhook("ops", &url, &["job.finished"])];
    })
    .await;
    finish_a_job(&app, "evt-cli").await;
    let first = receiver.wait_for(1).await[0].id.clone();
    let run = |arguments: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_m2m-listener"))
            .env_remove("M2M_CONFIG")
            .arg("events")
            .args(arguments)
            .args(["--api-url", &app.api_url])
            .output()
            .expect("the CLI runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (code, listed) = run(&["list", "--type", "job.finished"]);
    assert_eq!(code, Some(0));
    assert!(
        listed.contains(&first) && listed.contains("evt-cli"),
        "{listed}"
    );
    let (code, shown) = run(&["show", &first, "--json"]);
    assert_eq!(code, Some(0));
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["id"], first);
    let (code, redelivered) = run(&["redeliver", &first]);
    assert_eq!(code, Some(0));
    assert!(redelivered.contains("ops"), "{redelivered}");
    receiver.wait_for(2).await;
    let (code, _) = run(&["show", "evt_000000099999"]);
    assert_eq!(code, Some(1));
    let (code, _) = run(&["show", "nope"]);
    assert_eq!(code, Some(2));
}
