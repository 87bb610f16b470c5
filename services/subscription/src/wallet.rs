//! The credits-wallet service, as this service calls it: the months of plan credits (C7),
//! each granted with a key naming the subscription, cycle and month, so a retry never grants
//! twice. The wallet is optional: without a `[peers.wallet]` the months wait for one.

use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::wallet::v1::{self as pb, credits_wallet_client::CreditsWalletClient};
use runtime::client::{PeerChannel, peer_channel};

/// A client of the credits-wallet service.
#[derive(Clone)]
pub struct Wallet {
    client: CreditsWalletClient<PeerChannel>,
}

/// A month of plan credits to grant in an account's wallet (wallet id = account id).
#[derive(Debug, Clone)]
pub struct Grant {
    /// The wallet-side idempotency key (subscription, cycle and month).
    pub idempotency_key: String,
    /// The account's wallet.
    pub wallet_id: String,
    /// Whole credits.
    pub credits: u64,
    /// The month's end: the credits expire with it.
    pub expires_at: DateTime<Utc>,
    /// What the wallet's ledger shows the credits came from.
    pub reference: String,
}

/// What the wallet said to a month's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantOutcome {
    /// Granted (or nothing to call: no credits, or the month is over).
    Granted,
    /// The account has no wallet yet: the month waits for it.
    NoWallet,
    /// Unreachable or refused otherwise: asked again on the next pass.
    Failed,
}

impl From<CreditsWalletClient<PeerChannel>> for Wallet {
    fn from(client: CreditsWalletClient<PeerChannel>) -> Self {
        Wallet { client }
    }
}

impl Wallet {
    /// A client of the peer `wallet` of the configuration, or `None` when there is none.
    pub fn connect(config: &runtime::config::ServiceConfig) -> anyhow::Result<Option<Wallet>> {
        match config.peer("wallet") {
            Ok(peer) => Ok(Some(Wallet {
                client: CreditsWalletClient::new(peer_channel(peer, Duration::from_secs(5))?),
            })),
            Err(_) => Ok(None),
        }
    }

    /// GrantCredits: a month's allowance lot (`SUBSCRIPTION_ALLOWANCE`).
    pub async fn grant(&self, grant: &Grant) -> GrantOutcome {
        let request = pb::GrantCreditsRequest {
            idempotency_key: grant.idempotency_key.clone(),
            wallet_id: grant.wallet_id.clone(),
            credits: grant.credits,
            kind: pb::LotKind::SubscriptionAllowance as i32,
            expires_at: Some(runtime::convert::timestamp(grant.expires_at)),
            reference: grant.reference.clone(),
        };
        match self.client.clone().grant_credits(request).await {
            Ok(_) => GrantOutcome::Granted,
            Err(status) if status.code() == tonic::Code::NotFound => GrantOutcome::NoWallet,
            Err(status) => {
                tracing::warn!(account = %grant.wallet_id, error = %status, "granting subscription credits failed; will retry");
                GrantOutcome::Failed
            }
        }
    }
}
