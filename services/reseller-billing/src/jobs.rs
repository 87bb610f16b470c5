//! Relays the partner wallets' low-balance and top-up events (W4) from the credits-wallet
//! service's event stream into this service's own, resuming from the stored cursor.

use std::time::Duration;

use futures::StreamExt;
use runtime::{Platform, jobs::Periodic};

use crate::{service::Resellers, store, wallet::Wallet};

/// How long the relay waits before it follows the wallet's events again.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Follows the wallet's events until shutdown, reconnecting after a failure.
pub fn spawn(platform: &Platform, resellers: Resellers, wallet: Wallet) {
    let on = platform.clone();
    Periodic::every(RECONNECT_AFTER).spawn(platform, move || {
        let (platform, resellers, wallet) = (on.clone(), resellers.clone(), wallet.clone());
        async move {
            if let Err(e) = follow(&platform, &resellers, &wallet).await {
                tracing::debug!(error = %e, "wallet event relay interrupted; reconnecting");
            }
        }
    });
}

async fn follow(platform: &Platform, resellers: &Resellers, wallet: &Wallet) -> anyhow::Result<()> {
    let cursor = store::relay_cursor(&platform.db).await?;
    let mut events = wallet
        .watch(u64::try_from(cursor).unwrap_or(0))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    loop {
        let next = tokio::select! {
            _ = platform.shutdown.cancelled() => return Ok(()),
            next = events.next() => next,
        };
        match next {
            Some(Ok(event)) => resellers
                .relay(&event)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            Some(Err(status)) => return Err(anyhow::anyhow!("{status}")),
            None => return Ok(()),
        }
    }
}
