//! Dispatch: one task per sink (each webhook endpoint, NATS) hands the outbox's events over.
//!
//! A dispatcher claims a sink's due events from the store (a lease per event and attempt, so that
//! replicas sharing a PostgreSQL database never make the same attempt twice), sends them
//! concurrently, each bounded by the sink's timeout, and records every attempt with what follows
//! from it (the policy is [`crate::storage::events`]'s). Callbacks never wait for it: the writer
//! only inserts the event row. A slow or dead endpoint holds up its own task only.

pub mod nats;
pub mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::configuration::{EventSettings, event_filter};
use crate::metrics::Metrics;
use crate::storage::events::{
    AttemptOutcome, ClaimedEvent, SinkSpec, Verdict, error_text, lease_for, next_after,
};
use crate::storage::{BoxFuture, Store, timestamp};
use crate::telemetry::ErrorChain;

/// What one attempt got back.
#[derive(Clone, Debug)]
pub struct Sent {
    pub verdict: Verdict,
    /// The HTTP status, for webhooks.
    pub status: Option<u16>,
    /// Why it failed, one bounded line (never a secret).
    pub error: Option<String>,
}

impl Sent {
    pub fn failed(error: impl std::fmt::Display) -> Self {
        Self {
            verdict: Verdict::Failed { retry_after: None },
            status: None,
            error: Some(error_text(&error.to_string())),
        }
    }
}

/// A destination of events.
pub trait Sink: Send + Sync + 'static {
    fn send<'a>(&'a self, event: &'a ClaimedEvent) -> BoxFuture<'a, Sent>;
}

/// Events claimed, and sent at once, by one dispatcher: a claim and a record are one small
/// transaction each, so a larger batch costs the writer fewer of them under load.
const CONCURRENCY: u32 = 64;

pub struct Dispatcher {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub spec: SinkSpec,
    pub sink: Arc<dyn Sink>,
    pub retry_schedule_s: Vec<u64>,
    pub timeout: Duration,
    pub poll: Duration,
    /// This listener, as leases and attempts name it.
    pub replica: String,
}

impl Dispatcher {
    /// Dispatches until `stop` turns true. A store failure is logged and retried at the next
    /// poll; the events stay where they are.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let dispatcher = Arc::new(self);
        loop {
            if *stop.borrow() {
                return;
            }
            let sent = match dispatcher.once().await {
                Ok(sent) => sent,
                Err(error) => {
                    tracing::warn!(sink = %dispatcher.spec.name, error = %ErrorChain(&error), "event dispatch failed; retrying at the next poll");
                    0
                }
            };
            if sent == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(dispatcher.poll) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Claims due events, sends them, records the attempts; returns how many were sent.
    pub async fn once(self: &Arc<Self>) -> Result<usize, crate::storage::StoreError> {
        let claimed = self
            .store
            .claim_events(
                self.spec.clone(),
                self.replica.clone(),
                time::OffsetDateTime::now_utc(),
                lease_for(self.timeout),
                CONCURRENCY,
            )
            .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let mut attempts = tokio::task::JoinSet::new();
        for event in claimed {
            let dispatcher = Arc::clone(self);
            attempts.spawn(async move { dispatcher.attempt(event).await });
        }
        let mut outcomes = Vec::new();
        while let Some(outcome) = attempts.join_next().await {
            if let Ok(outcome) = outcome {
                outcomes.push(outcome);
            }
        }
        let count = outcomes.len();
        for outcome in &outcomes {
            self.metrics
                .event_attempted(&outcome.sink, outcome.next.result());
            if outcome.next == crate::storage::events::Next::Disabled {
                tracing::warn!(sink = %outcome.sink, "the endpoint answered 410 Gone: disabled (a redelivery enables it again)");
            }
        }
        self.store.record_attempts(outcomes).await?;
        Ok(count)
    }

    async fn attempt(&self, event: ClaimedEvent) -> AttemptOutcome {
        let started = Instant::now();
        let attempted_at = time::OffsetDateTime::now_utc();
        let sent = match tokio::time::timeout(self.timeout, self.sink.send(&event)).await {
            Ok(sent) => sent,
            Err(_) => Sent::failed(format!("no answer within {} ms", self.timeout.as_millis())),
        };
        let jitter = rand::random::<f64>() * 2.0 - 1.0;
        let next = next_after(
            sent.verdict,
            &self.retry_schedule_s,
            event.attempt,
            event.manual,
            time::OffsetDateTime::now_utc(),
            jitter,
        );
        AttemptOutcome {
            row: event.row,
            sink: self.spec.name.clone(),
            attempt: event.attempt,
            attempted_at: timestamp(attempted_at),
            status: sent.status,
            latency_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
            error: sent.error,
            manual: event.manual,
            replica: self.replica.clone(),
            next,
        }
    }
}

/// A name for this listener in leases and attempts: the host name, the process id and a random
/// part (a restarted process is another replica).
pub fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "listener".to_owned());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The dispatchers the settings configure (none when events are off).
pub fn dispatchers(
    settings: &EventSettings,
    store: &Arc<dyn Store>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Vec<Dispatcher>> {
    let mut dispatchers = Vec::new();
    if !settings.enabled {
        return Ok(dispatchers);
    }
    let replica = replica_name();
    let poll = Duration::from_millis(settings.poll_interval_ms);
    for webhook in &settings.webhooks {
        dispatchers.push(Dispatcher {
            store: Arc::clone(store),
            metrics: Arc::clone(metrics),
            spec: SinkSpec {
                name: webhook.name.clone(),
                types: event_filter(&webhook.events),
            },
            sink: Arc::new(webhook::WebhookSink::new(webhook)?),
            retry_schedule_s: webhook.retry_schedule_s.clone(),
            timeout: Duration::from_millis(webhook.timeout_ms),
            poll,
            replica: replica.clone(),
        });
    }
    if let Some(nats) = &settings.nats {
        dispatchers.push(Dispatcher {
            store: Arc::clone(store),
            metrics: Arc::clone(metrics),
            spec: SinkSpec {
                name: nats::SINK_NAME.to_owned(),
                types: event_filter(&nats.events),
            },
            sink: Arc::new(nats::NatsSink::new(nats)),
            retry_schedule_s: nats.retry_schedule_s.clone(),
            timeout: Duration::from_millis(nats.timeout_ms),
            poll,
            replica: replica.clone(),
        });
    }
    Ok(dispatchers)
}
