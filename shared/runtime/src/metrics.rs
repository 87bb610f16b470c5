//! Prometheus metrics, served as text on a separate HTTP port per service (`/metrics`).
//!
//! Per-RPC request counts by gRPC code, latency histograms, calls in flight and shed, database
//! pool use, and outbox lag (events not yet given a delivery cursor, and the age of the oldest);
//! per event sink (webhook, NATS): deliveries, failures, dead letters and its cursor.

use std::sync::Arc;

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

use crate::db::Db;

/// Labels of a finished call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Full gRPC path.
    pub method: String,
    /// gRPC status code name, e.g. `OK`, `UNAUTHENTICATED`.
    pub code: String,
}

/// Labels of a latency observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// Full gRPC path.
    pub method: String,
}

/// Labels of the pool gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `open` or `idle`.
    pub state: &'static str,
}

/// Labels of an event sink's metrics (issue 19).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// The sink: `webhook:<name>` or `nats`.
    pub sink: String,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// One service's metrics.
pub struct Metrics {
    registry: Registry,
    /// Finished calls by method and code.
    pub rpc_requests: Family<CallLabels, Counter>,
    /// Call latency by method, in seconds.
    pub rpc_latency: HistogramFamily,
    /// Calls being served now.
    pub in_flight: Gauge,
    /// Calls refused by load shedding.
    pub shed: Counter,
    /// Database connections by state.
    pub pool: Family<PoolLabels, Gauge>,
    /// Outbox events not yet given a delivery cursor.
    pub outbox_pending: Gauge,
    /// Age in seconds of the oldest such event (0 when none).
    pub outbox_oldest_pending_seconds: Gauge,
    /// The newest delivery cursor.
    pub outbox_head_cursor: Gauge,
    /// Transactions committed by group commit (many mutations in one transaction).
    pub group_commit_batches: Counter,
    /// Mutations answered in those transactions.
    pub group_commit_mutations: Counter,
    /// Mutations group commit handed back to run alone (and batches that failed).
    pub group_commit_alone: Counter,
    /// Events a sink acknowledged.
    pub relay_delivered: Family<SinkLabels, Counter>,
    /// Failed delivery attempts (each retried or dead-lettered).
    pub relay_failures: Family<SinkLabels, Counter>,
    /// Events dead-lettered after their retry budget.
    pub relay_dead_lettered: Family<SinkLabels, Counter>,
    /// Dead letters not delivered since (state `dead` or `retrying`).
    pub relay_dead_letters: Family<SinkLabels, Gauge>,
    /// The sink's acknowledged cursor (lag = `outbox_head_cursor` minus this).
    pub relay_acked_cursor: Family<SinkLabels, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s in 16 doubling buckets.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Metrics {
    /// Registers every metric under the `billing` prefix with a `service` label.
    pub fn new(service: &'static str) -> Arc<Self> {
        let mut registry = Registry::with_prefix_and_labels(
            "billing",
            [("service".into(), service.into())].into_iter(),
        );
        let rpc_requests = Family::<CallLabels, Counter>::default();
        let rpc_latency = HistogramFamily::new_with_constructor(latency_histogram);
        let in_flight = Gauge::default();
        let shed = Counter::default();
        let pool = Family::<PoolLabels, Gauge>::default();
        let outbox_pending = Gauge::default();
        let outbox_oldest_pending_seconds = Gauge::default();
        let outbox_head_cursor = Gauge::default();
        let group_commit_batches = Counter::default();
        let group_commit_mutations = Counter::default();
        let group_commit_alone = Counter::default();
        registry.register(
            "rpc_requests",
            "Finished gRPC calls by method and status code",
            rpc_requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency by method",
            rpc_latency.clone(),
        );
        registry.register(
            "rpc_in_flight",
            "gRPC calls being served",
            in_flight.clone(),
        );
        registry.register(
            "rpc_shed",
            "gRPC calls refused with RESOURCE_EXHAUSTED by the concurrency limit",
            shed.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Database pool connections by state",
            pool.clone(),
        );
        registry.register(
            "outbox_pending_events",
            "Outbox events not yet given a delivery cursor",
            outbox_pending.clone(),
        );
        registry.register(
            "outbox_oldest_pending_seconds",
            "Age of the oldest outbox event not yet given a delivery cursor",
            outbox_oldest_pending_seconds.clone(),
        );
        registry.register(
            "outbox_head_cursor",
            "The newest delivery cursor of the event stream",
            outbox_head_cursor.clone(),
        );
        registry.register(
            "group_commit_batches",
            "Transactions committed by group commit, each holding many mutations",
            group_commit_batches.clone(),
        );
        registry.register(
            "group_commit_mutations",
            "Mutations answered inside group-commit transactions",
            group_commit_mutations.clone(),
        );
        registry.register(
            "group_commit_alone",
            "Mutations group commit handed back to run in their own transaction",
            group_commit_alone.clone(),
        );
        let relay_delivered = Family::<SinkLabels, Counter>::default();
        let relay_failures = Family::<SinkLabels, Counter>::default();
        let relay_dead_lettered = Family::<SinkLabels, Counter>::default();
        let relay_dead_letters = Family::<SinkLabels, Gauge>::default();
        let relay_acked_cursor = Family::<SinkLabels, Gauge>::default();
        registry.register(
            "events_delivered",
            "Events a sink (webhook, NATS) acknowledged",
            relay_delivered.clone(),
        );
        registry.register(
            "events_delivery_failures",
            "Failed event delivery attempts, by sink",
            relay_failures.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Events dead-lettered after their retry budget, by sink",
            relay_dead_lettered.clone(),
        );
        registry.register(
            "events_dead_letters",
            "Dead-lettered events not delivered since, by sink",
            relay_dead_letters.clone(),
        );
        registry.register(
            "events_acked_cursor",
            "The cursor up to which a sink has every event acknowledged, by sink",
            relay_acked_cursor.clone(),
        );
        Arc::new(Self {
            registry,
            rpc_requests,
            rpc_latency,
            in_flight,
            shed,
            pool,
            outbox_pending,
            outbox_oldest_pending_seconds,
            outbox_head_cursor,
            group_commit_batches,
            group_commit_mutations,
            group_commit_alone,
            relay_delivered,
            relay_failures,
            relay_dead_lettered,
            relay_dead_letters,
            relay_acked_cursor,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            tracing::error!("metrics encoding failed");
        }
        out
    }
}

#[derive(Clone)]
struct Scrape {
    metrics: Arc<Metrics>,
    db: Db,
}

async fn scrape(State(s): State<Scrape>) -> impl IntoResponse {
    let (open, idle) = s.db.pool_usage();
    s.metrics
        .pool
        .get_or_create(&PoolLabels { state: "open" })
        .set(i64::from(open));
    s.metrics
        .pool
        .get_or_create(&PoolLabels { state: "idle" })
        .set(i64::try_from(idle).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// Serves `/metrics` (and the service's `extra` HTTP routes) on `listener` until `shutdown` is
/// cancelled.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    db: Db,
    shutdown: CancellationToken,
    extra: Option<Router>,
) -> std::io::Result<()> {
    let mut app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Scrape { metrics, db });
    if let Some(extra) = extra {
        app = app.merge(extra);
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
