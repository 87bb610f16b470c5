//! `billing.common.v1.EventDelivery`, registered by every service: the state of its event
//! sinks and their dead letters ([`crate::relay`]), and another attempt at a dead letter.

use std::collections::BTreeSet;

use proto::common::v1::{
    self as pb, ListDeliveriesRequest, ListDeliveriesResponse, RetryDeadLetterRequest,
    RetryDeadLetterResponse, event_delivery_server::EventDelivery,
};
use sqlx::Row;
use tonic::{Request, Response, Status};

use crate::{
    clock::{ServiceClock, from_micros},
    convert,
    db::{Db, DbError, STORAGE_UNAVAILABLE},
    idempotency::{Claimed, IdempotencyKey},
    relay::{self, DeadLetter, SinkState},
};

/// The full gRPC name of the service.
pub const EVENT_DELIVERY_SERVICE: &str = "billing.common.v1.EventDelivery";
/// Largest (and default) page of dead letters.
pub const MAX_PAGE: u32 = 500;
/// Longest sink name accepted in a request.
const MAX_SINK_LEN: usize = 80;

/// The gRPC face of the relays.
pub struct EventDeliveryService {
    db: Db,
    clock: ServiceClock,
    /// The sinks this service's configuration has.
    configured: BTreeSet<String>,
}

impl EventDeliveryService {
    /// Serves the relay state in `db`; `configured` names the sinks that run.
    pub fn new(db: Db, clock: ServiceClock, configured: impl IntoIterator<Item = String>) -> Self {
        Self {
            db,
            clock,
            configured: configured.into_iter().collect(),
        }
    }
}

fn storage(e: DbError) -> Status {
    if e.is_transient() {
        tracing::warn!(error = %e, "event delivery storage unavailable");
        Status::unavailable(STORAGE_UNAVAILABLE)
    } else {
        tracing::error!(error = %e, "event delivery storage failed");
        Status::internal("internal error")
    }
}

fn cursor_in(value: u64, field: &str) -> Result<i64, Status> {
    i64::try_from(value).map_err(|_| Status::invalid_argument(format!("{field} is too large")))
}

fn sink_in(sink: &str) -> Result<(), Status> {
    if sink.len() > MAX_SINK_LEN || !sink.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "sink must be at most {MAX_SINK_LEN} printable ASCII characters"
        )));
    }
    Ok(())
}

fn dead_letter_message(d: DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        sink: d.sink,
        cursor: u64::try_from(d.cursor).unwrap_or(0),
        event_id: d.event_id,
        r#type: d.event_type,
        attempts: u32::try_from(d.attempts).unwrap_or(u32::MAX),
        last_error: d.last_error,
        dead_at: Some(convert::timestamp(from_micros(d.dead_at_us))),
        state: d.state,
    }
}

impl EventDeliveryService {
    fn sink_message(&self, s: SinkState) -> pb::SinkStatus {
        let failing = s.attempts > 0;
        pb::SinkStatus {
            configured: self.configured.contains(&s.sink),
            sink: s.sink,
            acked_cursor: u64::try_from(s.acked_cursor).unwrap_or(0),
            attempts: u32::try_from(s.attempts).unwrap_or(u32::MAX),
            last_error: s.last_error.unwrap_or_default(),
            next_attempt_at: failing.then(|| convert::timestamp(from_micros(s.next_attempt_at_us))),
            failing_since: s
                .first_failed_at_us
                .map(|us| convert::timestamp(from_micros(us))),
            delivering: s.lease_owner.is_some(),
        }
    }
}

#[tonic::async_trait]
impl EventDelivery for EventDeliveryService {
    #[tracing::instrument(skip_all)]
    async fn list_deliveries(
        &self,
        req: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        let req = req.into_inner();
        sink_in(&req.sink)?;
        let after = cursor_in(req.after_cursor, "after_cursor")?;
        let page = match req.page_size {
            0 => MAX_PAGE,
            n if n > MAX_PAGE => {
                return Err(Status::invalid_argument(format!(
                    "page_size must be at most {MAX_PAGE}"
                )));
            }
            n => n,
        };
        let mut states = relay::sink_states(&self.db).await.map_err(storage)?;
        // A configured sink that has not run yet is listed too, at cursor 0.
        for name in &self.configured {
            if !states.iter().any(|s| &s.sink == name) {
                states.push(SinkState {
                    sink: name.clone(),
                    acked_cursor: 0,
                    attempts: 0,
                    first_failed_at_us: None,
                    next_attempt_at_us: 0,
                    last_error: None,
                    lease_owner: None,
                });
            }
        }
        states.retain(|s| req.sink.is_empty() || s.sink == req.sink);
        states.sort_by(|a, b| a.sink.cmp(&b.sink));
        let dead = relay::dead_letters(&self.db, &req.sink, after, i64::from(page))
            .await
            .map_err(storage)?;
        let head: i64 = sqlx::query("SELECT next_cursor - 1 FROM outbox_relay WHERE id = 1")
            .fetch_one(self.db.pool())
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| storage(e.into()))?;
        Ok(Response::new(ListDeliveriesResponse {
            sinks: states.into_iter().map(|s| self.sink_message(s)).collect(),
            dead_letters: dead.into_iter().map(dead_letter_message).collect(),
            head_cursor: u64::try_from(head).unwrap_or(0),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn retry_dead_letter(
        &self,
        req: Request<RetryDeadLetterRequest>,
    ) -> Result<Response<RetryDeadLetterResponse>, Status> {
        let req = req.into_inner();
        let key = IdempotencyKey::new("RetryDeadLetter", &req.idempotency_key, &req)?;
        sink_in(&req.sink)?;
        if req.sink.is_empty() {
            return Err(Status::invalid_argument("sink is required"));
        }
        let cursor = cursor_in(req.cursor, "cursor")?;
        let mut tx = self.db.begin_write().await.map_err(storage)?;
        if let Claimed::Replay(answer) = key.claim::<RetryDeadLetterResponse>(&mut tx).await? {
            return answer.map(Response::new);
        }
        let now = self.clock.now_micros();
        let found = relay::dead_letter_in(&mut tx, &req.sink, cursor)
            .await
            .map_err(storage)?;
        let outcome = match found {
            None => Err(Status::not_found(format!(
                "no dead letter at cursor {cursor} of sink {:?}",
                req.sink
            ))),
            Some(d) if d.state == "delivered" => Err(Status::failed_precondition(format!(
                "the event at cursor {cursor} was delivered to {:?} since it was dead-lettered",
                req.sink
            ))),
            Some(_) if !self.configured.contains(&req.sink) => {
                Err(Status::failed_precondition(format!(
                    "sink {:?} is not configured on this service: no relay would retry it",
                    req.sink
                )))
            }
            Some(mut d) => {
                if d.state == "dead" {
                    sqlx::query(
                        "UPDATE relay_dead_letters SET state = 'retrying' \
                         WHERE sink = $1 AND event_cursor = $2",
                    )
                    .bind(&req.sink)
                    .bind(cursor)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| storage(e.into()))?;
                    d.state = "retrying".into();
                }
                Ok(RetryDeadLetterResponse {
                    dead_letter: Some(dead_letter_message(d)),
                })
            }
        };
        match &outcome {
            Ok(response) => key.record(&mut tx, response, now).await?,
            Err(status) => key.record_status(&mut tx, status, now).await?,
        }
        tx.commit().await.map_err(|e| storage(e.into()))?;
        if outcome.is_ok() {
            tracing::info!(sink = %req.sink, cursor, "dead letter set to retry");
        }
        outcome.map(Response::new)
    }
}
