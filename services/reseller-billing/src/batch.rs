//! Group commit for routed sends (issue 7): steps 1 and 3 of `ChargeMailing` and
//! `ReserveMailing` (see [`crate::service`]) for many sends in one transaction each, every caller
//! answered after that commit.
//!
//! A partner's customers all send at once; each send is two small transactions here around the
//! wallet call. Batched, step 1 claims the keys, finds earlier routings, locks the customers (in
//! byte order of their ids, like every multi-row lock here), and reads the partners and the
//! month's partner credits of capped customers with one query each; applies
//! [`crate::service::decide`] to each send in arrival order (a customer's sends in one batch count
//! against its cap one after another, as they would alone); and writes the routings, events and
//! refusals with one statement per chunk. Step 3 claims the keys and writes every outcome
//! ([`crate::service::settle`]) and answer likewise.
//!
//! Exclusion still comes from the database (row locks, the unique key index), so replicas stay
//! exact. A send a batch does not take runs its step alone ([`Batched::Alone`]): a second send
//! with a key already in the batch, and every send of a batch whose transaction failed, which
//! committed nothing.

use runtime::{
    group_commit,
    idempotency::{Claimed, IdempotencyKey},
};
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

type RouteAnswer = Batched<Result<Routing, ResellerError>>;
type RecordAnswer = Batched<Result<Vec<u8>, ResellerError>>;

struct RouteJob {
    request: SendRequest,
    reply: oneshot::Sender<RouteAnswer>,
}

struct RecordJob {
    key: IdempotencyKey,
    settled: Settled,
    reply: oneshot::Sender<RecordAnswer>,
}

/// The queues of steps 1 and 3. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    routes: group_commit::Shards<RouteJob>,
    records: group_commit::Shards<RecordJob>,
}

impl GroupCommit {
    /// Starts the collectors of both steps for `resellers` (which must not batch itself):
    /// `shards` each, a customer's sends always in the same one (step 1 locks customers).
    pub fn start(resellers: Resellers, max_batch: usize, shards: usize) -> Self {
        let r = resellers.clone();
        let routes = group_commit::Shards::spawn(shards, max_batch, move |jobs| {
            let r = r.clone();
            async move { r.route_batch(jobs).await }
        });
        let records = group_commit::Shards::spawn(shards, max_batch, move |jobs| {
            let r = resellers.clone();
            async move { r.record_batch(jobs).await }
        });
        Self { routes, records }
    }

    /// Step 1 of `request` in the next batch.
    pub(crate) async fn route(&self, request: &SendRequest) -> RouteAnswer {
        group_commit::submit(self.routes.queue(&request.customer_id), |reply| RouteJob {
            request: request.clone(),
            reply,
        })
        .await
        .unwrap_or(Batched::Alone)
    }

    /// Step 3 of the send with `key` in the next batch.
    pub(crate) async fn record(&self, key: &IdempotencyKey, settled: &Settled) -> RecordAnswer {
        group_commit::submit(self.records.queue(key.key()), |reply| RecordJob {
            key: key.clone(),
            settled: settled.clone(),
            reply,
        })
        .await
        .unwrap_or(Batched::Alone)
    }
}

impl Resellers {
    async fn route_batch(&self, jobs: Vec<RouteJob>) {
        let (jobs, twins) = group_commit::twins(jobs, |j| j.request.key.key());
        let done = self.commit_routes(&jobs).await;
        group_commit::deliver(&self.platform.metrics, jobs, twins, done, |job, a| {
            let _ = job.reply.send(a);
        });
    }

    async fn commit_routes(&self, jobs: &[RouteJob]) -> Result<Vec<RouteAnswer>, ResellerError> {
        let now = self.now();
        let mut tx = self.db.begin_write().await?;
        let mut answers: Vec<Option<RouteAnswer>> = jobs.iter().map(|_| None).collect();
        let keys: Vec<&IdempotencyKey> = jobs.iter().map(|j| &j.request.key).collect();
        let mut fresh = Vec::with_capacity(jobs.len());
        for (i, claim) in IdempotencyKey::claim_many(&mut tx, &keys)
            .await?
            .into_iter()
            .enumerate()
        {
            match claim {
                Ok(Claimed::New) => fresh.push(i),
                Ok(Claimed::Replay(Ok(bytes))) => {
                    answers[i] = Some(Batched::Done(Ok(Routing::Answered(bytes))));
                }
                Ok(Claimed::Replay(Err(status))) => {
                    answers[i] = Some(Batched::Done(Err(ResellerError::Replayed(status))));
                }
                Err(e) => answers[i] = Some(Batched::Done(Err(e.into()))),
            }
        }
        let fresh_keys: Vec<&str> = fresh.iter().map(|&i| jobs[i].request.key.key()).collect();
        let mut earlier = store::routed_many(&mut tx, &fresh_keys).await?;
        fresh.retain(|&i| match earlier.remove(jobs[i].request.key.key()) {
            Some(routed) => {
                answers[i] = Some(Batched::Done(Ok(Routing::Routed(Box::new(routed)))));
                false
            }
            None => true,
        });

        let customer_ids: Vec<&str> = fresh
            .iter()
            .map(|&i| jobs[i].request.customer_id.as_str())
            .collect();
        let customers = store::lock_customers(&mut tx, &self.db, &customer_ids).await?;
        let mut partner_ids: Vec<&str> = fresh
            .iter()
            .map(|&i| jobs[i].request.partner_id.as_str())
            .collect();
        partner_ids.sort_unstable();
        partner_ids.dedup();
        let partners = store::partners_many(&mut tx, &partner_ids).await?;
        let capped: Vec<&str> = customers
            .values()
            .filter(|c| c.monthly_limit > 0)
            .map(|c| c.customer_id.as_str())
            .collect();
        let (month_start, _) = domain::month_of(now);
        let mut used =
            store::partner_credits_used_since_many(&mut tx, &capped, month_start).await?;

        let mut routings = Vec::new();
        let mut refusals: Vec<(&IdempotencyKey, Result<Vec<u8>, Status>)> = Vec::new();
        let mut events = false;
        for &i in &fresh {
            let r = &jobs[i].request;
            let customer = customers
                .get(&r.customer_id)
                .filter(|c| c.partner_id == r.partner_id);
            let (Some(customer), Some(partner)) = (customer, partners.get(&r.partner_id)) else {
                let missing = ResellerError::CustomerNotFound {
                    partner: r.partner_id.clone(),
                    customer: r.customer_id.clone(),
                };
                answers[i] = Some(Batched::Done(Err(missing)));
                continue;
            };
            let so_far = used.get(&r.customer_id).copied().unwrap_or(0);
            answers[i] = Some(Batched::Done(match decide(r, customer, partner, so_far) {
                Ok(Decision::Route(routed)) => {
                    if routed.payer == domain::Payer::Partner {
                        *used.entry(r.customer_id.clone()).or_default() += routed.credits;
                    }
                    routings.push((*routed).clone());
                    Ok(Routing::Routed(routed))
                }
                Ok(Decision::Limit(reached)) => {
                    let (event_type, payload) = limit_event(r, reached);
                    self.event(&mut tx, event_type, &r.partner_id, payload)
                        .await?;
                    events = true;
                    refusals.push((&r.key, Err(Status::from(ResellerError::Limit(reached)))));
                    Err(ResellerError::Limit(reached))
                }
                Err(e) => Err(e),
            }));
        }
        store::insert_routed_many(&mut tx, &routings, now).await?;
        IdempotencyKey::record_many(&mut tx, &refusals, now.timestamp_micros()).await?;
        tx.commit().await?;
        if events {
            self.platform.outbox.poke();
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or(Batched::Alone))
            .collect())
    }

    async fn record_batch(&self, jobs: Vec<RecordJob>) {
        let (jobs, twins) = group_commit::twins(jobs, |j| j.key.key());
        let done = self.commit_records(&jobs).await;
        group_commit::deliver(&self.platform.metrics, jobs, twins, done, |job, a| {
            let _ = job.reply.send(a);
        });
    }

    async fn commit_records(&self, jobs: &[RecordJob]) -> Result<Vec<RecordAnswer>, ResellerError> {
        let mut tx = self.db.begin_write().await?;
        let keys: Vec<&IdempotencyKey> = jobs.iter().map(|j| &j.key).collect();
        let mut answers = Vec::with_capacity(jobs.len());
        let mut settled = Vec::new();
        let mut recorded: Vec<(&IdempotencyKey, Result<Vec<u8>, Status>)> = Vec::new();
        for (job, claim) in jobs
            .iter()
            .zip(IdempotencyKey::claim_many(&mut tx, &keys).await?)
        {
            answers.push(Batched::Done(match claim {
                Ok(Claimed::New) => {
                    settled.push(&job.settled.routed);
                    recorded.push((&job.key, job.settled.answer.clone()));
                    job.settled.answer.clone().map_err(ResellerError::Replayed)
                }
                Ok(Claimed::Replay(Ok(bytes))) => Ok(bytes),
                Ok(Claimed::Replay(Err(status))) => Err(ResellerError::Replayed(status)),
                Err(e) => Err(e.into()),
            }));
        }
        store::update_routed_many(&mut tx, &settled).await?;
        IdempotencyKey::record_many(&mut tx, &recorded, self.now().timestamp_micros()).await?;
        tx.commit().await?;
        Ok(answers)
    }
}
