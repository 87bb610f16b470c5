//! Group commit for routed sends (issue 7): steps 1 and 3 of `ChargeMailing` and
//! `ReserveMailing` (see [`crate::service`]) for many sends in one transaction, every caller
//! answered after that commit.
//!
//! A partner's customers all send at once; each send is two small transactions here around the
//! wallet call. Both steps queue in the same collector, so one transaction carries the routings
//! of the sends just arriving and the outcomes of those whose wallet call just came back. It
//! claims every key with one query; for step 1 it finds earlier routings, locks the customers (in
//! byte order of their ids, like every multi-row lock here), and reads the partners and the
//! month's partner credits of capped customers with one query each; applies
//! [`crate::service::decide`] to each send in arrival order (a customer's sends in one batch count
//! against its cap one after another, as they would alone); and writes the routings, events and
//! refusals with one statement per chunk. For step 3 it writes every outcome
//! ([`crate::service::settle`]) and answer likewise.
//!
//! Exclusion still comes from the database (row locks, the unique key index), so replicas stay
//! exact. A step a batch does not take runs alone ([`Batched::Alone`]): a second step with a key
//! already in the batch, and every step of a batch whose transaction failed, which committed
//! nothing.

use runtime::{
    group_commit,
    idempotency::{Claimed, IdempotencyError, IdempotencyKey},
};
use sqlx::{Any, Transaction};
use tokio::sync::oneshot;
use tonic::Status;

use crate::{
    domain,
    error::ResellerError,
    service::{Decision, Resellers, Routing, SendRequest, Settled, decide, limit_event},
    store,
};

/// Most sends in one batch.
pub const MAX_BATCH: usize = 256;

pub use runtime::group_commit::Batched;

/// What claiming a step's key came to.
type Claim = Result<Claimed<Vec<u8>>, IdempotencyError>;
type RouteAnswer = Batched<Result<Routing, ResellerError>>;
type RecordAnswer = Batched<Result<Vec<u8>, ResellerError>>;

/// A step of a send waiting for the next batch.
enum Step {
    /// Step 1: route the send.
    Route {
        request: SendRequest,
        reply: oneshot::Sender<RouteAnswer>,
    },
    /// Step 3: record the wallet's outcome.
    Record {
        key: IdempotencyKey,
        settled: Settled,
        reply: oneshot::Sender<RecordAnswer>,
    },
}

impl Step {
    fn idempotency_key(&self) -> &IdempotencyKey {
        match self {
            Step::Route { request, .. } => &request.key,
            Step::Record { key, .. } => key,
        }
    }
}

/// What a committed batch answers one step.
enum Done {
    Routed(Result<Routing, ResellerError>),
    Recorded(Result<Vec<u8>, ResellerError>),
}

/// The queue of both steps. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    steps: group_commit::Shards<Step>,
}

impl GroupCommit {
    /// Starts the collectors for `resellers` (which must not batch itself): `shards` of them,
    /// a customer's routings always in the same one (step 1 locks customers).
    pub fn start(resellers: Resellers, max_batch: usize, shards: usize) -> Self {
        let steps = group_commit::Shards::spawn(shards, max_batch, move |jobs| {
            let r = resellers.clone();
            async move { r.step_batch(jobs).await }
        });
        Self { steps }
    }

    /// Step 1 of `request` in the next batch.
    pub(crate) async fn route(&self, request: &SendRequest) -> RouteAnswer {
        group_commit::submit(self.steps.queue(&request.customer_id), |reply| {
            Step::Route {
                request: request.clone(),
                reply,
            }
        })
        .await
        .unwrap_or(Batched::Alone)
    }

    /// Step 3 of the send with `key` in the next batch.
    pub(crate) async fn record(&self, key: &IdempotencyKey, settled: &Settled) -> RecordAnswer {
        group_commit::submit(self.steps.queue(key.key()), |reply| Step::Record {
            key: key.clone(),
            settled: settled.clone(),
            reply,
        })
        .await
        .unwrap_or(Batched::Alone)
    }
}

impl Resellers {
    async fn step_batch(&self, jobs: Vec<Step>) {
        let (jobs, twins) = group_commit::twins(jobs, |j| j.idempotency_key().key());
        let done = self.commit_steps(&jobs).await;
        group_commit::deliver(&self.platform.metrics, jobs, twins, done, |job, a| {
            match (job, a) {
                (Step::Route { reply, .. }, Batched::Done(Done::Routed(r))) => {
                    let _ = reply.send(Batched::Done(r));
                }
                (Step::Record { reply, .. }, Batched::Done(Done::Recorded(r))) => {
                    let _ = reply.send(Batched::Done(r));
                }
                (Step::Route { reply, .. }, _) => {
                    let _ = reply.send(Batched::Alone);
                }
                (Step::Record { reply, .. }, _) => {
                    let _ = reply.send(Batched::Alone);
                }
            }
        });
    }

    /// Both steps of a batch in one transaction: one answer per job, in order.
    async fn commit_steps(&self, jobs: &[Step]) -> Result<Vec<Batched<Done>>, ResellerError> {
        let now = self.now();
        let mut tx = self.db.begin_write().await?;
        let keys: Vec<&IdempotencyKey> = jobs.iter().map(Step::idempotency_key).collect();
        let claims = IdempotencyKey::claim_many(&mut tx, &keys).await?;
        let mut routes = Vec::new();
        let mut records = Vec::new();
        for (i, (job, claim)) in jobs.iter().zip(claims).enumerate() {
            match job {
                Step::Route { request, .. } => routes.push((i, request, claim)),
                Step::Record { key, settled, .. } => records.push((i, (key, settled), claim)),
            }
        }
        let mut answers: Vec<Option<Batched<Done>>> = jobs.iter().map(|_| None).collect();
        let events = self.routes_in(&mut tx, now, routes, &mut answers).await?;
        self.records_in(&mut tx, now, records, &mut answers).await?;
        tx.commit().await?;
        if events {
            self.platform.outbox.poke();
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or(Batched::Alone))
            .collect())
    }

    /// Step 1 of the batch's routings, their answers put in `answers` at their positions;
    /// whether it appended events.
    async fn routes_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        now: chrono::DateTime<chrono::Utc>,
        routes: Vec<(usize, &SendRequest, Claim)>,
        answers: &mut [Option<Batched<Done>>],
    ) -> Result<bool, ResellerError> {
        let mut fresh: Vec<(usize, &SendRequest)> = Vec::with_capacity(routes.len());
        for (i, request, claim) in routes {
            let answer = match claim {
                Ok(Claimed::New) => {
                    fresh.push((i, request));
                    continue;
                }
                Ok(Claimed::Replay(Ok(bytes))) => Ok(Routing::Answered(bytes)),
                Ok(Claimed::Replay(Err(status))) => Err(ResellerError::Replayed(status)),
                Err(e) => Err(e.into()),
            };
            answers[i] = Some(Batched::Done(Done::Routed(answer)));
        }
        let fresh_keys: Vec<&str> = fresh.iter().map(|(_, r)| r.key.key()).collect();
        let mut earlier = store::routed_many(tx, &fresh_keys).await?;
        fresh.retain(|&(i, r)| match earlier.remove(r.key.key()) {
            Some(routed) => {
                answers[i] = Some(Batched::Done(Done::Routed(r.resume(routed))));
                false
            }
            None => true,
        });
        if fresh.is_empty() {
            return Ok(false);
        }

        let customer_keys: Vec<String> = fresh
            .iter()
            .map(|(_, r)| domain::customer_key(&r.partner_id, &r.customer_id))
            .collect();
        let keys: Vec<&str> = customer_keys.iter().map(String::as_str).collect();
        let customers = store::lock_customers(tx, &self.db, &keys).await?;
        let mut partner_ids: Vec<&str> = fresh.iter().map(|(_, r)| r.partner_id.as_str()).collect();
        partner_ids.sort_unstable();
        partner_ids.dedup();
        let partners = store::partners_many(tx, &partner_ids).await?;
        let capped: Vec<(&str, &str)> = customers
            .values()
            .filter(|c| c.monthly_limit > 0)
            .map(|c| (c.partner_id.as_str(), c.customer_id.as_str()))
            .collect();
        let (month_start, _) = domain::month_of(now);
        let mut used = store::partner_credits_used_since_many(tx, &capped, month_start).await?;

        let mut routings = Vec::new();
        let mut refusals: Vec<(&IdempotencyKey, Result<Vec<u8>, Status>)> = Vec::new();
        let mut events = false;
        for (&(i, r), key) in fresh.iter().zip(&customer_keys) {
            let customer = customers.get(key);
            let (Some(customer), Some(partner)) = (customer, partners.get(&r.partner_id)) else {
                let missing = ResellerError::CustomerNotFound {
                    partner: r.partner_id.clone(),
                    customer: r.customer_id.clone(),
                };
                answers[i] = Some(Batched::Done(Done::Routed(Err(missing))));
                continue;
            };
            let so_far = used.get(key).copied().unwrap_or(0);
            let answer = match decide(r, customer, partner, so_far) {
                Ok(Decision::Route(routed)) => {
                    if routed.payer == domain::Payer::Partner {
                        *used.entry(key.clone()).or_default() += routed.credits;
                    }
                    routings.push((*routed).clone());
                    Ok(Routing::Routed(routed))
                }
                Ok(Decision::Limit(reached)) => {
                    let (event_type, payload) = limit_event(r, reached);
                    self.event(tx, event_type, &r.partner_id, payload).await?;
                    events = true;
                    refusals.push((&r.key, Err(Status::from(ResellerError::Limit(reached)))));
                    Err(ResellerError::Limit(reached))
                }
                Err(e) => Err(e),
            };
            answers[i] = Some(Batched::Done(Done::Routed(answer)));
        }
        store::insert_routed_many(tx, &routings, now).await?;
        IdempotencyKey::record_many(tx, &refusals, now.timestamp_micros()).await?;
        Ok(events)
    }

    /// Step 3 of the batch's outcomes, their answers put in `answers` at their positions.
    async fn records_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        now: chrono::DateTime<chrono::Utc>,
        records: Vec<(usize, (&IdempotencyKey, &Settled), Claim)>,
        answers: &mut [Option<Batched<Done>>],
    ) -> Result<(), ResellerError> {
        let mut settled = Vec::new();
        let mut recorded: Vec<(&IdempotencyKey, Result<Vec<u8>, Status>)> = Vec::new();
        for (i, (key, outcome), claim) in records {
            let answer = match claim {
                Ok(Claimed::New) => {
                    settled.push(&outcome.routed);
                    recorded.push((key, outcome.answer.clone()));
                    outcome.answer.clone().map_err(ResellerError::Replayed)
                }
                Ok(Claimed::Replay(Ok(bytes))) => Ok(bytes),
                Ok(Claimed::Replay(Err(status))) => Err(ResellerError::Replayed(status)),
                Err(e) => Err(e.into()),
            };
            answers[i] = Some(Batched::Done(Done::Recorded(answer)));
        }
        store::update_routed_many(tx, &settled).await?;
        IdempotencyKey::record_many(tx, &recorded, now.timestamp_micros()).await?;
        Ok(())
    }
}
