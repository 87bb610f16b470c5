//! `--webhook`: the wallet's events delivered, during the load, to a webhook receiver in this
//! process, and how far behind the load that delivery runs.
//!
//! The receiver (axum, HTTP/1.1 on 127.0.0.1) verifies every `Billing-Signature` with
//! [`runtime::relay::webhook::verify`], answers 204, and records each event's `cursor`, its
//! `created_at` (the service's clock when the change happened) and the time it arrived
//! (`SystemTime`: the services run on this machine, on the same clock). Before the timed load
//! the harness waits until the setup's events are delivered, so the load starts with no
//! backlog; after it, until the sink's acknowledged cursor reaches the outbox head.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use proto::common::v1::{ListDeliveriesRequest, event_delivery_client::EventDeliveryClient};
use runtime::relay::webhook::{SIGNATURE_HEADER, verify};
use tonic::transport::Channel;

use crate::stack::Auth;

/// The endpoint's name in the services' configuration; the sink is `webhook:bench`.
pub const NAME: &str = "bench";
/// How far from our clock a signature's timestamp may be.
const TOLERANCE: Duration = Duration::from_secs(300);
/// Longest wait for a backlog to drain before the harness gives up.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// One delivered event.
#[derive(Clone, Copy)]
struct Received {
    cursor: u64,
    created_us: i64,
    received_us: i64,
}

#[derive(Default)]
struct Log {
    events: Vec<Received>,
    ids: HashSet<String>,
    duplicates: u64,
    refused: u64,
}

/// The receiver: where the services POST, and what arrived.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub secret: String,
    log: Arc<Mutex<Log>>,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

type Shared = (String, Arc<Mutex<Log>>);

async fn receive(
    State((secret, log)): State<Shared>,
    Path(_service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let received_us = now_us();
    let header = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parsed = verify(
        secret.as_bytes(),
        header,
        &body,
        received_us / 1_000_000,
        TOLERANCE,
    )
    .ok()
    .and_then(|()| serde_json::from_slice::<serde_json::Value>(&body).ok())
    .and_then(|v| {
        let id = v.get("id")?.as_str()?.to_string();
        let cursor = v.get("cursor")?.as_u64()?;
        let created = chrono::DateTime::parse_from_rfc3339(v.get("created_at")?.as_str()?).ok()?;
        Some((id, cursor, created.timestamp_micros()))
    });
    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
    let Some((id, cursor, created_us)) = parsed else {
        log.refused += 1;
        return StatusCode::BAD_REQUEST;
    };
    if log.ids.insert(id) {
        log.events.push(Received {
            cursor,
            created_us,
            received_us,
        });
    } else {
        log.duplicates += 1;
    }
    StatusCode::NO_CONTENT
}

impl Receiver {
    /// Listens on a free 127.0.0.1 port, `POST /<service>`.
    pub async fn start() -> anyhow::Result<Receiver> {
        let secret = format!("whsec_bench_{}", uuid::Uuid::new_v4().simple());
        let log = Arc::new(Mutex::new(Log::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/{service}", post(receive))
            .with_state((secret.clone(), log.clone()));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("bench: webhook receiver stopped: {e}");
            }
        });
        Ok(Receiver { addr, secret, log })
    }

    /// The endpoint URL of one service.
    pub fn url(&self, service: &str) -> String {
        format!("http://{}/{service}", self.addr)
    }

    fn snapshot(&self) -> (Vec<Received>, u64, u64) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        (log.events.clone(), log.duplicates, log.refused)
    }
}

/// The outbox head and the sink's acknowledged cursor, from `ListDeliveries`.
async fn position(ch: &Channel, auth: &Auth) -> anyhow::Result<(u64, u64)> {
    let answer = EventDeliveryClient::new(ch.clone())
        .list_deliveries(auth.req(ListDeliveriesRequest {
            sink: format!("webhook:{NAME}"),
            ..Default::default()
        }))
        .await
        .context("ListDeliveries")?
        .into_inner();
    let acked = answer
        .sinks
        .iter()
        .find(|s| s.sink == format!("webhook:{NAME}"))
        .map_or(0, |s| s.acked_cursor);
    Ok((answer.head_cursor, acked))
}

/// The wallet's outbox head cursor (the events it has given a cursor so far).
pub async fn head(ch: &Channel, auth: &Auth) -> anyhow::Result<u64> {
    Ok(position(ch, auth).await?.0)
}

/// Waits until the sink has acknowledged the outbox head and the head has not moved for
/// 500 ms (the outbox gives committed events their cursor within about 200 ms). Returns the head.
async fn drained(ch: &Channel, auth: &Auth) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut stable_since: Option<(u64, Instant)> = None;
    loop {
        let (head, acked) = position(ch, auth).await?;
        if acked >= head {
            match stable_since {
                Some((h, since)) if h == head && since.elapsed() >= Duration::from_millis(500) => {
                    return Ok(head);
                }
                Some((h, _)) if h == head => {}
                _ => stable_since = Some((head, Instant::now())),
            }
        } else {
            stable_since = None;
        }
        if started.elapsed() > DRAIN_LIMIT {
            bail!(
                "webhook backlog not drained after {} s (head {head}, acked {acked})",
                DRAIN_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The state just before the timed load.
pub struct Mark {
    head: u64,
    start_us: i64,
    /// Every 500 ms of the load: (outbox head, sink's acked cursor), relative to `head`.
    samples: Arc<Mutex<Vec<(u64, u64)>>>,
    sampler: tokio::task::JoinHandle<()>,
    /// How long the setup's events took to drain after the setup.
    pub setup_drain: Duration,
}

/// Waits for the setup's events to be delivered, then marks the start of the load.
pub async fn before_load(ch: &Channel, auth: &Auth) -> anyhow::Result<Mark> {
    let started = Instant::now();
    let head = drained(ch, auth).await?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (ch, auth, samples) = (ch.clone(), auth.clone(), samples.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                if let Ok((h, a)) = position(&ch, &auth).await {
                    let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
                    s.push((h.saturating_sub(head), a.saturating_sub(head)));
                }
            }
        })
    };
    Ok(Mark {
        head,
        start_us: now_us(),
        samples,
        sampler,
        setup_drain: started.elapsed(),
    })
}

/// What the webhook saw of the load.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Events the wallet wrote during the load (outbox head after it minus before).
    pub produced: u64,
    pub load: Duration,
    /// Of those, delivered before the load ended.
    pub delivered_during: u64,
    /// Delivered in all (after the drain).
    pub delivered: u64,
    /// Delivery lag (received - created_at) of the load's events, in microseconds.
    pub lag_p50_us: i64,
    pub lag_p99_us: i64,
    pub lag_max_us: i64,
    /// From the end of the load to the arrival of its last event.
    pub drain: Duration,
    pub setup_drain: Duration,
    pub duplicates: u64,
    pub refused: u64,
    /// Every 500 ms from the start of the load: events given a cursor so far, and acknowledged
    /// by the webhook so far (the first sample at the start).
    pub samples: Vec<(u64, u64)>,
}

/// Call right after the timed load: waits for the sink to catch up, then computes the figures
/// of the events with a cursor above `mark`'s head.
pub async fn after_load(
    ch: &Channel,
    auth: &Auth,
    rx: &Receiver,
    mark: &Mark,
) -> anyhow::Result<Figures> {
    let end_us = now_us();
    mark.sampler.abort();
    let samples = mark
        .samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let head = drained(ch, auth).await?;
    let (events, duplicates, refused) = rx.snapshot();
    let mut ours: Vec<Received> = events
        .into_iter()
        .filter(|e| e.cursor > mark.head && e.cursor <= head)
        .collect();
    let mut lags: Vec<i64> = ours.iter().map(|e| e.received_us - e.created_us).collect();
    lags.sort_unstable();
    let at = |p: usize| -> i64 {
        if lags.is_empty() {
            0
        } else {
            lags[((lags.len() - 1) * p).div_ceil(1000)]
        }
    };
    ours.sort_by_key(|e| e.received_us);
    let last = ours.last().map_or(end_us, |e| e.received_us);
    Ok(Figures {
        produced: head - mark.head,
        load: Duration::from_micros(u64::try_from(end_us - mark.start_us).unwrap_or(0)),
        delivered_during: ours.iter().filter(|e| e.received_us <= end_us).count() as u64,
        delivered: ours.len() as u64,
        lag_p50_us: at(500),
        lag_p99_us: at(990),
        lag_max_us: at(1000),
        drain: Duration::from_micros(u64::try_from(last - end_us).unwrap_or(0)),
        setup_drain: mark.setup_drain,
        duplicates,
        refused,
        samples,
    })
}
