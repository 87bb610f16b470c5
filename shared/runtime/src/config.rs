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

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    auth::Scope,
    payments::PaymentProvider,
    stripe::{Secret, StripeSettings},
};

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

/// A service that another calls, as the caller declares it.
#[derive(Debug, Clone, Copy)]
pub struct PeerSpec {
    /// Its name in the configuration: `wallet` is `[peers.wallet]` or
    /// `{PREFIX}_PEER_WALLET_URL`.
    pub name: &'static str,
    /// The service it is (`credits-wallet`), named in errors and logs.
    pub service: &'static str,
    /// The caller cannot serve without it: while it is unreachable, the caller's own gRPC
    /// services report `NOT_SERVING` on `grpc.health.v1` (see [`crate::health`]).
    pub required: bool,
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

/// One bearer token that may call the service, with its scopes.
#[derive(Clone, Deserialize)]
pub struct TokenConfig {
    /// Who holds the token (appears in logs instead of the secret).
    pub name: String,
    /// The secret itself; never logged.
    pub token: String,
    /// What the holder may do.
    pub scopes: Vec<Scope>,
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Another service this one calls over gRPC.
#[derive(Clone, Deserialize)]
pub struct PeerConfig {
    /// Its name in this configuration (`wallet`); set by the loader from the key.
    #[serde(skip)]
    pub name: String,
    /// The service it is (`credits-wallet`, from [`PeerSpec::service`]; the name for a peer the
    /// service does not declare); set by the loader.
    #[serde(skip)]
    pub service: String,
    /// e.g. `http://127.0.0.1:50051`.
    pub url: String,
    /// Bearer token presented to the peer; never logged.
    pub token: String,
    /// PEM file of the certificate authority that signed the peer's certificate; required for
    /// an `https://` URL (no system roots are trusted).
    #[serde(default)]
    pub ca_path: Option<PathBuf>,
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("service", &self.service)
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("ca_path", &self.ca_path)
            .finish()
    }
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
    // --- issue 19 (events out) ---
    /// Where the outbox's events go besides `WatchEvents`: webhooks, NATS JetStream.
    pub events: EventsConfig,
    // --- end issue 19 ---
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

/// `url` with its password left out, for logs and `Debug` output: the password of the
/// user-info part (`postgres://user:<redacted>@host/db`) and the value of a `password=` query
/// parameter (which libpq-style URLs also accept). Everything else is kept, so the log still
/// says which database a service uses.
pub fn redact_url(url: &str) -> String {
    const REDACTED: &str = "<redacted>";
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:{REDACTED}@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}={REDACTED}")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{authority}{tail}"),
        None => format!("{authority}{tail}"),
    }
}

/// A configuration problem, named precisely enough to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A setting has a value that cannot be used.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The TOML key or environment variable.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen_addr: Option<String>,
    metrics_addr: Option<String>,
    database_url: Option<String>,
    database_schema: Option<String>,
    database_max_connections: Option<u32>,
    log_format: Option<LogFormat>,
    log_filter: Option<String>,
    request_timeout_ms: Option<u64>,
    concurrency_limit: Option<usize>,
    max_request_bytes: Option<usize>,
    max_response_bytes: Option<usize>,
    max_concurrent_streams: Option<u32>,
    group_commit_shards: Option<usize>,
    test_clock: Option<bool>,
    test_clock_start: Option<String>,
    idempotency_retention_hours: Option<u64>,
    #[serde(default)]
    tokens: Vec<TokenConfig>,
    #[serde(default)]
    peers: BTreeMap<String, PeerConfig>,
    tls_cert_path: Option<PathBuf>,
    tls_key_path: Option<PathBuf>,
    // --- issue 19 (events out) ---
    #[serde(default)]
    webhooks: Vec<WebhookConfig>,
    nats_url: Option<String>,
    nats_stream: Option<String>,
    events_retry_initial_ms: Option<u64>,
    events_retry_max_ms: Option<u64>,
    events_retry_for_seconds: Option<u64>,
    events_lease_seconds: Option<u64>,
    // --- end issue 19 ---
    // ---- payment provider (issue 17) ----
    payment_provider: Option<String>,
    stripe_api_base: Option<String>,
    stripe_secret_key: Option<String>,
    stripe_secret_key_file: Option<PathBuf>,
    stripe_webhook_secret: Option<String>,
    stripe_webhook_secret_file: Option<PathBuf>,
}

impl FileConfig {
    /// The environment variables (`{PREFIX}_{KEY}`) of the settings this file sets. Every field
    /// is named (no `..`), so a new setting cannot be forgotten here.
    fn env_names(&self, defaults: &ServiceDefaults) -> std::collections::BTreeSet<String> {
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
struct Layered<'a> {
    env: &'a dyn Environment,
    fallback: &'a dyn Environment,
    set_by_file: std::collections::BTreeSet<String>,
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

impl ServiceConfig {
    /// Loads the file named by `{PREFIX}_CONFIG` (if any), applies the environment and validates.
    pub fn load(defaults: &ServiceDefaults, env: &dyn Environment) -> Result<Self, ConfigError> {
        let file = match env.var(&format!("{}_CONFIG", defaults.env_prefix)) {
            Some(path) => read_file(Path::new(&path))?,
            None => FileConfig::default(),
        };
        Self::from_parts(defaults, file, env)
    }

    /// Like [`load`](Self::load), with `fallback`: settings, as `{PREFIX}_{KEY}` variables,
    /// that apply only where neither the environment nor the file sets them. The suite's
    /// development defaults come this way (`services/suite`), so a `{PREFIX}_CONFIG` file's
    /// tokens or peers are kept. A peer counts as set by the file when the file has its
    /// `[peers.<name>]` table.
    pub fn load_with_fallback(
        defaults: &ServiceDefaults,
        env: &dyn Environment,
        fallback: &dyn Environment,
    ) -> Result<Self, ConfigError> {
        let config_var = format!("{}_CONFIG", defaults.env_prefix);
        let file = match env.var(&config_var).or_else(|| fallback.var(&config_var)) {
            Some(path) => read_file(Path::new(&path))?,
            None => FileConfig::default(),
        };
        let layered = Layered {
            env,
            fallback,
            set_by_file: file.env_names(defaults),
        };
        Self::from_parts(defaults, file, &layered)
    }

    /// Loads an explicit TOML text (used by tests and the suite launcher), then the environment.
    pub fn from_toml(
        defaults: &ServiceDefaults,
        text: &str,
        env: &dyn Environment,
    ) -> Result<Self, ConfigError> {
        let file = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<inline>".into(),
            message: e.to_string(),
        })?;
        Self::from_parts(defaults, file, env)
    }

    fn from_parts(
        defaults: &ServiceDefaults,
        file: FileConfig,
        env: &dyn Environment,
    ) -> Result<Self, ConfigError> {
        let get = |key: &str| env.var(&format!("{}_{}", defaults.env_prefix, key.to_uppercase()));
        let env_key = |key: &str| format!("{}_{}", defaults.env_prefix, key.to_uppercase());

        let listen_addr = parse_addr(
            "listen_addr",
            get("listen_addr")
                .or(file.listen_addr)
                .unwrap_or_else(|| format!("127.0.0.1:{}", defaults.grpc_port)),
        )?;
        let metrics_addr = match get("metrics_addr")
            .or(file.metrics_addr)
            .unwrap_or_else(|| format!("127.0.0.1:{}", defaults.metrics_port))
        {
            off if off == "off" => None,
            addr => Some(parse_addr("metrics_addr", addr)?),
        };
        let database_url = get("database_url")
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://data/{}.db", defaults.name));
        if !(database_url.starts_with("sqlite:") || database_url.starts_with("postgres")) {
            return Err(invalid(
                "database_url",
                "must start with sqlite: (embedded) or postgres:// (production)",
            ));
        }
        let database_schema = get("database_schema")
            .or(file.database_schema)
            .unwrap_or_else(|| defaults.schema.to_string());
        if database_schema.is_empty()
            || !database_schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            || database_schema.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(invalid(
                "database_schema",
                "must be a lower-case SQL identifier (a-z, 0-9, _)",
            ));
        }
        let database_max_connections = parse_num(
            &env_key("database_max_connections"),
            get("database_max_connections"),
            file.database_max_connections,
            10,
        )?;
        if database_max_connections == 0 {
            return Err(invalid("database_max_connections", "must be at least 1"));
        }
        let log_format = match get("log_format") {
            Some(v) => match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(invalid("log_format", "must be text or json")),
            },
            None => file.log_format.unwrap_or(LogFormat::Text),
        };
        let log_filter = get("log_filter")
            .or(file.log_filter)
            .unwrap_or_else(|| "info,sqlx=warn".into());
        let timeout_ms: u64 = parse_num(
            &env_key("request_timeout_ms"),
            get("request_timeout_ms"),
            file.request_timeout_ms,
            10_000,
        )?;
        if timeout_ms == 0 {
            return Err(invalid("request_timeout_ms", "must be at least 1"));
        }
        let concurrency_limit = parse_num(
            &env_key("concurrency_limit"),
            get("concurrency_limit"),
            file.concurrency_limit,
            1024,
        )?;
        if concurrency_limit == 0 {
            return Err(invalid("concurrency_limit", "must be at least 1"));
        }
        let max_request_bytes = parse_num(
            &env_key("max_request_bytes"),
            get("max_request_bytes"),
            file.max_request_bytes,
            DEFAULT_MAX_REQUEST_BYTES,
        )?;
        if max_request_bytes < MIN_MESSAGE_BYTES {
            return Err(ConfigError::Invalid {
                key: "max_request_bytes".into(),
                message: format!(
                    "must be at least {MIN_MESSAGE_BYTES}: a plan with a large tier table must fit"
                ),
            });
        }
        let max_response_bytes = parse_num(
            &env_key("max_response_bytes"),
            get("max_response_bytes"),
            file.max_response_bytes,
            DEFAULT_MAX_RESPONSE_BYTES,
        )?;
        if max_response_bytes < MIN_MESSAGE_BYTES {
            return Err(ConfigError::Invalid {
                key: "max_response_bytes".into(),
                message: format!(
                    "must be at least {MIN_MESSAGE_BYTES}: a full page of ledger entries must fit"
                ),
            });
        }
        let max_concurrent_streams = parse_num(
            &env_key("max_concurrent_streams"),
            get("max_concurrent_streams"),
            file.max_concurrent_streams,
            DEFAULT_MAX_CONCURRENT_STREAMS,
        )?;
        if max_concurrent_streams == 0 {
            return Err(invalid("max_concurrent_streams", "must be at least 1"));
        }
        // 0 (the default) leaves the number to the backend.
        let group_commit_shards: usize = parse_num(
            &env_key("group_commit_shards"),
            get("group_commit_shards"),
            file.group_commit_shards,
            0,
        )?;
        if group_commit_shards > 64 {
            return Err(invalid("group_commit_shards", "must be at most 64"));
        }
        let group_commit_shards = (group_commit_shards > 0).then_some(group_commit_shards);
        let test_clock = match get("test_clock") {
            Some(v) => match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(invalid("test_clock", "must be true or false")),
            },
            None => file.test_clock.unwrap_or(false),
        };
        let test_clock_start = match get("test_clock_start").or(file.test_clock_start) {
            None => None,
            Some(_) if !test_clock => {
                return Err(invalid(
                    "test_clock_start",
                    "applies to the test clock only: set test_clock = true too",
                ));
            }
            Some(v) => Some(
                chrono::DateTime::parse_from_rfc3339(&v)
                    .map_err(|_| ConfigError::Invalid {
                        key: "test_clock_start".into(),
                        message: format!(
                            "{v:?} is not an RFC 3339 instant like 2026-02-01T00:00:00Z"
                        ),
                    })?
                    .with_timezone(&chrono::Utc),
            ),
        };
        let retention_hours: u64 = parse_num(
            &env_key("idempotency_retention_hours"),
            get("idempotency_retention_hours"),
            file.idempotency_retention_hours,
            48,
        )?;
        if retention_hours < 24 {
            return Err(invalid(
                "idempotency_retention_hours",
                "must be at least 24: a client may retry a mutation for a day",
            ));
        }
        let tokens = match get("tokens") {
            Some(spec) => parse_tokens(&spec)?,
            None => file.tokens,
        };
        validate_tokens(&tokens)?;
        let mut peers = file.peers;
        for spec in defaults.peers {
            let name = &spec.name;
            let url = get(&format!("peer_{name}_url"));
            let token = get(&format!("peer_{name}_token"));
            let ca_path = get(&format!("peer_{name}_ca_path")).map(PathBuf::from);
            match (peers.get_mut(*name), url, token) {
                (Some(peer), url, token) => {
                    if let Some(url) = url {
                        peer.url = url;
                    }
                    if let Some(token) = token {
                        peer.token = token;
                    }
                    if ca_path.is_some() {
                        peer.ca_path = ca_path;
                    }
                }
                (None, Some(url), Some(token)) => {
                    peers.insert(
                        (*name).to_string(),
                        PeerConfig {
                            name: String::new(),
                            service: String::new(),
                            url,
                            token,
                            ca_path,
                        },
                    );
                }
                (None, None, None) => {}
                (None, _, _) => {
                    return Err(ConfigError::Invalid {
                        key: format!("{}_PEER_{}_URL", defaults.env_prefix, name.to_uppercase()),
                        message: "set both the peer's URL and its token".into(),
                    });
                }
            }
        }
        for (name, peer) in &mut peers {
            peer.name.clone_from(name);
            peer.service = defaults
                .peers
                .iter()
                .find(|p| p.name == name)
                .map_or_else(|| name.clone(), |p| p.service.to_string());
            if !(peer.url.starts_with("http://") || peer.url.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    key: format!("peers.{name}.url"),
                    message: format!("{:?} is not an http:// or https:// URL", peer.url),
                });
            }
            if peer.url.starts_with("https://") && peer.ca_path.is_none() {
                return Err(ConfigError::Invalid {
                    key: format!("peers.{name}.ca_path"),
                    message:
                        "an https:// peer needs the PEM file of the CA that signed its certificate"
                            .into(),
                });
            }
        }
        let tls = match (
            get("tls_cert_path")
                .map(PathBuf::from)
                .or(file.tls_cert_path),
            get("tls_key_path").map(PathBuf::from).or(file.tls_key_path),
        ) {
            (Some(cert_path), Some(key_path)) => Some(TlsConfig {
                cert_path,
                key_path,
            }),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls_key_path", "set with tls_cert_path")),
            (None, Some(_)) => return Err(invalid("tls_cert_path", "set with tls_key_path")),
        };
        // --- issue 19 (events out) ---
        let events = EventsConfig::from_parts(
            defaults,
            EventsFile {
                webhooks: file.webhooks,
                nats_url: file.nats_url,
                nats_stream: file.nats_stream,
                retry_initial_ms: file.events_retry_initial_ms,
                retry_max_ms: file.events_retry_max_ms,
                retry_for_seconds: file.events_retry_for_seconds,
                lease_seconds: file.events_lease_seconds,
            },
            env,
            test_clock,
        )?;
        // --- end issue 19 ---
        let (payment_provider, stripe) = payment_settings(
            PaymentSource {
                provider: get("payment_provider").or(file.payment_provider),
                api_base: get("stripe_api_base").or(file.stripe_api_base),
                secret_key: get("stripe_secret_key").or(file.stripe_secret_key),
                secret_key_file: get("stripe_secret_key_file")
                    .map(PathBuf::from)
                    .or(file.stripe_secret_key_file),
                webhook_secret: get("stripe_webhook_secret").or(file.stripe_webhook_secret),
                webhook_secret_file: get("stripe_webhook_secret_file")
                    .map(PathBuf::from)
                    .or(file.stripe_webhook_secret_file),
            },
            &env_key,
        )?;
        Ok(Self {
            service_name: defaults.name,
            listen_addr,
            metrics_addr,
            database_url,
            database_schema,
            database_max_connections,
            log_format,
            log_filter,
            request_timeout: Duration::from_millis(timeout_ms),
            concurrency_limit,
            max_request_bytes,
            max_response_bytes,
            max_concurrent_streams,
            group_commit_shards,
            test_clock,
            test_clock_start,
            idempotency_retention: Duration::from_secs(retention_hours * 3600),
            tokens,
            peers,
            tls,
            events,
            payment_provider,
            stripe,
        })
    }

    /// The peer named `name`, or a clear error naming the settings to add.
    pub fn peer(&self, name: &str) -> Result<&PeerConfig, ConfigError> {
        self.peers.get(name).ok_or_else(|| ConfigError::Invalid {
            key: format!("peers.{name}"),
            message: format!(
                "this service calls {name}: set peers.{name}.url and peers.{name}.token"
            ),
        })
    }
}

// --- issue 19 (events out) ---

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

struct EventsFile {
    webhooks: Vec<WebhookConfig>,
    nats_url: Option<String>,
    nats_stream: Option<String>,
    retry_initial_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    retry_for_seconds: Option<u64>,
    lease_seconds: Option<u64>,
}

impl EventsConfig {
    /// Reads `[[webhooks]]`, `nats_*` and `events_retry_*` from the file, then the environment:
    /// `{PREFIX}_WEBHOOKS=email,crm` names the endpoints (replacing the file's), each with
    /// `{PREFIX}_WEBHOOK_EMAIL_URL`, `_SECRET` and `_EVENT_TYPES` (comma-separated).
    fn from_parts(
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

// --- end issue 19 ---
// ---- payment provider (issue 17) ------------------------------------------------------------

/// The payment settings as given (environment over file).
struct PaymentSource {
    provider: Option<String>,
    api_base: Option<String>,
    secret_key: Option<String>,
    secret_key_file: Option<PathBuf>,
    webhook_secret: Option<String>,
    webhook_secret_file: Option<PathBuf>,
}

/// `payment_provider` and, for Stripe, its settings. The secret key comes from
/// `stripe_secret_key` or from the file `stripe_secret_key_file` names (one of them); Stripe
/// settings without `payment_provider = "stripe"` are refused rather than ignored. The API base
/// is `https://`, or `http://` on a loopback host only (a local Stripe such as localstripe), so
/// the key never crosses a network in clear.
fn payment_settings(
    given: PaymentSource,
    env_key: &dyn Fn(&str) -> String,
) -> Result<(PaymentProvider, Option<StripeSettings>), ConfigError> {
    let provider = match given.provider.as_deref() {
        None => PaymentProvider::default(),
        Some(v) => v.parse().map_err(|()| ConfigError::Invalid {
            key: "payment_provider".into(),
            message: format!("{v:?} is not a provider: use simulator or stripe"),
        })?,
    };
    if provider != PaymentProvider::Stripe {
        for (key, set) in [
            ("stripe_api_base", given.api_base.is_some()),
            ("stripe_secret_key", given.secret_key.is_some()),
            ("stripe_secret_key_file", given.secret_key_file.is_some()),
            ("stripe_webhook_secret", given.webhook_secret.is_some()),
            (
                "stripe_webhook_secret_file",
                given.webhook_secret_file.is_some(),
            ),
        ] {
            if set {
                return Err(invalid(
                    key,
                    "applies to Stripe only: set payment_provider = \"stripe\" too",
                ));
            }
        }
        return Ok((provider, None));
    }
    let Some(secret) =
        secret_setting("stripe_secret_key", given.secret_key, given.secret_key_file)?
    else {
        return Err(invalid(
            "stripe_secret_key",
            &format!(
                "payment_provider = \"stripe\" needs the secret API key: set {} or {}",
                env_key("stripe_secret_key"),
                env_key("stripe_secret_key_file")
            ),
        ));
    };
    let webhook_secret = secret_setting(
        "stripe_webhook_secret",
        given.webhook_secret,
        given.webhook_secret_file,
    )?;
    if let Some(w) = &webhook_secret
        && !(w.starts_with("whsec_") && w.len() > 6 && w.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(invalid(
            "stripe_webhook_secret",
            "is not a webhook signing secret (whsec_..., no spaces)",
        ));
    }
    // The message never quotes the key.
    if !(secret.starts_with("sk_") || secret.starts_with("rk_"))
        || secret.len() < 8
        || !secret.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            "stripe_secret_key",
            "is not a Stripe secret or restricted key (sk_... or rk_..., no spaces)",
        ));
    }
    let api_base = given
        .api_base
        .unwrap_or_else(|| crate::stripe::DEFAULT_API_BASE.to_string());
    let url = reqwest::Url::parse(&api_base).map_err(|_| ConfigError::Invalid {
        key: "stripe_api_base".into(),
        message: format!("{api_base:?} is not a URL like https://api.stripe.com"),
    })?;
    let loopback = matches!(
        url.host_str(),
        Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
    );
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(ConfigError::Invalid {
                key: "stripe_api_base".into(),
                message: format!(
                    "{api_base:?} must be https:// (http:// only on 127.0.0.1 or localhost, for a local Stripe)"
                ),
            });
        }
    }
    Ok((
        provider,
        Some(StripeSettings {
            api_base,
            secret_key: Secret::new(secret),
            timeout: crate::stripe::DEFAULT_TIMEOUT,
            webhook_secret: webhook_secret.map(Secret::new),
        }),
    ))
}

/// A secret given as `key` or in the file `{key}_file` (not both), trimmed.
fn secret_setting(
    key: &str,
    value: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(invalid(key, &format!("set {key} or {key}_file, not both"))),
        (None, None) => Ok(None),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => Ok(Some(
            std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::Invalid {
                    key: format!("{key}_file"),
                    message: format!("cannot read {}: {e}", path.display()),
                })?
                .trim()
                .to_string(),
        )),
    }
}

// ---- end of payment provider -------------------------------------------------------------------

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn invalid(key: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

fn parse_addr(key: &str, value: String) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| ConfigError::Invalid {
        key: key.into(),
        message: format!("{value:?} is not a socket address like 127.0.0.1:50051"),
    })
}

fn parse_num<T: std::str::FromStr>(
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

/// Parses `name:secret:scope+scope,name2:secret2:scope`. Each entry is split at its last two
/// `:`, so a name may contain `:` (`partner:acme:secret:read+mutate` is the token named
/// `partner:acme`, bound to that partner by reseller-billing) and a secret may not; entries are
/// separated by `,`, which neither may contain. A secret with `:` or `,` goes in the file.
fn parse_tokens(spec: &str) -> Result<Vec<TokenConfig>, ConfigError> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|entry| {
            let mut parts = entry.trim().rsplitn(3, ':');
            let (Some(scopes), Some(token), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(invalid(
                    "tokens",
                    "each entry must be name:secret:scope+scope (the name may contain ':', the secret may not; scopes: read, mutate, admin, act-for-user)",
                ));
            };
            let scopes = scopes
                .split('+')
                .map(|s| {
                    s.parse::<Scope>().map_err(|_| ConfigError::Invalid {
                        key: "tokens".into(),
                        message: format!(
                            "unknown scope {s:?} for token {name:?}; scopes are read, mutate, admin, act-for-user"
                        ),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(TokenConfig {
                name: name.to_string(),
                token: token.to_string(),
                scopes,
            })
        })
        .collect()
}

fn validate_tokens(tokens: &[TokenConfig]) -> Result<(), ConfigError> {
    if tokens.is_empty() {
        return Err(invalid(
            "tokens",
            "no bearer tokens configured: every business RPC would be refused; set tokens in the config file or name:secret:scope+scope in the environment",
        ));
    }
    for t in tokens {
        if t.name.is_empty() {
            return Err(invalid("tokens", "a token has an empty name"));
        }
        if t.token.len() < 8 {
            return Err(ConfigError::Invalid {
                key: "tokens".into(),
                message: format!(
                    "the secret of token {:?} is shorter than 8 characters",
                    t.name
                ),
            });
        }
        if t.scopes.is_empty() {
            return Err(ConfigError::Invalid {
                key: "tokens".into(),
                message: format!("token {:?} has no scopes", t.name),
            });
        }
    }
    let mut secrets: Vec<&str> = tokens.iter().map(|t| t.token.as_str()).collect();
    secrets.sort_unstable();
    if secrets.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid("tokens", "two tokens share one secret"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const DEFAULTS: ServiceDefaults = ServiceDefaults {
        name: "credits-wallet",
        env_prefix: "WALLET",
        grpc_port: 50051,
        metrics_port: 9101,
        schema: "wallet",
        peers: &[PeerSpec {
            name: "wallet",
            service: "credits-wallet",
            required: true,
        }],
    };

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_and_env_overrides_file() {
        let cfg = ServiceConfig::from_toml(
            &DEFAULTS,
            "listen_addr = \"127.0.0.1:7000\"\n[[tokens]]\nname = \"ops\"\ntoken = \"secret-ops\"\nscopes = [\"admin\"]\n",
            &env(&[("WALLET_LISTEN_ADDR", "127.0.0.1:7001")]),
        )
        .unwrap();
        assert_eq!(cfg.listen_addr.port(), 7001);
        assert_eq!(cfg.metrics_addr.unwrap().port(), 9101);
        assert_eq!(cfg.database_url, "sqlite://data/credits-wallet.db");
        assert_eq!(cfg.database_schema, "wallet");
        assert_eq!(cfg.tokens[0].scopes, vec![Scope::Admin]);
        assert_eq!(cfg.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(cfg.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);
        assert_eq!(cfg.max_concurrent_streams, DEFAULT_MAX_CONCURRENT_STREAMS);
        assert_eq!(cfg.group_commit_shards, None);
        let e = env(&[
            ("WALLET_TOKENS", "t:long-secret:read"),
            ("WALLET_GROUP_COMMIT_SHARDS", "2"),
        ]);
        let cfg = ServiceConfig::from_toml(&DEFAULTS, "group_commit_shards = 8", &e).unwrap();
        assert_eq!(cfg.group_commit_shards, Some(2));
    }

    #[test]
    fn tokens_from_env_parse_scopes() {
        let cfg = ServiceConfig::from_toml(
            &DEFAULTS,
            "",
            &env(&[(
                "WALLET_TOKENS",
                "pipeline:s3cret-pipe:read+mutate,ops:s3cret-ops:admin",
            )]),
        )
        .unwrap();
        assert_eq!(cfg.tokens.len(), 2);
        assert_eq!(cfg.tokens[0].scopes, vec![Scope::Read, Scope::Mutate]);
    }

    #[test]
    fn a_token_name_may_contain_colons_in_env_and_file_alike() {
        let cfg = ServiceConfig::from_toml(
            &DEFAULTS,
            "",
            &env(&[(
                "WALLET_TOKENS",
                "partner:acme-agency:s3cret-acme:read+mutate, ops:s3cret-ops:admin",
            )]),
        )
        .unwrap();
        assert_eq!(cfg.tokens[0].name, "partner:acme-agency");
        assert_eq!(cfg.tokens[0].token, "s3cret-acme");
        assert_eq!(cfg.tokens[0].scopes, vec![Scope::Read, Scope::Mutate]);
        assert_eq!(cfg.tokens[1].name, "ops");
        assert_eq!(cfg.tokens[1].token, "s3cret-ops");
        let file = ServiceConfig::from_toml(
            &DEFAULTS,
            "[[tokens]]\nname = \"partner:acme-agency\"\ntoken = \"s3cret:acme,1\"\nscopes = [\"read\"]\n",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(file.tokens[0].name, "partner:acme-agency");
        assert_eq!(file.tokens[0].token, "s3cret:acme,1");
        let err = ServiceConfig::from_toml(&DEFAULTS, "", &env(&[("WALLET_TOKENS", "ops:admin")]))
            .unwrap_err();
        assert!(err.to_string().contains("name:secret:scope"), "{err}");
    }

    #[test]
    fn fallback_settings_apply_only_where_neither_env_nor_file_sets_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wallet.toml");
        std::fs::write(
            &path,
            "listen_addr = \"127.0.0.1:7000\"\n[[tokens]]\nname = \"ops\"\ntoken = \"file-secret\"\nscopes = [\"admin\"]\n[peers.wallet]\nurl = \"http://file:1\"\ntoken = \"file-peer\"\n",
        )
        .unwrap();
        let fallback = env(&[
            ("WALLET_TOKENS", "dev:dev-admin-token:read"),
            ("WALLET_LISTEN_ADDR", "127.0.0.1:7001"),
            ("WALLET_METRICS_ADDR", "off"),
            ("WALLET_PEER_WALLET_URL", "http://fallback:1"),
            ("WALLET_PEER_WALLET_TOKEN", "fallback-peer"),
        ]);
        let from_file = env(&[("WALLET_CONFIG", path.to_str().unwrap())]);
        let cfg = ServiceConfig::load_with_fallback(&DEFAULTS, &from_file, &fallback).unwrap();
        assert_eq!(cfg.tokens.len(), 1);
        assert_eq!(cfg.tokens[0].token, "file-secret");
        assert_eq!(cfg.listen_addr.port(), 7000);
        assert_eq!(
            cfg.metrics_addr, None,
            "not in the file: the fallback applies"
        );
        assert_eq!(cfg.peer("wallet").unwrap().url, "http://file:1");
        assert_eq!(cfg.peer("wallet").unwrap().token, "file-peer");

        let mut from_env = from_file.clone();
        from_env.insert("WALLET_TOKENS".into(), "env:env-secret-1:read".into());
        let cfg = ServiceConfig::load_with_fallback(&DEFAULTS, &from_env, &fallback).unwrap();
        assert_eq!(cfg.tokens[0].token, "env-secret-1");

        let cfg = ServiceConfig::load_with_fallback(&DEFAULTS, &env(&[]), &fallback).unwrap();
        assert_eq!(cfg.tokens[0].token, "dev-admin-token");
        assert_eq!(cfg.listen_addr.port(), 7001);
        let peer = cfg.peer("wallet").unwrap();
        assert_eq!(
            (peer.url.as_str(), peer.token.as_str()),
            ("http://fallback:1", "fallback-peer")
        );
        assert_eq!(
            (peer.name.as_str(), peer.service.as_str()),
            ("wallet", "credits-wallet")
        );
    }

    #[test]
    fn errors_name_the_setting() {
        let cases = [
            ("WALLET_LISTEN_ADDR", "nope", "listen_addr"),
            ("WALLET_DATABASE_URL", "mysql://x", "database_url"),
            (
                "WALLET_IDEMPOTENCY_RETENTION_HOURS",
                "2",
                "idempotency_retention_hours",
            ),
            ("WALLET_CONCURRENCY_LIMIT", "-1", "WALLET_CONCURRENCY_LIMIT"),
            ("WALLET_MAX_REQUEST_BYTES", "1000", "max_request_bytes"),
            (
                "WALLET_MAX_RESPONSE_BYTES",
                "x",
                "WALLET_MAX_RESPONSE_BYTES",
            ),
            (
                "WALLET_MAX_CONCURRENT_STREAMS",
                "0",
                "max_concurrent_streams",
            ),
            (
                "WALLET_TEST_CLOCK_START",
                "2026-02-01T00:00:00Z",
                "test_clock_start",
            ),
            ("WALLET_GROUP_COMMIT_SHARDS", "65", "group_commit_shards"),
            (
                "WALLET_GROUP_COMMIT_SHARDS",
                "-1",
                "WALLET_GROUP_COMMIT_SHARDS",
            ),
            ("WALLET_TLS_CERT_PATH", "/etc/cert.pem", "tls_key_path"),
            ("WALLET_TLS_KEY_PATH", "/etc/key.pem", "tls_cert_path"),
            ("WALLET_TOKENS", "a:short:read", "tokens"),
            ("WALLET_TOKENS", "a:long-enough:fly", "tokens"),
        ];
        for (key, value, named) in cases {
            let mut e = env(&[("WALLET_TOKENS", "t:long-secret:read")]);
            e.insert(key.into(), value.into());
            let err = ServiceConfig::from_toml(&DEFAULTS, "", &e).unwrap_err();
            assert!(err.to_string().contains(named), "{key}={value}: {err}");
        }
    }

    #[test]
    fn no_tokens_is_refused_and_unknown_file_keys_too() {
        let err = ServiceConfig::from_toml(&DEFAULTS, "", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("no bearer tokens"));
        let err = ServiceConfig::from_toml(&DEFAULTS, "lisen_addr = \"x\"", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("lisen_addr"), "{err}");
    }

    #[test]
    fn peers_come_from_the_environment_too() {
        let cfg = ServiceConfig::from_toml(
            &DEFAULTS,
            "",
            &env(&[
                ("WALLET_TOKENS", "t:long-secret:read"),
                ("WALLET_PEER_WALLET_URL", "http://127.0.0.1:1"),
                ("WALLET_PEER_WALLET_TOKEN", "peer-secret"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.peer("wallet").unwrap().url, "http://127.0.0.1:1");
        let half = ServiceConfig::from_toml(
            &DEFAULTS,
            "",
            &env(&[
                ("WALLET_TOKENS", "t:long-secret:read"),
                ("WALLET_PEER_WALLET_URL", "http://127.0.0.1:1"),
            ]),
        )
        .unwrap_err();
        assert!(
            half.to_string().contains("WALLET_PEER_WALLET_URL"),
            "{half}"
        );
    }

    #[test]
    fn tls_paths_come_in_pairs_and_https_peers_name_their_ca() {
        let base = [
            ("WALLET_TOKENS", "t:long-secret:read"),
            ("WALLET_PEER_WALLET_URL", "https://wallet:1"),
            ("WALLET_PEER_WALLET_TOKEN", "peer-secret"),
        ];
        let err = ServiceConfig::from_toml(&DEFAULTS, "", &env(&base)).unwrap_err();
        assert!(err.to_string().contains("peers.wallet.ca_path"), "{err}");
        let mut with_ca = env(&base);
        with_ca.insert("WALLET_PEER_WALLET_CA_PATH".into(), "/etc/ca.pem".into());
        with_ca.insert("WALLET_TLS_CERT_PATH".into(), "/etc/cert.pem".into());
        with_ca.insert("WALLET_TLS_KEY_PATH".into(), "/etc/key.pem".into());
        let cfg = ServiceConfig::from_toml(&DEFAULTS, "", &with_ca).unwrap();
        assert_eq!(
            cfg.peer("wallet").unwrap().ca_path.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        let tls = cfg.tls.unwrap();
        assert_eq!(tls.cert_path, Path::new("/etc/cert.pem"));
        assert_eq!(tls.key_path, Path::new("/etc/key.pem"));
        let plain = ServiceConfig::from_toml(&DEFAULTS, "", &env(&base[..1])).unwrap();
        assert!(plain.tls.is_none());
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let cfg = ServiceConfig::from_toml(
            &DEFAULTS,
            "",
            &env(&[("WALLET_TOKENS", "pipeline:very-secret-value:read")]),
        )
        .unwrap();
        assert!(!format!("{cfg:?}").contains("very-secret-value"));
        let cfg = ServiceConfig::from_toml(
            &DEFAULTS,
            "",
            &env(&[
                ("WALLET_TOKENS", "pipeline:very-secret-value:read"),
                (
                    "WALLET_DATABASE_URL",
                    "postgres://billing:db-pass-4711@db.internal:5432/billing?sslmode=require",
                ),
            ]),
        )
        .unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("db-pass-4711"), "{shown}");
        assert!(
            shown
                .contains("postgres://billing:<redacted>@db.internal:5432/billing?sslmode=require"),
            "{shown}"
        );
    }

    #[test]
    fn the_payment_provider_is_the_simulator_unless_stripe_is_configured() {
        let tokens = ("WALLET_TOKENS", "t:long-secret:read");
        let cfg = ServiceConfig::from_toml(&DEFAULTS, "", &env(&[tokens])).unwrap();
        assert_eq!(cfg.payment_provider, PaymentProvider::Simulator);
        assert!(cfg.stripe.is_none());

        let cfg = ServiceConfig::from_toml(
            &DEFAULTS,
            "payment_provider = \"stripe\"\nstripe_secret_key = \"sk_test_file\"\n",
            &env(&[
                tokens,
                ("WALLET_STRIPE_SECRET_KEY", "sk_test_from_env_4711"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.payment_provider, PaymentProvider::Stripe);
        let stripe = cfg.stripe.clone().unwrap();
        assert_eq!(stripe.api_base, "https://api.stripe.com");
        assert_eq!(stripe.secret_key.expose(), "sk_test_from_env_4711");
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("from_env_4711"), "{shown}");
        assert!(
            shown.contains("Stripe") || shown.contains("stripe"),
            "{shown}"
        );

        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("stripe.key");
        std::fs::write(&key_file, "sk_test_in_a_file\n").unwrap();
        let cfg = ServiceConfig::from_toml(
            &DEFAULTS,
            "",
            &env(&[
                tokens,
                ("WALLET_PAYMENT_PROVIDER", "stripe"),
                ("WALLET_STRIPE_SECRET_KEY_FILE", key_file.to_str().unwrap()),
                ("WALLET_STRIPE_API_BASE", "http://127.0.0.1:8420"),
            ]),
        )
        .unwrap();
        let stripe = cfg.stripe.unwrap();
        assert_eq!(stripe.secret_key.expose(), "sk_test_in_a_file");
        assert_eq!(stripe.api_base, "http://127.0.0.1:8420");
        assert!(stripe.webhook_secret.is_none());

        let cfg = ServiceConfig::from_toml(
            &DEFAULTS,
            "",
            &env(&[
                tokens,
                ("WALLET_PAYMENT_PROVIDER", "stripe"),
                ("WALLET_STRIPE_SECRET_KEY", "sk_test_4711abcd"),
                ("WALLET_STRIPE_WEBHOOK_SECRET", "whsec_hook_4711"),
            ]),
        )
        .unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hook_4711"), "{shown}");
        assert_eq!(
            cfg.stripe.unwrap().webhook_secret.unwrap().expose(),
            "whsec_hook_4711"
        );
    }

    #[test]
    fn stripe_settings_are_checked_and_errors_name_them() {
        let tokens = ("WALLET_TOKENS", "t:long-secret:read");
        let stripe = ("WALLET_PAYMENT_PROVIDER", "stripe");
        let key = ("WALLET_STRIPE_SECRET_KEY", "sk_test_4711abcd");
        for (pairs, setting, needle) in [
            (
                vec![("WALLET_PAYMENT_PROVIDER", "paypal")],
                "payment_provider",
                "simulator or stripe",
            ),
            (
                vec![stripe],
                "stripe_secret_key",
                "WALLET_STRIPE_SECRET_KEY_FILE",
            ),
            (vec![key], "stripe_secret_key", "applies to Stripe only"),
            (
                vec![stripe, ("WALLET_STRIPE_SECRET_KEY", "pk_test_publishable")],
                "stripe_secret_key",
                "sk_",
            ),
            (
                vec![
                    stripe,
                    key,
                    ("WALLET_STRIPE_SECRET_KEY_FILE", "/nonexistent"),
                ],
                "stripe_secret_key",
                "not both",
            ),
            (
                vec![
                    stripe,
                    ("WALLET_STRIPE_SECRET_KEY_FILE", "/nonexistent/stripe.key"),
                ],
                "stripe_secret_key_file",
                "cannot read",
            ),
            (
                vec![
                    stripe,
                    key,
                    ("WALLET_STRIPE_API_BASE", "http://stripe.example.com"),
                ],
                "stripe_api_base",
                "must be https://",
            ),
            (
                vec![stripe, key, ("WALLET_STRIPE_API_BASE", "not a url")],
                "stripe_api_base",
                "not a URL",
            ),
            (
                vec![
                    stripe,
                    key,
                    ("WALLET_STRIPE_WEBHOOK_SECRET", "sk_test_4711abcd"),
                ],
                "stripe_webhook_secret",
                "whsec_",
            ),
            (
                vec![("WALLET_STRIPE_WEBHOOK_SECRET", "whsec_x")],
                "stripe_webhook_secret",
                "applies to Stripe only",
            ),
        ] {
            let mut pairs = pairs;
            pairs.push(tokens);
            let e = ServiceConfig::from_toml(&DEFAULTS, "", &env(&pairs)).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(setting) && text.contains(needle),
                "{pairs:?}: {text}"
            );
            assert!(
                !text.contains("4711abcd") && !text.contains("publishable"),
                "{text}"
            );
        }
    }

    #[test]
    fn redact_url_leaves_out_only_the_password() {
        for (url, shown) in [
            (
                "postgres://u:secret@h:5432/d",
                "postgres://u:<redacted>@h:5432/d",
            ),
            (
                "postgres://u:p%40ss@h/d?x=1",
                "postgres://u:<redacted>@h/d?x=1",
            ),
            ("postgres://u@h/d", "postgres://u@h/d"),
            (
                "postgres://h/d?user=u&password=secret&sslmode=disable",
                "postgres://h/d?user=u&password=<redacted>&sslmode=disable",
            ),
            ("postgres://u:secret@h", "postgres://u:<redacted>@h"),
            ("sqlite://data/wallet.db", "sqlite://data/wallet.db"),
            ("sqlite:data/x.db?mode=rwc", "sqlite:data/x.db?mode=rwc"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    // --- issue 19 (events out) ---
    #[test]
    fn webhooks_come_from_the_file_or_the_environment_and_are_validated() {
        let file = "[[tokens]]\nname = \"ops\"\ntoken = \"secret-ops\"\nscopes = [\"admin\"]\n\
            [[webhooks]]\nname = \"email\"\nurl = \"https://mail.example/hooks\"\n\
            secret = \"whsec_0123456789abcdef\"\nevent_types = [\"wallet.low_balance\"]\n";
        let cfg = ServiceConfig::from_toml(&DEFAULTS, file, &env(&[])).unwrap();
        let w = &cfg.events.webhooks[0];
        assert_eq!(
            (w.name.as_str(), w.url.as_str(), w.event_types.as_slice()),
            (
                "email",
                "https://mail.example/hooks",
                &["wallet.low_balance".to_string()][..]
            )
        );
        assert!(!format!("{cfg:?}").contains("whsec_0123456789abcdef"));
        let nats = ServiceConfig::from_toml(
            &DEFAULTS,
            "nats_url = \"nats://billing:nats-pass-4711@nats:4222\"",
            &env(&[("WALLET_TOKENS", "t:long-secret:read")]),
        )
        .unwrap();
        assert!(!format!("{nats:?}").contains("nats-pass-4711"));
        assert_eq!(cfg.events.retry, RetryPolicy::default());
        assert!(cfg.events.nats.is_none());

        let e = env(&[
            ("WALLET_TOKENS", "t:long-secret:read"),
            ("WALLET_WEBHOOKS", "crm, email-platform"),
            ("WALLET_WEBHOOK_CRM_URL", "http://crm:8080/in"),
            ("WALLET_WEBHOOK_CRM_SECRET", "crm-secret-0123456789"),
            ("WALLET_WEBHOOK_EMAIL_PLATFORM_URL", "http://mail:1/h"),
            (
                "WALLET_WEBHOOK_EMAIL_PLATFORM_SECRET",
                "mail-secret-0123456789",
            ),
            ("WALLET_WEBHOOK_EMAIL_PLATFORM_EVENT_TYPES", "a.b, c.d"),
            ("WALLET_NATS_URL", "nats://127.0.0.1:4222"),
        ]);
        let cfg = ServiceConfig::from_toml(&DEFAULTS, "", &e).unwrap();
        let names: Vec<_> = cfg
            .events
            .webhooks
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(names, ["crm", "email-platform"]);
        assert_eq!(cfg.events.webhooks[1].event_types, ["a.b", "c.d"]);
        let nats = cfg.events.nats.unwrap();
        assert_eq!(nats.stream, "BILLING_CREDITS_WALLET");

        let cases = [
            ("WALLET_WEBHOOK_CRM_URL", "ftp://x", "webhooks.crm.url"),
            ("WALLET_WEBHOOK_CRM_SECRET", "short", "webhooks.crm.secret"),
            ("WALLET_WEBHOOK_CRM_URL", "", "WALLET_WEBHOOK_CRM_URL"),
            ("WALLET_NATS_URL", "http://x", "nats_url"),
            ("WALLET_NATS_STREAM", "a.b", "nats_stream"),
            (
                "WALLET_EVENTS_RETRY_FOR_SECONDS",
                "60",
                "events_retry_for_seconds",
            ),
            ("WALLET_EVENTS_RETRY_MAX_MS", "10", "events_retry_max_ms"),
            ("WALLET_EVENTS_LEASE_SECONDS", "5", "events_lease_seconds"),
        ];
        for (key, value, named) in cases {
            let mut e = env(&[
                ("WALLET_TOKENS", "t:long-secret:read"),
                ("WALLET_WEBHOOKS", "crm"),
                ("WALLET_WEBHOOK_CRM_URL", "http://crm:8080/in"),
                ("WALLET_WEBHOOK_CRM_SECRET", "crm-secret-0123456789"),
            ]);
            if value.is_empty() {
                e.remove(key);
            } else {
                e.insert(key.into(), value.into());
            }
            let err = ServiceConfig::from_toml(&DEFAULTS, "", &e).unwrap_err();
            assert!(err.to_string().contains(named), "{key}={value}: {err}");
        }
        // A short retry budget is for tests only.
        let short = env(&[
            ("WALLET_TOKENS", "t:long-secret:read"),
            ("WALLET_TEST_CLOCK", "true"),
            ("WALLET_EVENTS_RETRY_FOR_SECONDS", "1"),
        ]);
        let cfg = ServiceConfig::from_toml(&DEFAULTS, "", &short).unwrap();
        assert_eq!(cfg.events.retry.give_up_after, Duration::from_secs(1));
        let twice = "[[tokens]]\nname = \"o\"\ntoken = \"secret-ops\"\nscopes = [\"admin\"]\n\
            [[webhooks]]\nname = \"a\"\nurl = \"http://h/\"\nsecret = \"0123456789abcdef\"\n\
            [[webhooks]]\nname = \"a\"\nurl = \"http://h/\"\nsecret = \"0123456789abcdef\"\n";
        let err = ServiceConfig::from_toml(&DEFAULTS, twice, &env(&[])).unwrap_err();
        assert!(err.to_string().contains("share"), "{err}");
    }
    // --- end issue 19 ---
}
