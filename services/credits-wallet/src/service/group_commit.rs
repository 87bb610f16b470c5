//! Group commit for sends (issue 7): many `ChargeMailing` and `ReserveCredits` calls applied in
//! one write transaction, each caller answered only after that transaction commits.
//!
//! A hot wallet (a reseller's, debited by all of its customers at once) is bound by one commit
//! per debit when every debit is its own transaction: each waits for the previous one's row lock
//! and flush. Here a collector task takes every send waiting in its queue (up to `max_batch`) and
//! one worker runs them together:
//! 1. claims all their idempotency keys with one query (replays and mismatches are answered as
//!    they would be alone);
//! 2. locks all their wallets with one `SELECT ... FOR UPDATE` in `wallet_id` order (on SQLite
//!    the write transaction already excludes other writers), and reads their lots, the month's
//!    automatic purchases of those with automatic top-up on and the lapsed holds of those that
//!    hold credits, one query each (none when no wallet of the batch needs it);
//! 3. applies each send in arrival order to its wallet in memory with the same rules as a send
//!    alone ([`super::send_rules`]: `refuse_send`, `top_up_plan`, `apply_send`), so two sends of
//!    one wallet in a batch see each other's debits;
//! 4. writes the lots, entries, holds, events, wallet headers and idempotency answers with one
//!    statement per chunk, checks every wallet's invariant, and commits once.
//!
//! Correctness still comes from the database, not from this process: replicas each run their
//! own batches, which exclude each other through the same row locks (taken in one global order,
//! so they cannot deadlock) and the same unique key index. A send the batch does not take runs
//! alone after the batch committed ([`Batched::Alone`]; the send use cases, [`super::sends`],
//! try the batch and else run alone; this module never calls them): one that must buy credits first (C5, C9:
//! the payment runs between two transactions), one whose purchase is already recorded (a retry
//! after a timeout or crash), a second send with a key already in the batch, and every send of a
//! batch whose transaction failed (a unique violation from a twin on another replica, a
//! deadlock, a lost connection): nothing of a failed batch is committed, so running each alone is
//! exactly what would have happened without batching.

use std::collections::HashMap;

use runtime::{
    group_commit,
    idempotency::{Claimed, IdempotencyKey},
};
use sqlx::{Any, Transaction};
use tokio::sync::oneshot;
use tonic::Status;

use super::{
    Wallets,
    purchases::fixed_top_up_after,
    send_rules::{Spend, active_hold, apply_send, capture_hold, rate, refuse_send, top_up_plan},
};
use crate::{
    account::{Account, month_start},
    convert,
    domain::{AutoTopUpMode, TopUpPlan},
    error::WalletError,
    model::{PurchaseRecord, ReservationRecord, SendAnswer, SendDone},
    store,
};

/// Most sends in one batch: enough for every caller of a hot wallet at once, and a transaction
/// still short enough that no caller waits long for its commit.
pub const MAX_BATCH: usize = 256;

/// What became of a mutation handed to group commit: its answer (or refusal), or `Alone`.
pub type Batched = group_commit::Batched<Result<SendAnswer, WalletError>>;

/// A mutation group commit takes.
#[derive(Debug, Clone)]
pub enum Op {
    /// ChargeMailing or ReserveCredits.
    Spend(Spend),
    /// CaptureReservation.
    Capture {
        /// The hold.
        reservation_id: String,
        /// What was sent.
        recipients_sent: u64,
    },
}

struct SendJob {
    key: IdempotencyKey,
    wallet_id: String,
    op: Op,
    reply: oneshot::Sender<Batched>,
}

/// The queue into the batch collector. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    shards: group_commit::Shards<SendJob>,
}

impl GroupCommit {
    /// Starts the collectors for `wallets` (which must not batch itself) on the current
    /// runtime: `shards` of them, a wallet's mutations always in the same one
    /// (`runtime::group_commit::Shards`). They end when the last [`GroupCommit`] is dropped.
    pub fn start(wallets: Wallets, max_batch: usize, shards: usize) -> Self {
        let shards = group_commit::Shards::spawn(shards, max_batch, move |jobs| {
            let wallets = wallets.clone();
            async move { run_batch(&wallets, jobs).await }
        });
        Self { shards }
    }

    /// Hands a mutation to the next batch and waits for its answer.
    pub async fn submit(&self, key: &IdempotencyKey, wallet_id: &str, op: Op) -> Batched {
        // No answer means the worker went away (shutdown) before answering: what it did not
        // commit is redone alone, and what it committed is replayed from the key.
        group_commit::submit(self.shards.queue(wallet_id), |reply| SendJob {
            key: key.clone(),
            wallet_id: wallet_id.to_string(),
            op,
            reply,
        })
        .await
        .unwrap_or(Batched::Alone)
    }
}

/// One send's fate inside the batch transaction.
enum InBatch {
    /// Applied: what it did.
    Applied(SendDone),
    /// Refused; recorded under its key when the refusal is one that is replayed.
    Refused(WalletError),
    /// Run alone after the batch.
    Alone,
}

/// A capture on its locked account, by the rules of a capture alone; with the hold as it is
/// after the capture, when it went through.
fn capture_in_batch(
    acct: &mut Account,
    held: Option<ReservationRecord>,
    reservation_id: &str,
    recipients_sent: u64,
) -> (InBatch, Option<ReservationRecord>) {
    let r = match active_hold(held, reservation_id, acct.now) {
        Ok(r) => r,
        Err(e) => return (InBatch::Refused(e), None),
    };
    match capture_hold(acct, r, recipients_sent) {
        Ok(r) => (
            InBatch::Applied(SendDone::Hold(acct.hold_changed(r.clone()))),
            Some(r),
        ),
        Err(e) => (InBatch::Refused(e), None),
    }
}

/// What a committed batch answers, and what it leaves to do after the commit.
struct Committed {
    answers: Vec<Batched>,
    follow_ups: Vec<PurchaseRecord>,
}

/// Runs `ops` as one batch now, on this task (what a collector does with the mutations it
/// finds waiting): one answer per mutation, in order, [`Batched::Alone`] for each the batch
/// did not take (the caller runs those alone).
pub(crate) async fn run_now(
    wallets: &Wallets,
    ops: Vec<(IdempotencyKey, String, Op)>,
) -> Vec<Batched> {
    let mut jobs = Vec::with_capacity(ops.len());
    let mut waiting = Vec::with_capacity(ops.len());
    for (key, wallet_id, op) in ops {
        let (reply, answer) = oneshot::channel();
        waiting.push(answer);
        jobs.push(SendJob {
            key,
            wallet_id,
            op,
            reply,
        });
    }
    run_batch(wallets, jobs).await;
    let mut out = Vec::with_capacity(waiting.len());
    for answer in waiting {
        out.push(answer.await.unwrap_or(Batched::Alone));
    }
    out
}

async fn run_batch(wallets: &Wallets, jobs: Vec<SendJob>) {
    let (jobs, twins) = group_commit::twins(jobs, |j| j.key.key());
    let (done, follow_ups) = match commit_batch(wallets, &jobs).await {
        Ok(c) => (Ok(c.answers), c.follow_ups),
        Err(e) => (Err(e), Vec::new()),
    };
    group_commit::deliver(&wallets.platform.metrics, jobs, twins, done, |job, a| {
        let _ = job.reply.send(a);
    });
    for p in follow_ups {
        wallets.drive_in_background(p);
    }
}

async fn commit_batch(wallets: &Wallets, jobs: &[SendJob]) -> Result<Committed, WalletError> {
    let now = wallets.now();
    let mut tx = wallets.db.begin_write().await?;
    let mut answers: Vec<Option<Batched>> = jobs.iter().map(|_| None).collect();

    let keys: Vec<&IdempotencyKey> = jobs.iter().map(|j| &j.key).collect();
    let mut fresh = Vec::with_capacity(jobs.len());
    for (i, claim) in IdempotencyKey::claim_many(&mut tx, &keys)
        .await?
        .into_iter()
        .enumerate()
    {
        match claim {
            Ok(Claimed::New) => fresh.push(i),
            Ok(Claimed::Replay(r)) => {
                let replayed = r.map(SendAnswer::Replayed);
                answers[i] = Some(Batched::Done(replayed.map_err(WalletError::Replayed)));
            }
            Err(e) => answers[i] = Some(Batched::Done(Err(e.into()))),
        }
    }
    let fresh_keys: Vec<&str> = fresh.iter().map(|&i| jobs[i].key.key()).collect();
    let started_purchase = store::purchase_origins(&mut tx, &fresh_keys).await?;
    fresh.retain(|&i| {
        let resumes = started_purchase.contains(jobs[i].key.key());
        if resumes {
            answers[i] = Some(Batched::Alone);
        }
        !resumes
    });

    let mut wallet_ids: Vec<&str> = fresh.iter().map(|&i| jobs[i].wallet_id.as_str()).collect();
    wallet_ids.sort_unstable();
    wallet_ids.dedup();
    let headers = store::lock_wallets(&mut tx, &wallets.db, &wallet_ids).await?;
    let mut lots = store::lots_of_wallets(&mut tx, &wallet_ids).await?;
    // Two reads only for the wallets they can concern (most batches: none, and no query).
    // The month's automatic purchases matter to a send only where automatic top-up is on
    // (a batch reports no wallet, so the others' count is never shown). A wallet holds
    // nothing when `held` is 0, since every hold is of at least one credit.
    let topping_up: Vec<&str> = headers
        .iter()
        .filter(|w| w.top_up.mode != AutoTopUpMode::Off)
        .map(|w| w.wallet_id.as_str())
        .collect();
    let holding: Vec<&str> = headers
        .iter()
        .filter(|w| w.held > 0)
        .map(|w| w.wallet_id.as_str())
        .collect();
    let bought = store::auto_bought_since_many(&mut tx, &topping_up, month_start(now)).await?;
    let mut lapsed = store::lapsed_reservations_many(&mut tx, &holding, now).await?;
    let hold_ids: Vec<&str> = fresh
        .iter()
        .filter_map(|&i| match &jobs[i].op {
            Op::Capture { reservation_id, .. } => Some(reservation_id.as_str()),
            Op::Spend(_) => None,
        })
        .collect();
    let mut holds = store::reservations_many(&mut tx, &hold_ids).await?;
    let mut accounts: HashMap<String, Account> = headers
        .into_iter()
        .map(|w| {
            let id = w.wallet_id.clone();
            let mut acct = Account::from_parts(
                w,
                lots.remove(&id).unwrap_or_default(),
                bought.get(&id).copied().unwrap_or(0),
                now,
            );
            acct.housekeeping_with(lapsed.remove(&id).unwrap_or_default());
            (id, acct)
        })
        .collect();

    let mut recorded: Vec<(&IdempotencyKey, Result<Vec<u8>, Status>)> = Vec::new();
    let mut follow_ups = Vec::new();
    for &i in &fresh {
        let job = &jobs[i];
        let Some(acct) = accounts.get_mut(&job.wallet_id) else {
            let missing = WalletError::WalletNotFound(job.wallet_id.clone());
            answers[i] = Some(Batched::Done(Err(missing)));
            continue;
        };
        let applied = apply_in_batch(&mut tx, acct, &job.wallet_id, &job.op, &mut holds).await?;
        answers[i] = Some(match applied {
            (InBatch::Applied(done), follow_up) => {
                recorded.push((&job.key, Ok(convert::send_done_bytes(&done))));
                follow_ups.extend(follow_up);
                Batched::Done(Ok(SendAnswer::Done(done)))
            }
            (InBatch::Refused(err), _) => {
                if err.is_recorded_refusal() {
                    recorded.push((&job.key, Err(Status::from(err.clone_refusal()))));
                }
                Batched::Done(Err(err))
            }
            (InBatch::Alone, _) => Batched::Alone,
        });
    }

    let events = accounts.values().any(Account::has_events);
    Account::save_many(&mut tx, accounts.into_values().collect()).await?;
    IdempotencyKey::record_many(&mut tx, &recorded, now.timestamp_micros()).await?;
    tx.commit().await?;
    if events || !follow_ups.is_empty() {
        wallets.platform.outbox.poke();
    }
    Ok(Committed {
        answers: answers
            .into_iter()
            .map(|a| a.unwrap_or(Batched::Alone))
            .collect(),
        follow_ups,
    })
}

/// One mutation on its locked account, by the rules of the same mutation alone, with the
/// automatic top-up a debit calls for (C4); `Err` only for storage failures (which fail the
/// whole batch). `holds` are the batch's holds being captured, kept current.
async fn apply_in_batch(
    tx: &mut Transaction<'static, Any>,
    acct: &mut Account,
    wallet_id: &str,
    op: &Op,
    holds: &mut HashMap<String, ReservationRecord>,
) -> Result<(InBatch, Option<PurchaseRecord>), WalletError> {
    let (outcome, debited) = match op {
        Op::Spend(spend) => (
            send_in_batch(acct, spend),
            matches!(spend, Spend::Charge { .. }),
        ),
        Op::Capture {
            reservation_id,
            recipients_sent,
        } => {
            let held = holds
                .get(reservation_id)
                .filter(|r| r.wallet_id == wallet_id)
                .cloned();
            let (outcome, captured) =
                capture_in_batch(acct, held, reservation_id, *recipients_sent);
            if let Some(r) = captured {
                // A second capture of the same hold in this batch finds it captured.
                holds.insert(r.reservation_id.clone(), r);
            }
            (outcome, true)
        }
    };
    let follow_up = match outcome {
        InBatch::Applied(_) if debited => fixed_top_up_after(tx, acct).await?,
        _ => None,
    };
    Ok((outcome, follow_up))
}

/// A send on its locked account, by the rules of a send alone.
fn send_in_batch(acct: &mut Account, spend: &Spend) -> InBatch {
    let needed = match rate(&acct.wallet.rating, spend.recipients()) {
        Ok(n) => n,
        Err(e) => return InBatch::Refused(e),
    };
    if let Some(err) = refuse_send(acct, spend) {
        return InBatch::Refused(err);
    }
    match top_up_plan(acct, needed) {
        TopUpPlan::NotNeeded => {}
        TopUpPlan::Refused { shortfall, reason } => {
            return InBatch::Refused(WalletError::Insufficient {
                shortfall,
                top_up: Some(reason),
            });
        }
        // A payment never runs inside a transaction: this send buys its credits alone.
        TopUpPlan::Buy(_) => return InBatch::Alone,
    }
    match apply_send(acct, spend, needed, None) {
        Ok(done) => InBatch::Applied(done),
        Err(err) => InBatch::Refused(err),
    }
}
