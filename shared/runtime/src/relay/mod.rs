//! Events out (issue 19): the outbox's events delivered to sinks (webhook endpoints, NATS
//! JetStream), one background [`Relay`] per sink.
//!
//! - A sink's position is its row in `relay_sinks`: `acked_cursor` says every event up to it
//!   was acknowledged by the sink, filtered out, or dead-lettered. The relay reads the events
//!   after it (cursors given by the outbox relay, [`crate::outbox`]) in cursor order, delivers
//!   one at a time, and advances `acked_cursor` only after the sink acknowledged. A crash between
//!   the acknowledgement and that write redelivers the event, with the same id: receivers
//!   deduplicate by `id` (JetStream by `Nats-Msg-Id`).
//! - Several replicas may share one database: a sink is delivered by the replica holding its
//!   lease (`lease_owner`, `lease_until_us` in the sink's row, taken with a conditional
//!   `UPDATE`). Every write of a delivering relay is fenced on still holding the lease, so a
//!   replica that lost it (paused past the expiry) stops instead of moving the cursor.
//! - A failed delivery is retried after a wait that doubles from `initial` to `max`
//!   ([`RetryPolicy`]); after `give_up_after` since the event's first failure, the event is
//!   dead-lettered (`relay_dead_letters`, state `dead`) and the sink goes on with the next.
//!   `RetryDeadLetter` ([`crate::event_delivery`]) sets it `retrying`: the relay tries it once
//!   more, then marks it `delivered` or `dead` again.
//! - The relay runs outside every request's transaction: a slow or dead sink delays only its own
//!   deliveries, never a service's writes. Its waits and the lease follow the wall clock (not the
//!   service's test clock, which may be frozen).

pub mod nats;
pub mod webhook;

use std::{sync::Arc, time::Duration};

use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{EventsConfig, RetryPolicy},
    db::{Db, DbError},
    metrics::{Metrics, SinkLabels},
    outbox::Outbox,
};

/// One event as it leaves the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundEvent {
    /// Its position in the service's event stream.
    pub cursor: i64,
    /// Unique id, stable across redeliveries.
    pub event_id: String,
    /// e.g. `wallet.low_balance`.
    pub event_type: String,
    /// The entity it is about.
    pub subject: String,
    /// When the change happened (service clock), microseconds since the epoch.
    pub occurred_at_us: i64,
    /// The payload, a JSON object.
    pub payload_json: String,
}

impl OutboundEvent {
    /// The JSON document sinks send: `{id, type, cursor, created_at, subject, payload}`.
    pub fn body(&self) -> Vec<u8> {
        let payload: serde_json::Value = serde_json::from_str(&self.payload_json)
            .unwrap_or_else(|_| serde_json::Value::String(self.payload_json.clone()));
        let created_at = crate::clock::from_micros(self.occurred_at_us)
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        serde_json::json!({
            "id": self.event_id,
            "type": self.event_type,
            "cursor": self.cursor,
            "created_at": created_at,
            "subject": self.subject,
            "payload": payload,
        })
        .to_string()
        .into_bytes()
    }
}

/// Why a sink did not acknowledge an event (retried, see [`RetryPolicy`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeliveryError(pub String);

/// Where events go.
#[async_trait::async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Unique among the service's sinks, and stable: it keys the sink's row (`webhook:email`).
    fn name(&self) -> &str;
    /// Whether the sink takes events of this type (others are skipped, the cursor moves on).
    fn wants(&self, event_type: &str) -> bool;
    /// Delivers one event; `Ok` only once the receiver acknowledged it.
    async fn deliver(&self, event: &OutboundEvent) -> Result<(), DeliveryError>;
}

/// How long a lease lasts without renewal (default of `events_lease_seconds`). A relay renews
/// it with every ack, and on a pass once a third of it has passed; it waits at most a third of it
/// between passes.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often a relay without the lease (another replica delivers) looks again.
const STANDBY_POLL: Duration = Duration::from_secs(1);
/// How often an idle relay looks for events of other replicas.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Events read at once.
const BATCH: i64 = 100;
/// Longest error text kept.
const MAX_ERROR_LEN: usize = 500;

/// What one pass of a relay came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Another replica holds the lease.
    Standby,
    /// Nothing to deliver.
    Idle,
    /// Delivered (or skipped, or dead-lettered) some events; there may be more.
    Progress,
    /// The head event failed; the next attempt is due at this wall-clock instant (µs).
    Backoff(i64),
}

/// The state of one sink, as `ListDeliveries` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkState {
    /// Sink name.
    pub sink: String,
    /// Every event up to this cursor is acknowledged, filtered out or dead-lettered.
    pub acked_cursor: i64,
    /// Failed attempts at the head event (0 when it is not failing).
    pub attempts: i64,
    /// When the head event first failed (µs), if it is failing.
    pub first_failed_at_us: Option<i64>,
    /// When the head event is tried next (µs); 0 when not waiting.
    pub next_attempt_at_us: i64,
    /// The head event's last failure.
    pub last_error: Option<String>,
    /// The replica delivering the sink, if its lease is live.
    pub lease_owner: Option<String>,
}

/// One dead-lettered event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Sink name.
    pub sink: String,
    /// The event's cursor.
    pub cursor: i64,
    /// The event's id.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// Attempts made.
    pub attempts: i64,
    /// The last failure.
    pub last_error: String,
    /// When it was dead-lettered (µs).
    pub dead_at_us: i64,
    /// `dead`, `retrying` or `delivered`.
    pub state: String,
}

/// The wall clock, in microseconds since the epoch.
fn wall_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The wait before attempt `failures + 1`: `initial` doubled per earlier failure, at most `max`.
pub fn backoff(policy: &RetryPolicy, failures: i64) -> Duration {
    let doublings = u32::try_from(failures.saturating_sub(1).clamp(0, 32)).unwrap_or(32);
    policy
        .initial
        .checked_mul(1u32 << doublings.min(31))
        .unwrap_or(policy.max)
        .min(policy.max)
}

fn cut(text: &str) -> String {
    if text.len() <= MAX_ERROR_LEN {
        return text.to_string();
    }
    let mut end = MAX_ERROR_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Delivers one sink's events. Cheap to clone.
#[derive(Clone)]
pub struct Relay {
    db: Db,
    sink: Arc<dyn Sink>,
    policy: RetryPolicy,
    /// This relay's lease identity (unique per process and sink).
    owner: String,
    metrics: Arc<Metrics>,
    relayed: Arc<Notify>,
    /// How long the lease lasts unrenewed ([`LEASE`]).
    lease: Duration,
    /// When this relay last took or renewed the lease (process clock): an idle relay renews it
    /// only once a third of it has passed, instead of writing on every poll.
    renewed: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// The lease was lost mid-pass: another replica delivers now.
struct LeaseLost;

enum PassError {
    Db(DbError),
    LeaseLost,
}

impl From<DbError> for PassError {
    fn from(e: DbError) -> Self {
        PassError::Db(e)
    }
}

impl From<sqlx::Error> for PassError {
    fn from(e: sqlx::Error) -> Self {
        PassError::Db(DbError::Sqlx(e))
    }
}

impl From<LeaseLost> for PassError {
    fn from(_: LeaseLost) -> Self {
        PassError::LeaseLost
    }
}

impl Relay {
    /// A relay of `sink` over `outbox`'s events in `db`.
    pub fn new(
        db: Db,
        outbox: &Outbox,
        sink: Arc<dyn Sink>,
        policy: RetryPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            db,
            sink,
            policy,
            owner: uuid::Uuid::new_v4().to_string(),
            metrics,
            relayed: outbox.relayed_signal(),
            lease: LEASE,
            renewed: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// The same relay with another lease length (tests of a replica that died holding it).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The sink's name.
    pub fn sink_name(&self) -> &str {
        self.sink.name()
    }

    fn labels(&self) -> SinkLabels {
        SinkLabels {
            sink: self.sink.name().to_string(),
        }
    }

    /// Takes the sink's lease, or renews it; whether this relay holds it now.
    pub async fn acquire(&self) -> Result<bool, DbError> {
        let now = wall_us();
        let mut tx = self.db.begin_write().await?;
        sqlx::query("INSERT INTO relay_sinks (sink) VALUES ($1) ON CONFLICT (sink) DO NOTHING")
            .bind(self.sink.name())
            .execute(&mut *tx)
            .await?;
        let held = sqlx::query(
            "UPDATE relay_sinks SET lease_owner = $2, lease_until_us = $3 \
             WHERE sink = $1 AND (lease_owner = $2 OR lease_owner IS NULL OR lease_until_us < $4)",
        )
        .bind(self.sink.name())
        .bind(&self.owner)
        .bind(now.saturating_add(micros(self.lease)))
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        self.note_renewal(held.then(std::time::Instant::now));
        Ok(held)
    }

    fn note_renewal(&self, at: Option<std::time::Instant>) {
        if let Ok(mut renewed) = self.renewed.lock() {
            *renewed = at;
        }
    }

    /// Whether this relay renewed its lease less than a third of it ago (so it still holds it:
    /// a lease is only taken over once expired).
    fn lease_fresh(&self) -> bool {
        self.renewed
            .lock()
            .ok()
            .and_then(|r| *r)
            .is_some_and(|at| at.elapsed() < self.lease / 3)
    }

    /// Gives the lease up (at shutdown), so another replica takes over at once.
    pub async fn release(&self) -> Result<(), DbError> {
        self.note_renewal(None);
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "UPDATE relay_sinks SET lease_owner = NULL, lease_until_us = 0 \
             WHERE sink = $1 AND lease_owner = $2",
        )
        .bind(self.sink.name())
        .bind(&self.owner)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Opens a write transaction that holds the sink's row while this relay holds the lease:
    /// the fence of every write of a delivering relay. The lease is renewed in it.
    async fn fenced(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, PassError> {
        let now = wall_us();
        let mut tx = self.db.begin_write().await?;
        let held = sqlx::query(
            "UPDATE relay_sinks SET lease_until_us = $3 \
             WHERE sink = $1 AND lease_owner = $2 AND lease_until_us >= $4",
        )
        .bind(self.sink.name())
        .bind(&self.owner)
        .bind(now.saturating_add(micros(self.lease)))
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !held {
            self.note_renewal(None);
            return Err(LeaseLost.into());
        }
        // Renewed once this transaction commits; noted now, which is no later than that.
        self.note_renewal(Some(std::time::Instant::now()));
        Ok(tx)
    }

    /// Moves the sink's cursor to `cursor` and clears the head's failure state.
    async fn ack(&self, cursor: i64) -> Result<(), PassError> {
        let mut tx = self.fenced().await?;
        sqlx::query(
            "UPDATE relay_sinks SET acked_cursor = $2, attempts = 0, first_failed_at_us = NULL, \
             next_attempt_at_us = 0, last_error = NULL WHERE sink = $1",
        )
        .bind(self.sink.name())
        .bind(cursor)
        .execute(&mut *tx)
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        self.metrics
            .relay_acked_cursor
            .get_or_create(&self.labels())
            .set(cursor);
        Ok(())
    }

    /// Records a failed attempt at the head event: a later attempt, or past the budget, the
    /// dead letter (and the cursor moves past it). Returns the next attempt's instant, or
    /// `None` when dead-lettered.
    async fn failed(
        &self,
        event: &OutboundEvent,
        state: &SinkState,
        error: &str,
    ) -> Result<Option<i64>, PassError> {
        let now = wall_us();
        let attempts = state.attempts.saturating_add(1);
        let first = state.first_failed_at_us.unwrap_or(now);
        let error = cut(error);
        self.metrics
            .relay_failures
            .get_or_create(&self.labels())
            .inc();
        let mut tx = self.fenced().await?;
        if now.saturating_sub(first) >= micros(self.policy.give_up_after) {
            sqlx::query(
                "INSERT INTO relay_dead_letters \
                 (sink, event_cursor, event_id, event_type, attempts, last_error, dead_at_us, state) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'dead')",
            )
            .bind(self.sink.name())
            .bind(event.cursor)
            .bind(&event.event_id)
            .bind(&event.event_type)
            .bind(attempts)
            .bind(&error)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE relay_sinks SET acked_cursor = $2, attempts = 0, \
                 first_failed_at_us = NULL, next_attempt_at_us = 0, last_error = NULL \
                 WHERE sink = $1",
            )
            .bind(self.sink.name())
            .bind(event.cursor)
            .execute(&mut *tx)
            .await?;
            tx.commit().await.map_err(DbError::from)?;
            tracing::warn!(
                sink = self.sink.name(),
                cursor = event.cursor,
                event_id = %event.event_id,
                attempts,
                error = %error,
                "event dead-lettered after its retry budget"
            );
            let labels = self.labels();
            self.metrics
                .relay_dead_lettered
                .get_or_create(&labels)
                .inc();
            self.refresh_dead_gauge().await;
            self.metrics
                .relay_acked_cursor
                .get_or_create(&labels)
                .set(event.cursor);
            return Ok(None);
        }
        let next = now.saturating_add(micros(backoff(&self.policy, attempts)));
        sqlx::query(
            "UPDATE relay_sinks SET attempts = $2, first_failed_at_us = $3, \
             next_attempt_at_us = $4, last_error = $5 WHERE sink = $1",
        )
        .bind(self.sink.name())
        .bind(attempts)
        .bind(first)
        .bind(next)
        .bind(&error)
        .execute(&mut *tx)
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        tracing::info!(
            sink = self.sink.name(),
            cursor = event.cursor,
            attempts,
            error = %error,
            "event delivery failed; will retry"
        );
        Ok(Some(next))
    }

    /// Sets the dead-letter gauge from the database (every replica's dead letters count).
    async fn refresh_dead_gauge(&self) {
        match count_dead(&self.db, self.sink.name()).await {
            Ok(dead) => {
                self.metrics
                    .relay_dead_letters
                    .get_or_create(&self.labels())
                    .set(dead);
            }
            Err(e) => {
                tracing::warn!(sink = self.sink.name(), error = %e, "counting dead letters failed");
            }
        }
    }

    /// One pass: take or renew the lease, try dead letters an operator asked to retry, then
    /// deliver the events after the cursor until one fails or none is left.
    pub async fn pass(&self) -> Result<Pass, DbError> {
        match self.pass_inner().await {
            Ok(p) => Ok(p),
            Err(PassError::LeaseLost) => {
                tracing::warn!(
                    sink = self.sink.name(),
                    "lease lost: another replica delivers"
                );
                Ok(Pass::Standby)
            }
            Err(PassError::Db(e)) => Err(e),
        }
    }

    async fn pass_inner(&self) -> Result<Pass, PassError> {
        if !self.lease_fresh() && !self.acquire().await? {
            return Ok(Pass::Standby);
        }
        self.redrive().await?;
        let mut state = sink_state(&self.db, self.sink.name())
            .await?
            .ok_or_else(|| DbError::Corrupt("relay sink row vanished".into()))?;
        if state.next_attempt_at_us > wall_us() {
            return Ok(Pass::Backoff(state.next_attempt_at_us));
        }
        let events = read_after(&self.db, state.acked_cursor, BATCH).await?;
        if events.is_empty() {
            return Ok(Pass::Idle);
        }
        let mut skipped_to = None;
        for event in &events {
            if !self.sink.wants(&event.event_type) {
                skipped_to = Some(event.cursor);
                continue;
            }
            match self.sink.deliver(event).await {
                Ok(()) => {
                    self.ack(event.cursor).await?;
                    skipped_to = None;
                    state.attempts = 0;
                    state.first_failed_at_us = None;
                    self.metrics
                        .relay_delivered
                        .get_or_create(&self.labels())
                        .inc();
                }
                Err(e) => {
                    if let Some(to) = skipped_to.take() {
                        self.ack(to).await?;
                    }
                    match self.failed(event, &state, &e.0).await? {
                        Some(next) => return Ok(Pass::Backoff(next)),
                        None => {
                            state.attempts = 0;
                            state.first_failed_at_us = None;
                        }
                    }
                }
            }
        }
        if let Some(to) = skipped_to {
            self.ack(to).await?;
        }
        Ok(Pass::Progress)
    }

    /// One more attempt at each dead letter set `retrying`.
    async fn redrive(&self) -> Result<(), PassError> {
        let rows = sqlx::query(
            "SELECT d.event_cursor, o.event_id, o.event_type, o.subject, o.occurred_at_us, \
             o.payload FROM relay_dead_letters d JOIN outbox o ON o.delivery_cursor = d.event_cursor \
             WHERE d.sink = $1 AND d.state = 'retrying' ORDER BY d.event_cursor LIMIT $2",
        )
        .bind(self.sink.name())
        .bind(BATCH)
        .fetch_all(self.db.pool())
        .await?;
        for row in rows {
            let event = event_of(&row)?;
            let outcome = self.sink.deliver(&event).await;
            let mut tx = self.fenced().await?;
            match &outcome {
                Ok(()) => {
                    sqlx::query(
                        "UPDATE relay_dead_letters SET state = 'delivered', \
                         attempts = attempts + 1 WHERE sink = $1 AND event_cursor = $2",
                    )
                    .bind(self.sink.name())
                    .bind(event.cursor)
                    .execute(&mut *tx)
                    .await?;
                }
                Err(e) => {
                    sqlx::query(
                        "UPDATE relay_dead_letters SET state = 'dead', attempts = attempts + 1, \
                         last_error = $3, dead_at_us = $4 WHERE sink = $1 AND event_cursor = $2",
                    )
                    .bind(self.sink.name())
                    .bind(event.cursor)
                    .bind(cut(&e.0))
                    .bind(wall_us())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await.map_err(DbError::from)?;
            let labels = self.labels();
            if outcome.is_ok() {
                self.metrics.relay_delivered.get_or_create(&labels).inc();
                self.refresh_dead_gauge().await;
                tracing::info!(
                    sink = self.sink.name(),
                    cursor = event.cursor,
                    "dead letter delivered"
                );
            } else {
                self.metrics.relay_failures.get_or_create(&labels).inc();
            }
        }
        Ok(())
    }

    /// Runs the relay until `shutdown`, then gives the lease up. A delivery in flight at
    /// shutdown is abandoned unacknowledged (it is delivered again on the next start).
    pub fn spawn(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            self.refresh_dead_gauge().await;
            loop {
                // Registered before the pass, so events numbered during it wake the next.
                let relayed = self.relayed.notified();
                let pass = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = self.pass() => p,
                };
                let idle = matches!(pass, Ok(Pass::Idle));
                let wait = match pass {
                    Ok(Pass::Progress) => continue,
                    Ok(Pass::Idle) => IDLE_POLL,
                    Ok(Pass::Standby) => STANDBY_POLL.min(self.lease / 3),
                    Ok(Pass::Backoff(at)) => {
                        let us = u64::try_from(at.saturating_sub(wall_us())).unwrap_or(0);
                        Duration::from_micros(us).min(self.lease / 3)
                    }
                    Err(e) => {
                        tracing::error!(sink = self.sink.name(), error = %e, "event relay failed; will retry");
                        STANDBY_POLL
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = relayed, if idle => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            if let Err(e) = self.release().await {
                tracing::warn!(sink = self.sink.name(), error = %e, "could not release the relay lease");
            }
        })
    }
}

/// The sinks `config` asks for: its webhooks, then NATS when configured.
pub fn sinks(events: &EventsConfig, service: &str) -> anyhow::Result<Vec<Arc<dyn Sink>>> {
    let mut out: Vec<Arc<dyn Sink>> = Vec::new();
    for w in &events.webhooks {
        out.push(Arc::new(webhook::WebhookSink::new(w)?));
    }
    if let Some(n) = &events.nats {
        out.push(Arc::new(nats::NatsSink::new(n, service)));
    }
    Ok(out)
}

/// The events after `after`, in cursor order, at most `limit`.
pub async fn read_after(db: &Db, after: i64, limit: i64) -> Result<Vec<OutboundEvent>, DbError> {
    let rows = sqlx::query(
        "SELECT delivery_cursor, event_id, event_type, subject, occurred_at_us, payload \
         FROM outbox WHERE delivery_cursor > $1 ORDER BY delivery_cursor LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(event_of).collect()
}

fn event_of(r: &sqlx::any::AnyRow) -> Result<OutboundEvent, DbError> {
    Ok(OutboundEvent {
        cursor: r.try_get(0)?,
        event_id: r.try_get(1)?,
        event_type: r.try_get(2)?,
        subject: r.try_get(3)?,
        occurred_at_us: r.try_get(4)?,
        payload_json: r.try_get(5)?,
    })
}

/// The state of sink `sink`, if it has a row.
pub async fn sink_state(db: &Db, sink: &str) -> Result<Option<SinkState>, DbError> {
    let row = sqlx::query(&format!("{SINK_COLUMNS} WHERE sink = $1"))
        .bind(sink)
        .fetch_optional(db.pool())
        .await?;
    row.as_ref().map(sink_of).transpose()
}

/// Every sink's state, by name.
pub async fn sink_states(db: &Db) -> Result<Vec<SinkState>, DbError> {
    let rows = sqlx::query(&format!("{SINK_COLUMNS} ORDER BY sink"))
        .fetch_all(db.pool())
        .await?;
    rows.iter().map(sink_of).collect()
}

const SINK_COLUMNS: &str = "SELECT sink, acked_cursor, attempts, first_failed_at_us, \
    next_attempt_at_us, last_error, lease_owner, lease_until_us FROM relay_sinks";

fn sink_of(r: &sqlx::any::AnyRow) -> Result<SinkState, DbError> {
    let lease_until: i64 = r.try_get(7)?;
    let owner: Option<String> = r.try_get(6)?;
    Ok(SinkState {
        sink: r.try_get(0)?,
        acked_cursor: r.try_get(1)?,
        attempts: i64::from(r.try_get::<i32, _>(2)?),
        first_failed_at_us: r.try_get(3)?,
        next_attempt_at_us: r.try_get(4)?,
        last_error: r.try_get(5)?,
        lease_owner: owner.filter(|_| lease_until >= wall_us()),
    })
}

const DEAD_COLUMNS: &str = "SELECT sink, event_cursor, event_id, event_type, attempts, \
    last_error, dead_at_us, state FROM relay_dead_letters";

pub(crate) fn dead_of(r: &sqlx::any::AnyRow) -> Result<DeadLetter, DbError> {
    Ok(DeadLetter {
        sink: r.try_get(0)?,
        cursor: r.try_get(1)?,
        event_id: r.try_get(2)?,
        event_type: r.try_get(3)?,
        attempts: i64::from(r.try_get::<i32, _>(4)?),
        last_error: r.try_get(5)?,
        dead_at_us: r.try_get(6)?,
        state: r.try_get(7)?,
    })
}

/// Dead letters of `sink` (every sink when empty) with a cursor above `after`, at most `limit`,
/// ordered by sink and cursor.
pub async fn dead_letters(
    db: &Db,
    sink: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<DeadLetter>, DbError> {
    let rows = sqlx::query(&format!(
        "{DEAD_COLUMNS} WHERE ($1 = '' OR sink = $1) AND event_cursor > $2 \
         ORDER BY sink, event_cursor LIMIT $3"
    ))
    .bind(sink)
    .bind(after)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(dead_of).collect()
}

/// One dead letter, read in the caller's transaction.
pub(crate) async fn dead_letter_in(
    conn: &mut sqlx::AnyConnection,
    sink: &str,
    cursor: i64,
) -> Result<Option<DeadLetter>, DbError> {
    let row = sqlx::query(&format!(
        "{DEAD_COLUMNS} WHERE sink = $1 AND event_cursor = $2"
    ))
    .bind(sink)
    .bind(cursor)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(dead_of).transpose()
}

async fn count_dead(db: &Db, sink: &str) -> Result<i64, DbError> {
    Ok(sqlx::query(
        "SELECT COUNT(*) FROM relay_dead_letters WHERE sink = $1 AND state <> 'delivered'",
    )
    .bind(sink)
    .fetch_one(db.pool())
    .await?
    .try_get(0)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_from_the_first_up_to_the_cap() {
        let p = RetryPolicy::default();
        let waits: Vec<u64> = (1..=12).map(|n| backoff(&p, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(backoff(&p, 1_000), p.max);
        assert_eq!(backoff(&p, 0), p.initial);
    }

    #[test]
    fn the_body_carries_id_type_cursor_time_subject_and_payload() {
        let e = OutboundEvent {
            cursor: 7,
            event_id: "ev-1".into(),
            event_type: "wallet.low_balance".into(),
            subject: "w-1".into(),
            occurred_at_us: 1_767_225_600_000_000,
            payload_json: r#"{"balance":"5"}"#.into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "ev-1", "type": "wallet.low_balance", "cursor": 7,
                "created_at": "2026-01-01T00:00:00.000000Z", "subject": "w-1",
                "payload": {"balance": "5"}
            })
        );
    }
}
