//! [`ServiceConfig::load`]: the file, then the environment, every setting validated.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    ConfigError, DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES, LogFormat, MIN_MESSAGE_BYTES, ServiceConfig, ServiceDefaults,
    TlsConfig,
    error::invalid,
    events::{EventsConfig, EventsFile},
    payment::{PaymentSource, payment_settings},
    peers,
    source::{Environment, FileConfig, Layered, parse_addr, parse_num, read_file},
    tokens::{parse_tokens, validate_tokens},
};

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

    pub(super) fn from_parts(
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
        let peers = peers::resolve(defaults, file.peers, &get)?;
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
}
