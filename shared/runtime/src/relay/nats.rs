//! The NATS JetStream sink: each event published to `billing.<service>.<type>` with the header
//! `Nats-Msg-Id` = the event id, so JetStream drops a redelivery within the stream's duplicate
//! window; the relay moves on only after JetStream's publish acknowledgement.
//!
//! The connection is made in the background and retried (a NATS server down at start is a
//! failing sink, retried like a webhook, not a service that cannot start). The stream named by
//! `nats_stream` is created on first use if missing, capturing `billing.<service>.>`.

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::OnceCell;

use super::{DeliveryError, OutboundEvent, Sink};
use crate::config::NatsConfig;

/// Publishes one service's events.
pub struct NatsSink {
    config: NatsConfig,
    subject_prefix: String,
    context: OnceCell<jetstream::Context>,
}

impl NatsSink {
    /// The sink named `nats`, publishing under `billing.<service>.`.
    pub fn new(config: &NatsConfig, service: &str) -> Self {
        Self {
            config: config.clone(),
            subject_prefix: format!("billing.{service}"),
            context: OnceCell::new(),
        }
    }

    /// The subject of events of `event_type`.
    pub fn subject(&self, event_type: &str) -> String {
        format!("{}.{event_type}", self.subject_prefix)
    }

    async fn context(&self) -> Result<&jetstream::Context, DeliveryError> {
        self.context
            .get_or_try_init(|| async {
                let client = async_nats::ConnectOptions::new()
                    .retry_on_initial_connect()
                    .connect(self.config.url.as_str())
                    .await
                    .map_err(|e| DeliveryError(format!("NATS {}: {e}", self.config.url)))?;
                let js = jetstream::new(client);
                js.get_or_create_stream(jetstream::stream::Config {
                    name: self.config.stream.clone(),
                    subjects: vec![format!("{}.>", self.subject_prefix)],
                    ..Default::default()
                })
                .await
                .map_err(|e| DeliveryError(format!("NATS stream {}: {e}", self.config.stream)))?;
                Ok(js)
            })
            .await
    }
}

#[async_trait::async_trait]
impl Sink for NatsSink {
    fn name(&self) -> &str {
        "nats"
    }

    fn wants(&self, _event_type: &str) -> bool {
        true
    }

    async fn deliver(&self, event: &OutboundEvent) -> Result<(), DeliveryError> {
        let js = self.context().await?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.event_id.as_str());
        let subject = self.subject(&event.event_type);
        let ack = js
            .publish_with_headers(subject.clone(), headers, Bytes::from(event.body()))
            .await
            .map_err(|e| DeliveryError(format!("NATS publish to {subject}: {e}")))?;
        ack.await
            .map_err(|e| DeliveryError(format!("NATS ack for {subject}: {e}")))?;
        Ok(())
    }
}
