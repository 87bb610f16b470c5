//! Background work of the wallet, on every replica (each step is safe to run twice: purchase
//! statuses move once under the wallet's lock, and sweeps only write what is due):
//!
//! - direct debits settle or come back (the simulator's bank moves with the service clock; with
//!   Stripe, the reconciliation below polls each pending debit's PaymentIntent);
//! - open purchases are reconciled with the gateway under their own idempotency key, so a
//!   timeout or a crash never loses a paid purchase nor grants it twice;
//! - expired lots (C7) and lapsed holds are swept, with their ledger entries and events.
//!
//! It runs every [`INTERVAL`] and at once whenever the test clock moves.

use std::{sync::Arc, time::Duration};

use runtime::{Platform, jobs::Periodic};
use shared::SimulatedGateway;

use crate::{service::Wallets, store};

/// How often the jobs run.
pub const INTERVAL: Duration = Duration::from_millis(500);
const BATCH: i64 = 200;

/// Runs the jobs until the platform shuts down.
pub fn spawn(platform: &Platform, wallets: Wallets, simulator: Option<Arc<SimulatedGateway>>) {
    let on = platform.clone();
    Periodic::every(INTERVAL)
        .and_when_the_clock_moves()
        .spawn(platform, move || {
            let (platform, wallets, simulator) = (on.clone(), wallets.clone(), simulator.clone());
            async move { run_once(&platform, &wallets, simulator.as_deref()).await }
        });
}

/// One pass of every job.
/// `simulator`: the simulator when it is the gateway (its bank settles debits as the clock moves).
pub async fn run_once(
    platform: &Platform,
    wallets: &Wallets,
    simulator: Option<&SimulatedGateway>,
) {
    let now = platform.clock.now();
    runtime::jobs::settle_simulated_debits(simulator, now);
    match store::open_purchase_ids(&platform.db, BATCH).await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = wallets.reconcile_purchase(&id).await {
                    tracing::warn!(purchase = %id, error = %e, "reconciling a purchase failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing open purchases failed"),
    }
    match store::wallets_with_due_work(&platform.db, now, BATCH).await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = wallets.sweep_wallet(&id).await {
                    tracing::warn!(wallet = %id, error = %e, "sweeping a wallet failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing due wallets failed"),
    }
}
