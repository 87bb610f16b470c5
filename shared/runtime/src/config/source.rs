//! Where settings come from: the TOML file ([`FileConfig`]) and the environment
//! ([`Environment`]), and the parsing of single values.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{ConfigError, LogFormat, ServiceDefaults, WebhookConfig, peers::PeerConfig};
use crate::auth::TokenConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen_addr: Option<String>,
    pub(super) metrics_addr: Option<String>,
    pub(super) database_url: Option<String>,
    pub(super) database_schema: Option<String>,
    pub(super) database_max_connections: Option<u32>,
    pub(super) log_format: Option<LogFormat>,
    pub(super) log_filter: Option<String>,
    pub(super) request_timeout_ms: Option<u64>,
    pub(super) concurrency_limit: Option<usize>,
    pub(super) max_request_bytes: Option<usize>,
    pub(super) max_response_bytes: Option<usize>,
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) group_commit_shards: Option<usize>,
    pub(super) test_clock: Option<bool>,
    pub(super) test_clock_start: Option<String>,
    pub(super) idempotency_retention_hours: Option<u64>,
    #[serde(default)]
    pub(super) tokens: Vec<TokenConfig>,
    #[serde(default)]
    pub(super) peers: BTreeMap<String, PeerConfig>,
    pub(super) tls_cert_path: Option<PathBuf>,
    pub(super) tls_key_path: Option<PathBuf>,
    // --- issue 19 (events out) ---
    #[serde(default)]
    pub(super) webhooks: Vec<WebhookConfig>,
    pub(super) nats_url: Option<String>,
    pub(super) nats_stream: Option<String>,
    pub(super) events_retry_initial_ms: Option<u64>,
    pub(super) events_retry_max_ms: Option<u64>,
    pub(super) events_retry_for_seconds: Option<u64>,
    pub(super) events_lease_seconds: Option<u64>,
    // --- end issue 19 ---
    // ---- payment provider (issue 17) ----
    pub(super) payment_provider: Option<String>,
    pub(super) stripe_api_base: Option<String>,
    pub(super) stripe_secret_key: Option<String>,
    pub(super) stripe_secret_key_file: Option<PathBuf>,
    pub(super) stripe_webhook_secret: Option<String>,
    pub(super) stripe_webhook_secret_file: Option<PathBuf>,
}

impl FileConfig {
    /// The environment variables (`{PREFIX}_{KEY}`) of the settings this file sets. Every field
    /// is named (no `..`), so a new setting cannot be forgotten here.
    pub(super) fn env_names(
        &self,
        defaults: &ServiceDefaults,
    ) -> std::collections::BTreeSet<String> {
        let FileConfig {
            listen_addr,
            metrics_addr,
            database_url,
            database_schema,
            database_max_connections,
            log_format,
            log_filter,
            request_timeout_ms,
            concurrency_limit,
            max_request_bytes,
            max_response_bytes,
            max_concurrent_streams,
            group_commit_shards,
            test_clock,
            test_clock_start,
            idempotency_retention_hours,
            tokens,
            peers,
            tls_cert_path,
            tls_key_path,
            webhooks,
            nats_url,
            nats_stream,
            events_retry_initial_ms,
            events_retry_max_ms,
            events_retry_for_seconds,
            events_lease_seconds,
            payment_provider,
            stripe_api_base,
            stripe_secret_key,
            stripe_secret_key_file,
            stripe_webhook_secret,
            stripe_webhook_secret_file,
        } = self;
        let mut set: Vec<String> = [
            ("listen_addr", listen_addr.is_some()),
            ("metrics_addr", metrics_addr.is_some()),
            ("database_url", database_url.is_some()),
            ("database_schema", database_schema.is_some()),
            (
                "database_max_connections",
                database_max_connections.is_some(),
            ),
            ("log_format", log_format.is_some()),
            ("log_filter", log_filter.is_some()),
            ("request_timeout_ms", request_timeout_ms.is_some()),
            ("concurrency_limit", concurrency_limit.is_some()),
            ("max_request_bytes", max_request_bytes.is_some()),
            ("max_response_bytes", max_response_bytes.is_some()),
            ("max_concurrent_streams", max_concurrent_streams.is_some()),
            ("group_commit_shards", group_commit_shards.is_some()),
            ("test_clock", test_clock.is_some()),
            ("test_clock_start", test_clock_start.is_some()),
            (
                "idempotency_retention_hours",
                idempotency_retention_hours.is_some(),
            ),
            ("tokens", !tokens.is_empty()),
            ("tls_cert_path", tls_cert_path.is_some()),
            ("tls_key_path", tls_key_path.is_some()),
            ("webhooks", !webhooks.is_empty()),
            ("nats_url", nats_url.is_some()),
            ("nats_stream", nats_stream.is_some()),
            ("events_retry_initial_ms", events_retry_initial_ms.is_some()),
            ("events_retry_max_ms", events_retry_max_ms.is_some()),
            (
                "events_retry_for_seconds",
                events_retry_for_seconds.is_some(),
            ),
            ("events_lease_seconds", events_lease_seconds.is_some()),
            ("payment_provider", payment_provider.is_some()),
            ("stripe_api_base", stripe_api_base.is_some()),
            ("stripe_secret_key", stripe_secret_key.is_some()),
            ("stripe_secret_key_file", stripe_secret_key_file.is_some()),
            ("stripe_webhook_secret", stripe_webhook_secret.is_some()),
            (
                "stripe_webhook_secret_file",
                stripe_webhook_secret_file.is_some(),
            ),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(key, _)| key.to_string())
        .collect();
        for name in peers.keys() {
            for part in ["url", "token", "ca_path"] {
                set.push(format!("peer_{name}_{part}"));
            }
        }
        set.into_iter()
            .map(|key| format!("{}_{}", defaults.env_prefix, key.to_uppercase()))
            .collect()
    }
}

/// The environment, then fallback values for what neither it nor the file sets.
pub(super) struct Layered<'a> {
    pub(super) env: &'a dyn Environment,
    pub(super) fallback: &'a dyn Environment,
    pub(super) set_by_file: std::collections::BTreeSet<String>,
}

impl Environment for Layered<'_> {
    fn var(&self, name: &str) -> Option<String> {
        self.env.var(name).or_else(|| {
            if self.set_by_file.contains(name) {
                None
            } else {
                self.fallback.var(name)
            }
        })
    }
}

/// Where settings come from: a lookup of environment variables (injectable for tests).
pub trait Environment {
    /// The value of one variable, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

pub(super) fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

pub(super) fn parse_addr(key: &str, value: String) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| ConfigError::Invalid {
        key: key.into(),
        message: format!("{value:?} is not a socket address like 127.0.0.1:50051"),
    })
}

pub(super) fn parse_num<T: std::str::FromStr>(
    env_key: &str,
    from_env: Option<String>,
    from_file: Option<T>,
    default: T,
) -> Result<T, ConfigError> {
    match from_env {
        Some(v) => v.parse().map_err(|_| ConfigError::Invalid {
            key: env_key.into(),
            message: format!("{v:?} is not a non-negative whole number"),
        }),
        None => Ok(from_file.unwrap_or(default)),
    }
}
