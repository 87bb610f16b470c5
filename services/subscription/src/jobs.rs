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
//! - the plan's credit allowance in the wallet, every month, also of yearly plans (C7);
//! - card and direct-debit collection of open invoices, with retries, then suspension.
//!
//! It runs every [`INTERVAL`] and at once whenever the test clock moves.

use std::{sync::Arc, time::Duration};

use runtime::Platform;
use shared::SimulatedGateway;

use crate::{
    domain,
    service::{RECONCILE_AFTER_SECONDS, Subscriptions},
    store,
};

/// How often the jobs run.
pub const INTERVAL: Duration = Duration::from_millis(500);
const BATCH: i64 = 200;

/// Runs the jobs until the platform shuts down.
pub fn spawn(platform: &Platform, cases: Subscriptions, simulator: Arc<SimulatedGateway>) {
    let platform = platform.clone();
    tokio::spawn(async move {
        let mut clock_moves = platform.clock.subscribe();
        loop {
            run_once(&platform, &cases, &simulator).await;
            let moved = async {
                match clock_moves.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = platform.shutdown.cancelled() => break,
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = moved => {}
            }
        }
    });
}

/// One pass of every job.
pub async fn run_once(platform: &Platform, cases: &Subscriptions, simulator: &SimulatedGateway) {
    let now = platform.clock.now();
    let settled = simulator.settle_due(now);
    if !settled.is_empty() {
        tracing::info!(
            count = settled.len(),
            "direct debits settled or returned at the bank"
        );
    }
    match store::pending_debit_invoices(&platform.db, BATCH).await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = cases.settle_debit(&id).await {
                    tracing::warn!(invoice = %id, error = %e, "settling a direct debit failed");
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
    let notice = domain::TRIAL_ENDING_NOTICE_DAYS * 86_400 * 1_000_000;
    match store::due_accounts(&platform.db, now, notice, BATCH).await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = cases.process_due(&id).await {
                    tracing::warn!(account = %id, error = %e, "processing a due subscription failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing due subscriptions failed"),
    }
    match store::due_card_invoices(&platform.db, now, BATCH).await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = cases.collect(&id).await {
                    tracing::warn!(invoice = %id, error = %e, "collecting an invoice failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing due invoices failed"),
    }
}
