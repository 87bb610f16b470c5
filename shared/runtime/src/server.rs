//! Assembles a service: storage, clock, outbox relay, event sinks ([`crate::relay`]) and
//! `EventDelivery`, key sweeper, health (with the probe of
//! its required peers, [`crate::health`]), reflection, the middleware stack and the metrics
//! endpoint; serves until shutdown, then drains.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use chrono::{TimeZone, Utc};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    service::Routes,
    transport::{Identity, Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;
use tower::ServiceBuilder;

use crate::{
    auth::{AuthLayer, MethodScopes, Scope, TokenRegistry},
    clock::ServiceClock,
    clock_service::TestClockService,
    config::{ServiceConfig, ServiceDefaults, TlsConfig},
    db::{self, Db, Migrations},
    // --- issue 19 (events out) ---
    event_delivery::EventDeliveryService,
    idempotency,
    metrics::{self, Metrics},
    middleware::{LoadShedLayer, RequestContextLayer, TimeoutLayer},
    outbox::Outbox,
    relay::{self, Relay},
    // --- end issue 19 ---
};

pub use crate::event_delivery::EVENT_DELIVERY_SERVICE;

/// The full gRPC name of the test clock service.
pub const TEST_CLOCK_SERVICE: &str = "billing.common.v1.TestClock";

/// What a service tells the runtime about itself.
pub struct ServiceSpec {
    /// Name, env prefix, default ports and schema.
    pub defaults: ServiceDefaults,
    /// Full names of the gRPC services it serves (listed by reflection, reported by health).
    pub grpc_services: &'static [&'static str],
    /// The scope each business RPC requires.
    pub scopes: fn() -> MethodScopes,
    /// The service's migrations for both backends.
    pub migrations: fn() -> Migrations,
}

/// Everything a service's handlers share, built by the runtime.
#[derive(Clone)]
pub struct Platform {
    /// Validated configuration.
    pub config: Arc<ServiceConfig>,
    /// Storage.
    pub db: Db,
    /// The clock every rule reads.
    pub clock: ServiceClock,
    /// The transactional outbox.
    pub outbox: Outbox,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the service begins to shut down; long-running work stops on it.
    pub shutdown: CancellationToken,
    /// Plain HTTP routes the service adds to its metrics listener while it builds its gRPC
    /// routes (Stripe's webhooks, `crate::stripe_webhook`).
    pub http_routes: HttpRoutes,
}

impl Platform {
    /// Serves Stripe's webhooks ([`crate::stripe_webhook`]) on the metrics listener, applied
    /// through `handler`, when the configuration has Stripe with a webhook signing secret;
    /// otherwise nothing (no endpoint without a secret to verify its deliveries).
    pub fn serve_stripe_webhooks(&self, handler: Arc<dyn crate::stripe_webhook::WebhookHandler>) {
        if let Some(secret) = self
            .config
            .stripe
            .as_ref()
            .and_then(|s| s.webhook_secret.clone())
        {
            self.http_routes
                .add(crate::stripe_webhook::router(secret, handler));
        }
    }
}

/// HTTP routes served next to `/metrics` on the metrics listener.
#[derive(Clone, Default)]
pub struct HttpRoutes(Arc<std::sync::Mutex<Option<axum::Router>>>);

impl HttpRoutes {
    /// Adds `router`'s routes.
    pub fn add(&self, router: axum::Router) {
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(match slot.take() {
            Some(existing) => existing.merge(router),
            None => router,
        });
    }

    /// The routes added so far, leaving none.
    pub fn take(&self) -> Option<axum::Router> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// A service that is serving, as returned by [`start`].
pub struct Running {
    /// Where gRPC listens.
    pub addr: SocketAddr,
    /// Where `/metrics` listens, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Cancel to shut down gracefully.
    pub shutdown: CancellationToken,
    /// Ends when the service has drained and stopped.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The platform, for tests that look inside.
    pub platform: Platform,
}

impl Running {
    /// Shuts down gracefully and waits for the drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// The test clock's start when none is given: a fixed, recognizable instant.
fn test_clock_start() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_else(Utc::now)
}

/// Binds the listeners, connects storage, migrates, and serves in a background task.
/// `build` adds the service's own gRPC services to the routes.
pub async fn start<F>(
    spec: &ServiceSpec,
    config: ServiceConfig,
    build: F,
) -> anyhow::Result<Running>
where
    F: FnOnce(&Platform) -> anyhow::Result<Routes>,
{
    // First, so a missing or unusable certificate stops the start (naming its path) before
    // anything runs.
    let mut server = Server::builder().max_concurrent_streams(Some(config.max_concurrent_streams));
    if let Some(t) = &config.tls {
        server = server
            .tls_config(server_tls(t)?)
            .with_context(|| format!("TLS identity in {}", t.cert_path.display()))?;
    }
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new(spec.defaults.name);
    let db = Db::connect(&config, &(spec.migrations)()).await?;
    let clock = if config.test_clock {
        ServiceClock::test(config.test_clock_start.unwrap_or_else(test_clock_start))
    } else {
        ServiceClock::system()
    };
    let outbox = Outbox::new(db.clone(), clock.clone(), Arc::clone(&metrics));
    // --- issue 19 (events out): one relay per configured sink ---
    let sinks = relay::sinks(&config.events, spec.defaults.name)?;
    let sink_names: Vec<String> = sinks.iter().map(|s| s.name().to_string()).collect();
    let relays: Vec<Relay> = sinks
        .into_iter()
        .map(|sink| {
            Relay::new(
                db.clone(),
                &outbox,
                sink,
                config.events.retry,
                Arc::clone(&metrics),
            )
            .with_lease(config.events.lease)
        })
        .collect();
    // --- end issue 19 ---
    let platform = Platform {
        config: Arc::clone(&config),
        db: db.clone(),
        clock: clock.clone(),
        outbox: outbox.clone(),
        metrics: Arc::clone(&metrics),
        shutdown: shutdown.clone(),
        http_routes: HttpRoutes::default(),
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    for name in spec.grpc_services {
        health_reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }

    let mut reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name(TEST_CLOCK_SERVICE)
        .with_service_name(EVENT_DELIVERY_SERVICE);
    let mut reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name(TEST_CLOCK_SERVICE)
        .with_service_name(EVENT_DELIVERY_SERVICE);
    for name in spec.grpc_services {
        reflection_v1 = reflection_v1.with_service_name(*name);
        reflection_v1alpha = reflection_v1alpha.with_service_name(*name);
    }

    // The service's own servers set the same limits in `build` (from `platform.config`);
    // tests/src/limits.rs sends an oversized request to every RPC to check that none is missed.
    let (max_in, max_out) = (config.max_request_bytes, config.max_response_bytes);
    let routes = build(&platform)?
        .add_service(
            health_service
                .max_decoding_message_size(max_in)
                .max_encoding_message_size(max_out),
        )
        .add_service(
            reflection_v1
                .build_v1()?
                .max_decoding_message_size(max_in)
                .max_encoding_message_size(max_out),
        )
        .add_service(
            reflection_v1alpha
                .build_v1alpha()?
                .max_decoding_message_size(max_in)
                .max_encoding_message_size(max_out),
        )
        .add_service(
            proto::common::v1::test_clock_server::TestClockServer::new(TestClockService::new(
                clock.clone(),
            ))
            .max_decoding_message_size(max_in)
            .max_encoding_message_size(max_out),
        )
        .add_service(
            proto::common::v1::event_delivery_server::EventDeliveryServer::new(
                EventDeliveryService::new(db.clone(), clock.clone(), sink_names),
            )
            .max_decoding_message_size(max_in)
            .max_encoding_message_size(max_out),
        );

    let scopes = (spec.scopes)()
        .require(TEST_CLOCK_SERVICE, "GetTime", Scope::Read)
        .require(TEST_CLOCK_SERVICE, "AdvanceTime", Scope::Admin)
        .require(EVENT_DELIVERY_SERVICE, "ListDeliveries", Scope::Read)
        .require(EVENT_DELIVERY_SERVICE, "RetryDeadLetter", Scope::Admin);
    let layers = ServiceBuilder::new()
        .layer(RequestContextLayer::new(
            spec.defaults.name,
            Arc::clone(&metrics),
        ))
        .layer(LoadShedLayer::new(
            config.concurrency_limit,
            Arc::clone(&metrics),
        ))
        .layer(AuthLayer::new(TokenRegistry::new(&config.tokens), scopes))
        .layer(TimeoutLayer::new(config.request_timeout))
        .into_inner();

    let listener = TcpListener::bind(config.listen_addr).await?;
    let addr = listener.local_addr()?;
    let metrics_listener = match config.metrics_addr {
        Some(a) => Some(TcpListener::bind(a).await?),
        None => None,
    };
    let http_routes = platform.http_routes.take();
    anyhow::ensure!(
        http_routes.is_none() || metrics_listener.is_some(),
        "Stripe's webhook endpoint is served on the metrics listener: set metrics_addr (it is off)"
    );
    let metrics_addr = metrics_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;

    let peer_probe = crate::health::spawn_peer_probe(
        crate::health::required_peers(&spec.defaults, &config)
            .into_iter()
            .cloned()
            .collect(),
        spec.grpc_services,
        health_reporter.clone(),
        shutdown.clone(),
    );
    let relay = outbox.spawn_relay(shutdown.clone());
    let sink_relays: Vec<_> = relays
        .into_iter()
        .map(|r| r.spawn(shutdown.clone()))
        .collect();
    let sweeper = spawn_key_sweeper(&platform);
    let checkpointer = spawn_checkpointer(&platform);
    let metrics_task = metrics_listener.map(|l| {
        tokio::spawn(metrics::serve_metrics(
            l,
            Arc::clone(&metrics),
            db.clone(),
            shutdown.clone(),
            http_routes,
        ))
    });

    let name = spec.defaults.name;
    let signal = shutdown.clone();
    let task = tokio::spawn(async move {
        let drain = async move {
            signal.cancelled().await;
            // Tell load balancers first, then stop accepting and let in-flight calls finish.
            health_reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            tracing::info!(
                service = name,
                "shutting down: NOT_SERVING, draining in-flight calls"
            );
        };
        let served = server
            .layer(layers)
            .add_routes(routes)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain)
            .await;
        let _ = relay.await;
        for r in sink_relays {
            let _ = r.await;
        }
        if let Some(probe) = peer_probe {
            let _ = probe.await;
        }
        let _ = sweeper.await;
        let _ = checkpointer.await;
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        db.close().await;
        tracing::info!(service = name, "stopped");
        served.map_err(anyhow::Error::from)
    });
    tracing::info!(service = name, %addr, metrics = ?metrics_addr, "serving");
    Ok(Running {
        addr,
        metrics_addr,
        shutdown,
        task,
        platform,
    })
}

/// The server's TLS identity from its PEM files.
fn server_tls(tls: &TlsConfig) -> anyhow::Result<ServerTlsConfig> {
    let cert = std::fs::read(&tls.cert_path)
        .with_context(|| format!("tls_cert_path {}", tls.cert_path.display()))?;
    let key = std::fs::read(&tls.key_path)
        .with_context(|| format!("tls_key_path {}", tls.key_path.display()))?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
}

fn spawn_key_sweeper(platform: &Platform) -> tokio::task::JoinHandle<()> {
    let db = platform.db.clone();
    let clock = platform.clock.clone();
    let retention =
        i64::try_from(platform.config.idempotency_retention.as_micros()).unwrap_or(i64::MAX);
    let shutdown = platform.shutdown.clone();
    tokio::spawn(async move {
        loop {
            match idempotency::sweep(&db, clock.now_micros().saturating_sub(retention)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(swept = n, "expired idempotency keys removed"),
                Err(e) => tracing::warn!(error = %e, "idempotency key sweep failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(600)) => {}
            }
        }
    })
}

/// Copies SQLite's write-ahead log into the database file off the writer's path
/// ([`Db::checkpoint`]): every [`db::CHECKPOINT_EVERY`] while the log grows, waiting twice as
/// long after each checkpoint that found nothing new (or failed), up to
/// [`db::CHECKPOINT_IDLE`]. Ends at
/// once where there is nothing to checkpoint (PostgreSQL, SQLite in memory).
fn spawn_checkpointer(platform: &Platform) -> tokio::task::JoinHandle<()> {
    let database = platform.db.clone();
    let shutdown = platform.shutdown.clone();
    tokio::spawn(async move {
        let mut last = None;
        let mut wait = db::CHECKPOINT_EVERY;
        loop {
            match database.checkpoint().await {
                Ok(None) => break,
                Ok(Some(done)) => {
                    let idle = last == Some((done.wal_pages, done.copied_pages));
                    wait = if idle {
                        (wait * 2).min(db::CHECKPOINT_IDLE)
                    } else {
                        db::CHECKPOINT_EVERY
                    };
                    last = Some((done.wal_pages, done.copied_pages));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "background WAL checkpoint failed");
                    wait = (wait * 2).min(db::CHECKPOINT_IDLE);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The whole `main` of a service binary: configuration from `{PREFIX}_CONFIG` and the
/// environment, logs, serve until SIGTERM or Ctrl-C, drain, exit.
pub async fn run_main<F>(spec: &ServiceSpec, build: F) -> std::process::ExitCode
where
    F: FnOnce(&Platform) -> anyhow::Result<Routes>,
{
    let config = match ServiceConfig::load(&spec.defaults, &crate::config::ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: configuration error: {e}", spec.defaults.name);
            return std::process::ExitCode::from(2);
        }
    };
    crate::telemetry::init(config.log_format, &config.log_filter);
    let running = match start(spec, config, build).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "failed to start");
            return std::process::ExitCode::FAILURE;
        }
    };
    shutdown_signal().await;
    match running.stop().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "server failed");
            std::process::ExitCode::FAILURE
        }
    }
}
