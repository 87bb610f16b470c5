//! The transactional outbox and the `WatchEvents(after_cursor)` stream every service serves.
//!
//! 1. A change writes its event with [`append`] inside its own transaction: the event exists if
//!    and only if the change committed.
//! 2. The relay ([`Outbox::relay_once`], run in the background) gives committed events a
//!    delivery cursor in one transaction that locks the single `outbox_relay` row, so relays of
//!    several replicas take turns and cursors follow commit order with no gaps a watcher could
//!    skip: a watcher that has seen cursor N never later finds an event below N.
//! 3. [`Outbox::watch`] streams events with a cursor above the client's, waking on the local
//!    relay and polling for other replicas' events; a client resumes with its last cursor.
//!    Delivery is at least once (the client deduplicates by `event_id`) and in cursor order.

use std::{sync::Arc, time::Duration};

use proto::common::v1::{Event, WatchEventsRequest};
use serde_json::Value;
use sqlx::{AnyConnection, Row};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    clock::{ServiceClock, from_micros},
    convert,
    db::{Db, DbError},
    metrics::Metrics,
};

/// Writes one event in the caller's transaction.
pub async fn append(
    conn: &mut AnyConnection,
    event_type: &str,
    subject: &str,
    payload: &Value,
    occurred_at_us: i64,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO outbox (event_id, event_type, subject, payload, occurred_at_us) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(event_type)
    .bind(subject)
    .bind(payload.to_string())
    .bind(occurred_at_us)
    .execute(conn)
    .await?;
    Ok(())
}

/// Appends many events in the caller's transaction with one multi-row statement per chunk
/// (group commit and batched renewals write hundreds at once): `(type, subject, payload,
/// occurred_at_us)` each.
pub async fn append_many(
    conn: &mut AnyConnection,
    events: &[(&str, &str, &Value, i64)],
) -> Result<(), DbError> {
    // Each event's id and payload text made once (a piece's padding repeats rows).
    let rows: Vec<(String, &str, &str, String, i64)> = events
        .iter()
        .map(|(event_type, subject, payload, at)| {
            let id = uuid::Uuid::now_v7().to_string();
            (id, *event_type, *subject, payload.to_string(), *at)
        })
        .collect();
    for chunk in crate::db::row_chunks(crate::db::Backend::of(conn), &rows, 5, 128) {
        let sql = format!(
            "INSERT INTO outbox (event_id, event_type, subject, payload, occurred_at_us) \
             {}",
            chunk.select()
        );
        let mut q = sqlx::query(&sql);
        for (event_id, event_type, subject, payload, at) in chunk.rows() {
            q = q
                .bind(event_id)
                .bind(*event_type)
                .bind(*subject)
                .bind(payload)
                .bind(*at);
        }
        q.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Largest number of events a watcher reads at once.
const BATCH: i64 = 500;
/// Largest number of events the relay numbers in one transaction: a backlog (a renewal run
/// writes four events per subscription) drains in few, short transactions.
const RELAY_BATCH: i64 = 5_000;
/// How often watchers and the relay look for work written by other replicas.
const POLL: Duration = Duration::from_millis(200);

/// The relay and the watchers of one service. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    db: Db,
    clock: ServiceClock,
    metrics: Arc<Metrics>,
    /// Poked after a commit that appended events: the relay runs at once.
    committed: Arc<Notify>,
    /// Notified by the relay after it numbered events: watchers read at once.
    relayed: Arc<Notify>,
}

impl Outbox {
    /// The outbox of `db`.
    pub fn new(db: Db, clock: ServiceClock, metrics: Arc<Metrics>) -> Self {
        Self {
            db,
            clock,
            metrics,
            committed: Arc::new(Notify::new()),
            relayed: Arc::new(Notify::new()),
        }
    }

    /// Notified after events were given cursors: event sinks ([`crate::relay`]) wake on it.
    pub fn relayed_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.relayed)
    }

    /// Tells the relay that a transaction with events committed.
    pub fn poke(&self) {
        self.committed.notify_one();
    }

    /// Numbers the committed events that have no cursor yet; returns how many.
    pub async fn relay_once(&self) -> Result<u64, DbError> {
        let mut tx = self.db.begin_write().await?;
        let next: i64 = sqlx::query(&format!(
            "SELECT next_cursor FROM outbox_relay WHERE id = 1{}",
            self.db.for_update()
        ))
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        let numbered = sqlx::query(
            "UPDATE outbox SET delivery_cursor = s.rn + $1 \
             FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) - 1 AS rn FROM outbox \
                   WHERE delivery_cursor IS NULL ORDER BY id LIMIT $2) AS s \
             WHERE outbox.id = s.id",
        )
        .bind(next)
        .bind(RELAY_BATCH)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // What is left over, for the metrics: nothing unless the batch was full, so the
        // backlog is only counted while there is one (counting it costs a scan of it).
        let (left, oldest) = if numbered < RELAY_BATCH as u64 {
            (0, None)
        } else {
            let pending = sqlx::query(
                "SELECT COUNT(*), MIN(occurred_at_us) FROM outbox WHERE delivery_cursor IS NULL",
            )
            .fetch_one(&mut *tx)
            .await?;
            (
                pending.try_get::<i64, _>(0)?,
                pending.try_get::<Option<i64>, _>(1)?,
            )
        };
        if numbered > 0 {
            let numbered_i64 = i64::try_from(numbered)
                .map_err(|_| DbError::Corrupt("outbox batch too large".into()))?;
            sqlx::query("UPDATE outbox_relay SET next_cursor = $1 WHERE id = 1")
                .bind(next + numbered_i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.metrics.outbox_pending.set(left);
        self.metrics
            .outbox_head_cursor
            .set(next - 1 + i64::try_from(numbered).unwrap_or(0));
        let age = match (left > 0, oldest) {
            (true, Some(us)) => (self.clock.now_micros() - us) / 1_000_000,
            _ => 0,
        };
        self.metrics.outbox_oldest_pending_seconds.set(age.max(0));
        if numbered > 0 {
            self.relayed.notify_waiters();
        }
        Ok(numbered)
    }

    /// Runs the relay until `shutdown`: after each poke, and every poll interval.
    pub fn spawn_relay(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match this.relay_once().await {
                    Ok(n) if n as i64 == RELAY_BATCH => continue,
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "outbox relay failed; will retry"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = this.committed.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        })
    }

    /// Streams events after `req.after_cursor` until the client leaves or `shutdown`.
    pub fn watch(
        &self,
        req: WatchEventsRequest,
        shutdown: CancellationToken,
    ) -> ReceiverStream<Result<Event, Status>> {
        self.watch_subject(req, None, shutdown)
    }

    /// [`Outbox::watch`] limited to the events of one `subject` when given (e.g. a reseller's
    /// partner-bound token sees its own partner's events only). Events of other subjects are
    /// skipped like events of other types: the cursor moves past them, so a watcher resuming
    /// from its last cursor misses none of its own.
    pub fn watch_subject(
        &self,
        req: WatchEventsRequest,
        subject: Option<String>,
        shutdown: CancellationToken,
    ) -> ReceiverStream<Result<Event, Status>> {
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        let mut after = i64::try_from(req.after_cursor).unwrap_or(i64::MAX);
        let types = req.types;
        tokio::spawn(async move {
            loop {
                // Registered before reading, so a relay finishing in between is not missed.
                let relayed = this.relayed.notified();
                let rows = match this.read_after(after).await {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::error!(error = %e, "reading events failed");
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "event store unavailable; resume from your last cursor",
                            )))
                            .await;
                        return;
                    }
                };
                let full = rows.len() as i64 == BATCH;
                for event in rows {
                    after = i64::try_from(event.cursor).unwrap_or(i64::MAX);
                    if !types.is_empty() && !types.contains(&event.r#type) {
                        continue;
                    }
                    if subject.as_ref().is_some_and(|s| *s != event.subject) {
                        continue;
                    }
                    if tx.send(Ok(event)).await.is_err() {
                        return; // the client went away
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = relayed => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        });
        ReceiverStream::new(rx)
    }

    async fn read_after(&self, after: i64) -> Result<Vec<Event>, DbError> {
        let rows = sqlx::query(
            "SELECT delivery_cursor, event_id, event_type, subject, occurred_at_us, payload \
             FROM outbox WHERE delivery_cursor > $1 ORDER BY delivery_cursor LIMIT $2",
        )
        .bind(after)
        .bind(BATCH)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let cursor: i64 = r.try_get(0)?;
                Ok(Event {
                    cursor: u64::try_from(cursor)
                        .map_err(|_| DbError::Corrupt("negative delivery cursor".into()))?,
                    event_id: r.try_get(1)?,
                    r#type: r.try_get(2)?,
                    subject: r.try_get(3)?,
                    occurred_at: Some(convert::timestamp(from_micros(r.try_get(4)?))),
                    payload_json: r.try_get(5)?,
                })
            })
            .collect()
    }
}
