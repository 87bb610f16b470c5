//! Background work, on every replica (each step is safe to run twice: renewals and trial ends
//! move under the subscription's lock and at most one invoice is issued per cycle; card
//! attempts are keyed by invoice and attempt; a request's payment by its own gateway key;
//! wallet grants by subscription, cycle and month; every outcome is applied once, under the
//! subscription's lock, after checking it was not applied already):
//!
//! - direct debits settle or come back (the simulator's bank moves with the service clock),
//!   then pending invoices follow them: paid, or open again and the subscription past due;
//! - payments of Subscribe and immediate changes whose outcome stayed unknown (the client
//!   never retried) are finished with the same gateway key after a grace time;
//! - trial ending notices, trial conversions (S15) and expiries (S16);
//! - period ends: scheduled changes, cancellations (S13), renewal invoices;
//! - the plan's credit allowance in the account's wallet (wallet id = account id), every
//!   month, also of yearly plans (C7); a month whose account has no wallet yet is never
//!   recorded as granted: it waits for the wallet and is asked again every
//!   [`WALLET_WAIT_RETRY_SECONDS`](crate::service::WALLET_WAIT_RETRY_SECONDS);
//! - card and direct-debit collection of open invoices, with retries, then suspension.
//!
//! It runs every [`INTERVAL`] and at once whenever the test clock moves; a pass that found a
//! full batch of renewals goes on without waiting until none is left.
//!
//! Renewals run in batches ([`Subscriptions::renew_batch`]): one write transaction claims up
//! to [`RENEWAL_BATCH`] due subscriptions (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas
//! take different ones), renews them and numbers their invoices from one range of the counter.
//! After the commit, outside any transaction, the batch's card charges and wallet grants run
//! concurrently (bounded), and their outcomes are applied in one more transaction under the
//! subscriptions' locks ([`Subscriptions::charge_and_grant`]). While one batch is out at the
//! gateway and the wallet, the next is claimed ([`PIPELINE`] batches in flight).
//!
//! Words: a direct debit *settles* at the bank (the money arrives) or comes back; the jobs
//! *poll* the gateway for that ([`Subscriptions::poll_direct_debit`]). A charge is *captured*
//! (paid) or only pending (a debit submitted).

use std::{sync::Arc, time::Duration};

use runtime::{Platform, jobs::Periodic};
use shared::SimulatedGateway;
use tokio::task::JoinSet;

use crate::{
    service::{RECONCILE_AFTER_SECONDS, RenewalBatch, Subscriptions},
    store,
};

/// How often the jobs run.
pub const INTERVAL: Duration = Duration::from_millis(500);
const BATCH: i64 = 200;
/// Subscriptions renewed per transaction.
pub const RENEWAL_BATCH: i64 = 500;
/// Renewal batches whose charges and grants are in flight while the next one is claimed.
const PIPELINE: usize = 3;
/// Most renewal batches in one pass (then the other jobs get their turn).
const MAX_BATCHES_PER_PASS: usize = 400;

/// Runs the jobs until the platform shuts down.
pub fn spawn(platform: &Platform, cases: Subscriptions, simulator: Option<Arc<SimulatedGateway>>) {
    let on = platform.clone();
    Periodic::every(INTERVAL)
        .and_when_the_clock_moves()
        .spawn(platform, move || {
            let (platform, cases, simulator) = (on.clone(), cases.clone(), simulator.clone());
            async move { run_once(&platform, &cases, simulator.as_deref()).await }
        });
}

/// One pass of every job.
/// `simulator`: the simulator when it is the gateway (its bank settles debits as the clock
/// moves); with Stripe, the pending debits below are polled through the gateway alone.
pub async fn run_once(
    platform: &Platform,
    cases: &Subscriptions,
    simulator: Option<&SimulatedGateway>,
) {
    let now = platform.clock.now();
    runtime::jobs::settle_simulated_debits(simulator, now);
    match store::pending_debit_invoices(&platform.db, BATCH).await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = cases.poll_direct_debit(&id).await {
                    tracing::warn!(invoice = %id, error = %e, "polling a direct debit failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing pending direct debits failed"),
    }
    // Before the period ends below, so a finished payment never holds back a renewal.
    let grace = chrono::Duration::seconds(RECONCILE_AFTER_SECONDS);
    match store::payments_in_flight(&platform.db, now - grace, BATCH).await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = cases.reconcile_payment(&id).await {
                    tracing::warn!(account = %id, error = %e, "reconciling a payment failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing payments in flight failed"),
    }
    renewals(cases).await;
    // Credits not granted with a renewal batch (after Subscribe, a failed grant, a yearly
    // plan's next month), a batch at a time while full ones are found.
    for _ in 0..MAX_BATCHES_PER_PASS {
        match store::due_allowances(&platform.db, platform.clock.now(), RENEWAL_BATCH).await {
            Ok(ids) => {
                let full = ids.len() as i64 == RENEWAL_BATCH;
                if ids.is_empty() {
                    break;
                }
                let subs = match store::read_subscriptions(&platform.db, &ids).await {
                    Ok(subs) => subs,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading subscriptions with credits due failed");
                        break;
                    }
                };
                match cases.grant_many(subs).await {
                    // A full list with nothing recorded (the wallet refusing): next pass.
                    Ok(recorded) if full && recorded > 0 => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "granting subscription credits failed");
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing subscriptions with credits due failed");
                break;
            }
        }
    }
    match store::due_card_invoices(&platform.db, platform.clock.now(), BATCH).await {
        Ok(ids) => {
            if let Err(e) = cases.collect_many(&ids).await {
                // One by one, so one failing invoice does not hold back the others (the
                // gateway answers a repeated key with its first outcome).
                tracing::warn!(error = %e, "collecting a batch of invoices failed; one by one");
                for id in ids {
                    if let Err(e) = cases.collect(&id).await {
                        tracing::warn!(invoice = %id, error = %e, "collecting an invoice failed");
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing due invoices failed"),
    }
}

/// Renewal batches until one comes back short, each batch's charges and grants running while
/// the next is claimed.
async fn renewals(cases: &Subscriptions) {
    // Tasks, not futures polled by this loop: they run while the next batch is claimed.
    let mut in_flight = JoinSet::new();
    for _ in 0..MAX_BATCHES_PER_PASS {
        let batch = match cases.renew_batch(RENEWAL_BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "claiming due subscriptions failed");
                break;
            }
        };
        // A full batch means more may be waiting; one that changed nothing (which the claim's
        // conditions rule out) must not be claimed again and again in this pass.
        let full = batch.claimed as i64 == RENEWAL_BATCH && !batch.renewed.is_empty();
        let cases = cases.clone();
        in_flight.spawn(async move { follow_up(&cases, batch).await });
        while in_flight.len() >= PIPELINE {
            in_flight.join_next().await;
        }
        if !full {
            break;
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// A committed batch's card charges and monthly credits, concurrently, applied together.
async fn follow_up(cases: &Subscriptions, batch: RenewalBatch) {
    let RenewalBatch {
        to_collect,
        renewed,
        ..
    } = batch;
    if let Err(e) = cases.charge_and_grant(to_collect, renewed).await {
        tracing::warn!(error = %e, "charging or crediting a renewal batch failed; the jobs retry");
    }
}
