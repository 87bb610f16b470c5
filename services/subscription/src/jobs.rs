//! Background work, on every replica (each step is safe to run twice: renewals and trial ends
//! move under the subscription's lock and at most one invoice is issued per cycle; card
//! attempts are keyed by invoice and attempt; wallet grants by subscription and cycle):
//!
//! - trial ending notices, trial conversions (S15) and expiries (S16);
//! - period ends: scheduled changes, cancellations (S13), renewal invoices;
//! - card collection of open invoices, with retries, then suspension;
//! - the plan's credit allowance in the wallet (C7).
//!
//! It runs every [`INTERVAL`] and at once whenever the test clock moves.

use std::time::Duration;

use runtime::Platform;

use crate::{domain, service::Subscriptions, store};

/// How often the jobs run.
pub const INTERVAL: Duration = Duration::from_millis(500);
const BATCH: i64 = 200;

/// Runs the jobs until the platform shuts down.
pub fn spawn(platform: &Platform, cases: Subscriptions) {
    let platform = platform.clone();
    tokio::spawn(async move {
        let mut clock_moves = platform.clock.subscribe();
        loop {
            run_once(&platform, &cases).await;
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
pub async fn run_once(platform: &Platform, cases: &Subscriptions) {
    let now = platform.clock.now();
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
