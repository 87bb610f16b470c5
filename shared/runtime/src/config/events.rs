//! Events out (issue 19): webhooks, NATS JetStream and the retries of every sink.

use std::{fmt, time::Duration};

use serde::Deserialize;

use super::{
    ConfigError, ServiceDefaults,
    error::invalid,
    redact::redact_url,
    source::{Environment, parse_num},
};

/// Default of `events_retry_initial_ms`: the first retry of a failed delivery waits 1 s.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Default of `events_retry_max_ms`: the wait doubles up to 10 minutes.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(600);
/// Default (and, outside the test clock, the least) of `events_retry_for_seconds`: a sink
/// retries an event for a day before dead-lettering it.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(24 * 3600);
/// Default of `events_lease_seconds`.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Shortest webhook secret accepted.
pub const MIN_WEBHOOK_SECRET_LEN: usize = 16;

/// One webhook endpoint: every event of the wanted types is POSTed to `url`, signed with
/// `secret` (see [`crate::relay::webhook`] and the README's "Events out").
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the endpoint in the relay's state, metrics and `ListDeliveries` (`email-platform`).
    pub name: String,
    /// `http://` or `https://` URL the events are POSTed to.
    pub url: String,
    /// The HMAC-SHA256 key of the `Billing-Signature` header; never logged.
    pub secret: String,
    /// Only events of these types (empty: every type).
    #[serde(default)]
    pub event_types: Vec<String>,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("event_types", &self.event_types)
            .finish()
    }
}

/// The NATS JetStream publisher. Its `Debug` output leaves out a password in the URL.
#[derive(Clone)]
pub struct NatsConfig {
    /// e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// The stream that captures `billing.<service>.>`; created with that subject if missing.
    pub stream: String,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("stream", &self.stream)
            .finish()
    }
}

/// How a sink retries a failed delivery: waits from `initial`, doubling up to `max`, for
/// `give_up_after` since the event's first failure; then the event is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
    /// How long an event is retried before it is dead-lettered.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: DEFAULT_RETRY_INITIAL,
            max: DEFAULT_RETRY_MAX,
            give_up_after: DEFAULT_RETRY_FOR,
        }
    }
}

/// Where events go besides `WatchEvents`.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// Webhook endpoints, each its own sink.
    pub webhooks: Vec<WebhookConfig>,
    /// The JetStream publisher, when `nats_url` is set.
    pub nats: Option<NatsConfig>,
    /// Retries of every sink.
    pub retry: RetryPolicy,
    /// How long a replica's lease on a sink lasts unrenewed: after a replica dies, another
    /// takes its sinks over within this.
    pub lease: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            nats: None,
            retry: RetryPolicy::default(),
            lease: DEFAULT_LEASE,
        }
    }
}

pub(super) struct EventsFile {
    pub(super) webhooks: Vec<WebhookConfig>,
    pub(super) nats_url: Option<String>,
    pub(super) nats_stream: Option<String>,
    pub(super) retry_initial_ms: Option<u64>,
    pub(super) retry_max_ms: Option<u64>,
    pub(super) retry_for_seconds: Option<u64>,
    pub(super) lease_seconds: Option<u64>,
}

impl EventsConfig {
    /// Reads `[[webhooks]]`, `nats_*` and `events_retry_*` from the file, then the environment:
    /// `{PREFIX}_WEBHOOKS=email,crm` names the endpoints (replacing the file's), each with
    /// `{PREFIX}_WEBHOOK_EMAIL_URL`, `_SECRET` and `_EVENT_TYPES` (comma-separated).
    pub(super) fn from_parts(
        defaults: &ServiceDefaults,
        file: EventsFile,
        env: &dyn Environment,
        test_clock: bool,
    ) -> Result<Self, ConfigError> {
        let env_key = |key: &str| format!("{}_{}", defaults.env_prefix, key.to_uppercase());
        let get = |key: &str| env.var(&env_key(key));
        let webhooks = match get("webhooks") {
            None => file.webhooks,
            Some(names) => names
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|name| {
                    let var = |part: &str| format!("webhook_{}_{part}", name.replace('-', "_"));
                    let required = |part: &str| {
                        get(&var(part)).ok_or_else(|| ConfigError::Invalid {
                            key: env_key(&var(part)),
                            message: format!(
                                "webhook {name:?} is listed in {} but has no {part}",
                                env_key("webhooks")
                            ),
                        })
                    };
                    Ok(WebhookConfig {
                        name: name.to_string(),
                        url: required("url")?,
                        secret: required("secret")?,
                        event_types: get(&var("event_types"))
                            .map(|t| {
                                t.split(',')
                                    .map(str::trim)
                                    .filter(|t| !t.is_empty())
                                    .map(String::from)
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let mut names = std::collections::BTreeSet::new();
        for w in &webhooks {
            let key = || format!("webhooks.{}", w.name);
            if w.name.is_empty()
                || w.name.len() > 64
                || !w
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                return Err(ConfigError::Invalid {
                    key: "webhooks.name".into(),
                    message: format!("{:?} must be 1 to 64 of a-z, 0-9, - and _", w.name),
                });
            }
            if !names.insert(w.name.as_str()) {
                return Err(ConfigError::Invalid {
                    key: key(),
                    message: "two webhooks share this name".into(),
                });
            }
            if !(w.url.starts_with("http://") || w.url.starts_with("https://"))
                || reqwest::Url::parse(&w.url).is_err()
            {
                return Err(ConfigError::Invalid {
                    key: format!("{}.url", key()),
                    message: format!("{:?} is not an http:// or https:// URL", w.url),
                });
            }
            if w.secret.len() < MIN_WEBHOOK_SECRET_LEN {
                return Err(ConfigError::Invalid {
                    key: format!("{}.secret", key()),
                    message: format!("must be at least {MIN_WEBHOOK_SECRET_LEN} characters"),
                });
            }
        }
        let nats = match (
            get("nats_url").or(file.nats_url),
            get("nats_stream").or(file.nats_stream),
        ) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid("nats_url", "set it to publish to nats_stream"));
            }
            (Some(url), stream) => {
                if !url.starts_with("nats://") && !url.starts_with("tls://") {
                    return Err(ConfigError::Invalid {
                        key: "nats_url".into(),
                        message: format!("{url:?} is not a nats:// or tls:// URL"),
                    });
                }
                let stream = stream.unwrap_or_else(|| {
                    format!("BILLING_{}", defaults.name.to_uppercase().replace('-', "_"))
                });
                if stream.is_empty()
                    || !stream
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(invalid(
                        "nats_stream",
                        "must be a stream name of A-Z, a-z, 0-9, - and _",
                    ));
                }
                Some(NatsConfig { url, stream })
            }
        };
        let initial_ms: u64 = parse_num(
            &env_key("events_retry_initial_ms"),
            get("events_retry_initial_ms"),
            file.retry_initial_ms,
            1_000,
        )?;
        let max_ms: u64 = parse_num(
            &env_key("events_retry_max_ms"),
            get("events_retry_max_ms"),
            file.retry_max_ms,
            600_000,
        )?;
        let for_seconds: u64 = parse_num(
            &env_key("events_retry_for_seconds"),
            get("events_retry_for_seconds"),
            file.retry_for_seconds,
            DEFAULT_RETRY_FOR.as_secs(),
        )?;
        if initial_ms == 0 || max_ms < initial_ms {
            return Err(invalid(
                "events_retry_max_ms",
                "the waits must be at least 1 ms and events_retry_max_ms at least events_retry_initial_ms",
            ));
        }
        if for_seconds < DEFAULT_RETRY_FOR.as_secs() && !test_clock {
            return Err(invalid(
                "events_retry_for_seconds",
                "must be at least 86400: a receiver may be down for a day (shorter only with test_clock = true, for tests)",
            ));
        }
        let lease_seconds: u64 = parse_num(
            &env_key("events_lease_seconds"),
            get("events_lease_seconds"),
            file.lease_seconds,
            DEFAULT_LEASE.as_secs(),
        )?;
        // A webhook may take up to 10 s to answer; the lease must outlast one delivery.
        let shortest = if test_clock { 1 } else { 15 };
        if !(shortest..=3600).contains(&lease_seconds) {
            return Err(invalid(
                "events_lease_seconds",
                "must be 15 to 3600: longer than one delivery may take (shorter only with test_clock = true, for tests)",
            ));
        }
        Ok(Self {
            webhooks,
            nats,
            lease: Duration::from_secs(lease_seconds),
            retry: RetryPolicy {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms),
                give_up_after: Duration::from_secs(for_seconds),
            },
        })
    }
}
