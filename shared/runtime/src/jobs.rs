//! The loop a service's background jobs run in: a pass, then a wait for the interval, for the
//! test clock to move (when asked) or for shutdown, which ends the loop between two passes.
//! What a pass does (and how it logs its failures) is the service's.

use std::{future::Future, time::Duration};

use chrono::{DateTime, Utc};
use shared::SimulatedGateway;
use tokio::task::JoinHandle;

use crate::Platform;

/// A pass run again and again until the platform shuts down.
#[derive(Debug, Clone, Copy)]
pub struct Periodic {
    interval: Duration,
    on_clock_move: bool,
}

impl Periodic {
    /// A pass every `interval`.
    pub fn every(interval: Duration) -> Self {
        Self {
            interval,
            on_clock_move: false,
        }
    }

    /// Also a pass at once whenever the test clock moves (`TestClock/AdvanceTime`), so a test
    /// that moves time sees the jobs follow without waiting for the interval.
    pub fn and_when_the_clock_moves(self) -> Self {
        Self {
            on_clock_move: true,
            ..self
        }
    }

    /// Starts the loop on the runtime: `pass()` at once, then after each wait.
    pub fn spawn<F, Fut>(self, platform: &Platform, mut pass: F) -> JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let Periodic {
            interval,
            on_clock_move,
        } = self;
        let shutdown = platform.shutdown.clone();
        let clock = platform.clock.clone();
        tokio::spawn(async move {
            let mut clock_moves = if on_clock_move {
                clock.subscribe()
            } else {
                None
            };
            loop {
                pass().await;
                let moved = async {
                    match clock_moves.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                    _ = moved => {}
                }
            }
        })
    }
}

/// The simulator's bank, when the simulator is the gateway (`None` otherwise): settles or
/// returns the direct debits due at `now`; each service then applies the outcomes it polls.
pub fn settle_simulated_debits(simulator: Option<&SimulatedGateway>, now: DateTime<Utc>) {
    let settled = simulator.map(|s| s.settle_due(now)).unwrap_or_default();
    if !settled.is_empty() {
        tracing::info!(
            count = settled.len(),
            "direct debits settled or returned at the bank"
        );
    }
}
