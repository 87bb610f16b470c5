//! The runtime every billing service stands on.
//!
//! - [`config`]: file + environment configuration, validated at start.
//! - [`telemetry`]: structured (text or JSON) logs.
//! - [`auth`], [`middleware`]: bearer tokens with scopes, request ids and spans, load shedding,
//!   deadlines and per-call metrics, as tower layers.
//! - [`metrics`]: Prometheus text on a separate port.
//! - [`db`]: SQLite (embedded default) and PostgreSQL (production) behind one connection URL,
//!   migrations per service and backend.
//! - [`idempotency`], [`outbox`]: idempotent mutations and the transactional outbox with its
//!   resumable `WatchEvents` stream.
//! - [`relay`]: events out to webhooks and NATS JetStream, one relay per sink over the outbox
//!   cursor; [`event_delivery`] serves its state and dead letters.
//! - [`clock`]: the system clock or a test clock.
//! - [`payments`]: the payment provider a service pays through (`payment_provider`: the
//!   simulator or [`stripe`], the Stripe adapter over HTTP) and [`stripe_webhook`], Stripe's
//!   signed webhooks.
//! - [`server`]: puts it all together; [`client`]: calls another service.
//! - [`jobs`]: the loop of a service's background jobs; [`status`]: the `Status` answers every
//!   service builds alike; [`convert`]: request fields (ids, texts, counts, timestamps) checked
//!   and protobuf well-known types converted.
//! - `testing` (feature `testing`, enabled only by tests): a fresh database per test on the
//!   backend the test run selects, and the harness helpers every service's tests use (events
//!   collected, conditions waited for, the test clock moved).
//!
//! Invariant: nothing here knows a business rule; services bring their own domain, store and
//! gRPC layers and hand the runtime their routes.

pub mod auth;
pub mod client;
pub mod clock;
pub mod clock_service;
pub mod config;
pub mod convert;
pub mod db;
pub mod event_delivery;
pub mod group_commit;
pub mod health;
pub mod idempotency;
pub mod jobs;
pub mod metrics;
pub mod middleware;
pub mod outbox;
pub mod payments;
pub mod relay;
pub mod server;
pub mod status;
pub mod stripe;
pub mod stripe_webhook;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use server::{Platform, Running, ServiceSpec};
