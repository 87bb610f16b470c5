//! Service configuration: an optional TOML file, then environment variables on top, validated
//! once at start with errors that name the setting.
//!
//! Every setting has an environment variable `{PREFIX}_{KEY}` where the prefix is the service's
//! (`WALLET`, `SUBSCRIPTION`, `RESELLER`) and the key is the upper-cased TOML key, e.g.
//! `WALLET_DATABASE_URL`. `{PREFIX}_CONFIG` names the TOML file. Tokens in the environment use
//! `{PREFIX}_TOKENS="name:secret:scope+scope,other:secret2:read"`: each entry is split at its
//! last two `:`, so a name may contain `:` and a secret may not
//! (`partner:acme:s3cret-acme:read+mutate` is the token named `partner:acme`, which
//! reseller-billing binds to partner `acme`). A secret containing `:` or `,` goes in the file's
//! `[[tokens]]` tables, which take any name and secret.
//!
//! Where things are: [`ServiceConfig`] and its parts here; `load` validates every setting,
//! `source` reads the file and the environment, and `events`, `payment`, `peers`, `tokens`
//! hold the settings of one concern each.

mod error;
mod events;
mod load;
mod payment;
mod peers;
mod redact;
mod source;
mod tokens;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

pub use self::{
    error::ConfigError,
    events::{
        DEFAULT_LEASE, DEFAULT_RETRY_FOR, DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX, EventsConfig,
        MIN_WEBHOOK_SECRET_LEN, NatsConfig, RetryPolicy, WebhookConfig,
    },
    peers::{PeerConfig, PeerSpec},
    redact::redact_url,
    source::{Environment, ProcessEnv},
};
/// Kept here too for the callers that name it `config::TokenConfig`; it belongs to [`crate::auth`].
pub use crate::auth::TokenConfig;
use crate::{payments::PaymentProvider, stripe::StripeSettings};

/// Default of `max_request_bytes`. The largest legitimate requests are far below it: a plan
/// with a 1,000-band tier table is about 40 KiB, a wallet's price list of 100 tiers 4 KiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Default of `max_response_bytes`. The largest responses: a page of 500 ledger entries is
/// about 100 KiB, a VerifyLedger report with its 1,000 listed violations about 200 KiB, and an
/// account's invoice list grows by one invoice a period; 8 MiB leaves room for years of those.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Default of `max_concurrent_streams`: well above what one client connection needs (tonic
/// multiplexes its calls on one connection), low enough that one connection cannot hold
/// thousands of `WatchEvents` streams open.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 128;
/// The smallest message limit accepted, so a typo cannot refuse every legitimate call.
pub const MIN_MESSAGE_BYTES: usize = 64 * 1024;

/// What distinguishes one service's configuration from another's: its name, the prefix of its
/// environment variables and its default ports.
#[derive(Debug, Clone, Copy)]
pub struct ServiceDefaults {
    /// Service name used in logs, metrics and the default database file (`credits-wallet`).
    pub name: &'static str,
    /// Prefix of the environment variables (`WALLET`).
    pub env_prefix: &'static str,
    /// Default gRPC port on 127.0.0.1.
    pub grpc_port: u16,
    /// Default Prometheus port on 127.0.0.1.
    pub metrics_port: u16,
    /// Default PostgreSQL schema owned by the service.
    pub schema: &'static str,
    /// Services this one calls (`[peers.<name>]`, or `{PREFIX}_PEER_<NAME>_URL` and `_TOKEN`).
    pub peers: &'static [PeerSpec],
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The server's TLS identity: PEM files of its certificate chain and private key.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert_path: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
}

/// The validated configuration of one service process. Its `Debug` output leaves out every
/// secret: token values and the database URL's password.
#[derive(Clone)]
pub struct ServiceConfig {
    /// Name of the service (from [`ServiceDefaults`]).
    pub service_name: &'static str,
    /// gRPC listen address.
    pub listen_addr: SocketAddr,
    /// Prometheus listen address; `None` turns the metrics endpoint off.
    pub metrics_addr: Option<SocketAddr>,
    /// `sqlite://path` (embedded default) or `postgres://...` (production).
    pub database_url: String,
    /// PostgreSQL schema that holds this service's tables and migrations table.
    pub database_schema: String,
    /// Upper bound of the connection pool.
    pub database_max_connections: u32,
    /// Log format.
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info,sqlx=warn`.
    pub log_filter: String,
    /// Deadline for one unary call.
    pub request_timeout: Duration,
    /// Calls in flight at once; more are shed with `RESOURCE_EXHAUSTED`.
    pub concurrency_limit: usize,
    /// Largest request message a server decodes; a bigger one is refused with `OUT_OF_RANGE`
    /// (tonic's code for it) before it is buffered.
    pub max_request_bytes: usize,
    /// Largest response message a server encodes; a bigger one fails with `OUT_OF_RANGE`.
    pub max_response_bytes: usize,
    /// HTTP/2 streams (calls, including open `WatchEvents` streams) one connection may have open
    /// at once; the server advertises it and the client queues the rest.
    pub max_concurrent_streams: u32,
    /// Group-commit collectors side by side (wallet and reseller-billing); `None` leaves it to
    /// the service, which picks by backend.
    pub group_commit_shards: Option<usize>,
    /// Run on a frozen test clock that `TestClock/AdvanceTime` moves.
    pub test_clock: bool,
    /// Where the test clock starts (default 2026-01-01T00:00:00Z), so a process restarted in
    /// a test can continue from where the one before it stood rather than go back in time.
    pub test_clock_start: Option<chrono::DateTime<chrono::Utc>>,
    /// How long idempotency keys are kept (at least 24 hours).
    pub idempotency_retention: Duration,
    /// Bearer tokens accepted by this service.
    pub tokens: Vec<TokenConfig>,
    /// Services this one calls, by name (e.g. `wallet`).
    pub peers: BTreeMap<String, PeerConfig>,
    /// Serve gRPC over TLS with this identity; `None` serves plaintext HTTP/2 (behind a
    /// TLS-terminating proxy or a service mesh, or in development).
    pub tls: Option<TlsConfig>,
    /// Where the outbox's events go besides `WatchEvents`: webhooks, NATS JetStream.
    pub events: EventsConfig,
    // ---- payment provider (issue 17) -------------------------------------------------------
    /// `payment_provider`: where charges go (`simulator`, the default, or `stripe`).
    pub payment_provider: PaymentProvider,
    /// Stripe's settings (`stripe_api_base`, `stripe_secret_key` or `stripe_secret_key_file`);
    /// `Some` exactly when `payment_provider` is `stripe`. The key is redacted in `Debug`.
    pub stripe: Option<StripeSettings>,
    // ---- end of payment provider -----------------------------------------------------------
}

impl fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("service_name", &self.service_name)
            .field("listen_addr", &self.listen_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("database_url", &redact_url(&self.database_url))
            .field("database_schema", &self.database_schema)
            .field("database_max_connections", &self.database_max_connections)
            .field("log_format", &self.log_format)
            .field("log_filter", &self.log_filter)
            .field("request_timeout", &self.request_timeout)
            .field("concurrency_limit", &self.concurrency_limit)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("max_concurrent_streams", &self.max_concurrent_streams)
            .field("group_commit_shards", &self.group_commit_shards)
            .field("test_clock", &self.test_clock)
            .field("test_clock_start", &self.test_clock_start)
            .field("idempotency_retention", &self.idempotency_retention)
            .field("tokens", &self.tokens)
            .field("peers", &self.peers)
            .field("tls", &self.tls)
            .field("events", &self.events)
            .field("payment_provider", &self.payment_provider)
            .field("stripe", &self.stripe)
            .finish()
    }
}
