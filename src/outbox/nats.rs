//! NATS JetStream: each event published to `<subject_prefix>.<type>` with `Nats-Msg-Id` = the
//! event id, so the stream's duplicate window drops a repeat (an attempt whose acknowledgement
//! was lost, a listener killed after publishing but before recording it). Only a publish the
//! stream acknowledged counts as delivered.

use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::Mutex;

use super::{Sent, Sink};
use crate::configuration::NatsSettings;
use crate::storage::BoxFuture;
use crate::storage::events::{ClaimedEvent, Verdict};

/// The sink's name in the outbox, the API and the metrics.
pub const SINK_NAME: &str = "nats";

/// The stream's duplicate window when this listener creates it.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

pub struct NatsSink {
    settings: NatsSettings,
    /// Connected on first use, and again after a failure.
    context: Mutex<Option<jetstream::Context>>,
}

impl NatsSink {
    pub fn new(settings: &NatsSettings) -> Self {
        Self {
            settings: settings.clone(),
            context: Mutex::new(None),
        }
    }

    async fn context(&self) -> Result<jetstream::Context, String> {
        let mut context = self.context.lock().await;
        if let Some(context) = context.as_ref() {
            return Ok(context.clone());
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_millis(self.settings.timeout_ms))
            .connect(self.settings.url.as_str())
            .await
            .map_err(|error| format!("cannot connect to NATS: {error}"))?;
        let jetstream = jetstream::new(client);
        jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: self.settings.stream.clone(),
                subjects: vec![format!("{}.>", self.settings.subject_prefix)],
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|error| format!("cannot use stream {}: {error}", self.settings.stream))?;
        *context = Some(jetstream.clone());
        Ok(jetstream)
    }

    async fn publish(&self, event: &ClaimedEvent) -> Sent {
        let jetstream = match self.context().await {
            Ok(jetstream) => jetstream,
            Err(error) => return Sent::failed(error),
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id().as_str());
        let subject = format!("{}.{}", self.settings.subject_prefix, event.kind);
        let published = async {
            jetstream
                .publish_with_headers(subject, headers, event.body().into())
                .await
                .map_err(|error| error.to_string())?
                .await
                .map_err(|error| error.to_string())
        }
        .await;
        match published {
            Ok(_) => Sent {
                verdict: Verdict::Delivered,
                status: None,
                error: None,
            },
            Err(error) => {
                // Connect again next time: the connection may be what failed.
                *self.context.lock().await = None;
                Sent::failed(format!("publish not acknowledged: {error}"))
            }
        }
    }
}

impl Sink for NatsSink {
    fn send<'a>(&'a self, event: &'a ClaimedEvent) -> BoxFuture<'a, Sent> {
        Box::pin(self.publish(event))
    }
}
