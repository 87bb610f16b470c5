//! Group commit for routed sends (issue 7), and the front the send use case calls for steps 1
//! and 3 of `ChargeMailing` and `ReserveMailing` (see [`crate::service`]): [`SendSteps`] tries
//! the next batch and runs the step alone when the batch does not take it (or when group commit
//! is off).
//!
//! A partner's customers all send at once; each send is two small transactions here around the
//! wallet call. Both steps queue in the same collector, so one transaction carries the routings
//! of the sends just arriving and the outcomes of those whose wallet call just came back. It
//! claims every key with one query; for step 1 it finds earlier routings, locks the customers (in
//! byte order of their ids, like every multi-row lock here), and reads the partners and the
//! month's partner credits of capped customers with one query each; builds each customer's
//! [`Routing`] and applies [`Routing::decide`] to each send in arrival order (a customer's sends
//! in one batch count against its cap one after another, as they would alone); and writes the
//! routings, events and refusals with one statement per chunk. For step 3 it writes every outcome
//! ([`crate::routing::complete`]) and answer likewise.
//!
//! Exclusion still comes from the database (row locks, the unique key index), so replicas stay
//! exact. A step a batch does not take runs alone ([`Batched::Alone`]): a second step with a key
//! already in the batch, and every step of a batch whose transaction failed, which committed
//! nothing.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use runtime::{
    Platform, group_commit,
    idempotency::{Claimed, IdempotencyError, IdempotencyKey},
    outbox,
};
use sqlx::{Any, Transaction};
use tokio::sync::oneshot;
use tonic::Status;

use crate::{
    domain,
    error::ResellerError,
    routing::{Completed, Decision, Route, Routing, SendRequest, limit_event},
    store,
};

/// Most sends in one batch.
pub const MAX_BATCH: usize = 256;

use runtime::group_commit::Batched;

/// What claiming a step's key came to.
type Claim = Result<Claimed<Vec<u8>>, IdempotencyError>;
type RouteAnswer = Batched<Result<Route, ResellerError>>;
type CompleteAnswer = Batched<Result<Vec<u8>, ResellerError>>;

/// A step of a send waiting for the next batch.
enum Step {
    /// Step 1: route the send.
    Route {
        request: SendRequest,
        reply: oneshot::Sender<RouteAnswer>,
    },
    /// Step 3: complete the routing with the wallet's outcome.
    Complete {
        key: IdempotencyKey,
        completed: Completed,
        reply: oneshot::Sender<CompleteAnswer>,
    },
}

impl Step {
    fn idempotency_key(&self) -> &IdempotencyKey {
        match self {
            Step::Route { request, .. } => &request.key,
            Step::Complete { key, .. } => key,
        }
    }
}

/// What a committed batch answers one step.
enum StepAnswer {
    Routed(Result<Route, ResellerError>),
    Completed(Result<Vec<u8>, ResellerError>),
}

/// Steps 1 and 3 of routed sends: in the next batch when group commit is on, else (or when the
/// batch does not take the step) alone in their own transaction. Cheap to clone.
#[derive(Clone)]
pub struct SendSteps {
    steps: Steps,
    group: Option<GroupCommit>,
}

impl SendSteps {
    /// Every step in its own transaction.
    pub fn alone(platform: Platform) -> Self {
        Self {
            steps: Steps::new(platform),
            group: None,
        }
    }

    /// Steps 1 and 3 with group commit: up to `max_batch` sends per transaction, `shards`
    /// transactions at a time.
    pub fn batched(platform: Platform, max_batch: usize, shards: usize) -> Self {
        let steps = Steps::new(platform);
        let group = GroupCommit::start(steps.clone(), max_batch, shards);
        Self {
            steps,
            group: Some(group),
        }
    }

    /// Step 1: decide and record who pays (or find the decision of an earlier attempt).
    pub async fn route(&self, request: &SendRequest) -> Result<Route, ResellerError> {
        if let Some(g) = &self.group
            && let Batched::Done(r) = g.route(request).await
        {
            return r;
        }
        self.steps.route_alone(request).await
    }

    /// Step 3: complete the routing and record the answer under the caller's key; the answer.
    pub async fn complete(
        &self,
        key: &IdempotencyKey,
        completed: Completed,
    ) -> Result<Vec<u8>, ResellerError> {
        if let Some(g) = &self.group
            && let Batched::Done(r) = g.complete(key, &completed).await
        {
            return r;
        }
        self.steps.complete_alone(key, completed).await
    }
}

/// The queue of both steps. Cheap to clone.
#[derive(Clone)]
struct GroupCommit {
    steps: group_commit::Shards<Step>,
}

impl GroupCommit {
    /// Starts the collectors running `steps`: `shards` of them, a customer's routings always in
    /// the same one (step 1 locks customers).
    fn start(steps: Steps, max_batch: usize, shards: usize) -> Self {
        let queues = group_commit::Shards::spawn(shards, max_batch, move |jobs| {
            let s = steps.clone();
            async move { s.step_batch(jobs).await }
        });
        Self { steps: queues }
    }

    /// Step 1 of `request` in the next batch.
    async fn route(&self, request: &SendRequest) -> RouteAnswer {
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
    async fn complete(&self, key: &IdempotencyKey, completed: &Completed) -> CompleteAnswer {
        group_commit::submit(self.steps.queue(key.key()), |reply| Step::Complete {
            key: key.clone(),
            completed: completed.clone(),
            reply,
        })
        .await
        .unwrap_or(Batched::Alone)
    }
}

/// What runs the steps' transactions, alone or batched.
#[derive(Clone)]
struct Steps {
    platform: Platform,
}

impl Steps {
    fn new(platform: Platform) -> Self {
        Self { platform }
    }

    fn now(&self) -> DateTime<Utc> {
        self.platform.clock.now()
    }

    /// Step 1 of a send in its own transaction.
    async fn route_alone(&self, r: &SendRequest) -> Result<Route, ResellerError> {
        let mut tx = self.platform.db.begin_write().await?;
        match r.key.claim_bytes(&mut tx).await? {
            Claimed::Replay(Ok(bytes)) => return Ok(Route::Answered(bytes)),
            Claimed::Replay(Err(status)) => return Err(ResellerError::Replayed(status)),
            Claimed::New => {}
        }
        if let Some(routed) = store::routed(&mut tx, r.key.key()).await? {
            return r.resume(routed);
        }
        let mut routing = Routing::lock(
            &mut tx,
            &self.platform.db,
            &r.partner_id,
            &r.customer_id,
            self.now(),
        )
        .await?;
        match routing.decide(r)? {
            Decision::Route(routed) => {
                store::insert_routed(&mut tx, &routed, self.now()).await?;
                tx.commit().await?;
                Ok(Route::Routed(routed))
            }
            Decision::Limit(reached) => {
                let (event_type, payload) = limit_event(r, reached);
                outbox::append(
                    &mut tx,
                    event_type,
                    &r.partner_id,
                    &payload,
                    self.now().timestamp_micros(),
                )
                .await?;
                let status = Status::from(ResellerError::Limit(reached));
                r.key
                    .record_status(&mut tx, &status, self.now().timestamp_micros())
                    .await?;
                tx.commit().await?;
                self.platform.outbox.poke();
                Err(ResellerError::Limit(reached))
            }
        }
    }

    /// Step 3 of a send in its own transaction.
    async fn complete_alone(
        &self,
        key: &IdempotencyKey,
        completed: Completed,
    ) -> Result<Vec<u8>, ResellerError> {
        let mut tx = self.platform.db.begin_write().await?;
        match key.claim_bytes(&mut tx).await? {
            Claimed::Replay(Ok(bytes)) => return Ok(bytes),
            Claimed::Replay(Err(status)) => return Err(ResellerError::Replayed(status)),
            Claimed::New => {}
        }
        store::update_routed(&mut tx, &completed.routed).await?;
        let now = self.now().timestamp_micros();
        match &completed.answer {
            Ok(bytes) => key.record_bytes(&mut tx, bytes.clone(), now).await?,
            Err(status) => key.record_status(&mut tx, status, now).await?,
        }
        tx.commit().await?;
        completed.answer.map_err(ResellerError::Replayed)
    }

    async fn step_batch(&self, jobs: Vec<Step>) {
        let (jobs, twins) = group_commit::twins(jobs, |j| j.idempotency_key().key());
        let done = self.commit_steps(&jobs).await;
        group_commit::deliver(&self.platform.metrics, jobs, twins, done, |job, a| {
            match (job, a) {
                (Step::Route { reply, .. }, Batched::Done(StepAnswer::Routed(r))) => {
                    let _ = reply.send(Batched::Done(r));
                }
                (Step::Complete { reply, .. }, Batched::Done(StepAnswer::Completed(r))) => {
                    let _ = reply.send(Batched::Done(r));
                }
                (Step::Route { reply, .. }, _) => {
                    let _ = reply.send(Batched::Alone);
                }
                (Step::Complete { reply, .. }, _) => {
                    let _ = reply.send(Batched::Alone);
                }
            }
        });
    }

    /// Both steps of a batch in one transaction: one answer per job, in order.
    async fn commit_steps(&self, jobs: &[Step]) -> Result<Vec<Batched<StepAnswer>>, ResellerError> {
        let now = self.now();
        let mut tx = self.platform.db.begin_write().await?;
        let keys: Vec<&IdempotencyKey> = jobs.iter().map(Step::idempotency_key).collect();
        let claims = IdempotencyKey::claim_many(&mut tx, &keys).await?;
        let mut routes = Vec::new();
        let mut completions = Vec::new();
        for (i, (job, claim)) in jobs.iter().zip(claims).enumerate() {
            match job {
                Step::Route { request, .. } => routes.push((i, request, claim)),
                Step::Complete { key, completed, .. } => {
                    completions.push((i, (key, completed), claim))
                }
            }
        }
        let mut answers: Vec<Option<Batched<StepAnswer>>> = jobs.iter().map(|_| None).collect();
        let events = self.routes_in(&mut tx, now, routes, &mut answers).await?;
        self.completions_in(&mut tx, now, completions, &mut answers)
            .await?;
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
        now: DateTime<Utc>,
        routes: Vec<(usize, &SendRequest, Claim)>,
        answers: &mut [Option<Batched<StepAnswer>>],
    ) -> Result<bool, ResellerError> {
        let mut fresh: Vec<(usize, &SendRequest)> = Vec::with_capacity(routes.len());
        for (i, request, claim) in routes {
            let answer = match claim {
                Ok(Claimed::New) => {
                    fresh.push((i, request));
                    continue;
                }
                Ok(Claimed::Replay(Ok(bytes))) => Ok(Route::Answered(bytes)),
                Ok(Claimed::Replay(Err(status))) => Err(ResellerError::Replayed(status)),
                Err(e) => Err(e.into()),
            };
            answers[i] = Some(Batched::Done(StepAnswer::Routed(answer)));
        }
        let fresh_keys: Vec<&str> = fresh.iter().map(|(_, r)| r.key.key()).collect();
        let mut earlier = store::routed_many(tx, &fresh_keys).await?;
        fresh.retain(|&(i, r)| match earlier.remove(r.key.key()) {
            Some(routed) => {
                answers[i] = Some(Batched::Done(StepAnswer::Routed(r.resume(routed))));
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
        let mut customers = store::lock_customers(tx, &self.platform.db, &keys).await?;
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

        // Each customer's routing, built at its first send of the batch.
        let mut locked: HashMap<String, Routing> = HashMap::new();
        let mut routings = Vec::new();
        let mut refusals: Vec<(&IdempotencyKey, Result<Vec<u8>, Status>)> = Vec::new();
        let mut events = false;
        for (&(i, r), key) in fresh.iter().zip(&customer_keys) {
            if !locked.contains_key(key)
                && let (Some(customer), Some(partner)) =
                    (customers.remove(key), partners.get(&r.partner_id))
            {
                let so_far = used.remove(key).unwrap_or(0);
                let routing = Routing::from_parts(customer, partner.clone(), so_far);
                locked.insert(key.clone(), routing);
            }
            let Some(routing) = locked.get_mut(key) else {
                let missing = ResellerError::CustomerNotFound {
                    partner: r.partner_id.clone(),
                    customer: r.customer_id.clone(),
                };
                answers[i] = Some(Batched::Done(StepAnswer::Routed(Err(missing))));
                continue;
            };
            let answer = match routing.decide(r) {
                Ok(Decision::Route(routed)) => {
                    routings.push((*routed).clone());
                    Ok(Route::Routed(routed))
                }
                Ok(Decision::Limit(reached)) => {
                    let (event_type, payload) = limit_event(r, reached);
                    outbox::append(
                        tx,
                        event_type,
                        &r.partner_id,
                        &payload,
                        self.now().timestamp_micros(),
                    )
                    .await?;
                    events = true;
                    refusals.push((&r.key, Err(Status::from(ResellerError::Limit(reached)))));
                    Err(ResellerError::Limit(reached))
                }
                Err(e) => Err(e),
            };
            answers[i] = Some(Batched::Done(StepAnswer::Routed(answer)));
        }
        store::insert_routed_many(tx, &routings, now).await?;
        IdempotencyKey::record_many(tx, &refusals, now.timestamp_micros()).await?;
        Ok(events)
    }

    /// Step 3 of the batch's outcomes, their answers put in `answers` at their positions.
    async fn completions_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        now: DateTime<Utc>,
        completions: Vec<(usize, (&IdempotencyKey, &Completed), Claim)>,
        answers: &mut [Option<Batched<StepAnswer>>],
    ) -> Result<(), ResellerError> {
        let mut completed = Vec::new();
        let mut recorded: Vec<(&IdempotencyKey, Result<Vec<u8>, Status>)> = Vec::new();
        for (i, (key, outcome), claim) in completions {
            let answer = match claim {
                Ok(Claimed::New) => {
                    completed.push(&outcome.routed);
                    recorded.push((key, outcome.answer.clone()));
                    outcome.answer.clone().map_err(ResellerError::Replayed)
                }
                Ok(Claimed::Replay(Ok(bytes))) => Ok(bytes),
                Ok(Claimed::Replay(Err(status))) => Err(ResellerError::Replayed(status)),
                Err(e) => Err(e.into()),
            };
            answers[i] = Some(Batched::Done(StepAnswer::Completed(answer)));
        }
        store::update_routed_many(tx, &completed).await?;
        IdempotencyKey::record_many(tx, &recorded, now.timestamp_micros()).await?;
        Ok(())
    }
}
