//! The credits-wallet service, as this service calls it: every call carries a wallet-side
//! idempotency key derived from the caller's (`rs:<key>:<step>`), so a retry after a crash
//! between the two services debits once.

use std::time::Duration;

use proto::wallet::v1::{self as pb, credits_wallet_client::CreditsWalletClient};
use runtime::client::{PeerChannel, peer_channel};
use tonic::Status;

use crate::error::ResellerError;

/// A client of the credits-wallet service.
#[derive(Clone)]
pub struct Wallet {
    client: CreditsWalletClient<PeerChannel>,
}

/// The wallet-side key of step `step` of the request with key `key`.
pub fn wallet_key(key: &str, step: &str) -> String {
    format!("rs:{key}:{step}")
}

fn wallet_err(s: Status) -> ResellerError {
    ResellerError::Wallet(s)
}

impl Wallet {
    /// A client of the peer `wallet` of the configuration.
    pub fn connect(config: &runtime::config::ServiceConfig) -> anyhow::Result<Wallet> {
        let peer = config.peer("wallet")?;
        let channel = peer_channel(peer, Duration::from_secs(5))?;
        Ok(Wallet {
            client: CreditsWalletClient::new(channel),
        })
    }

    fn c(&self) -> CreditsWalletClient<PeerChannel> {
        self.client.clone()
    }

    /// OpenWallet.
    pub async fn open(&self, req: pb::OpenWalletRequest) -> Result<pb::Wallet, ResellerError> {
        self.c()
            .open_wallet(req)
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// GetWallet.
    pub async fn get(&self, wallet_id: &str) -> Result<pb::Wallet, ResellerError> {
        self.c()
            .get_wallet(pb::GetWalletRequest {
                wallet_id: wallet_id.into(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// SetFundingMode.
    pub async fn set_funding(
        &self,
        req: pb::SetFundingModeRequest,
    ) -> Result<pb::Wallet, ResellerError> {
        self.c()
            .set_funding_mode(req)
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// ChargeMailing.
    pub async fn charge(
        &self,
        req: pb::ChargeMailingRequest,
    ) -> Result<pb::MailingCharge, ResellerError> {
        self.c()
            .charge_mailing(req)
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// ReserveCredits.
    pub async fn reserve(
        &self,
        req: pb::ReserveCreditsRequest,
    ) -> Result<pb::Reservation, ResellerError> {
        self.c()
            .reserve_credits(req)
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// CaptureReservation.
    pub async fn capture(
        &self,
        req: pb::CaptureReservationRequest,
    ) -> Result<pb::Reservation, ResellerError> {
        self.c()
            .capture_reservation(req)
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// ReleaseReservation.
    pub async fn release(
        &self,
        req: pb::ReleaseReservationRequest,
    ) -> Result<pb::Reservation, ResellerError> {
        self.c()
            .release_reservation(req)
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// TransferCredits.
    pub async fn transfer(
        &self,
        req: pb::TransferCreditsRequest,
    ) -> Result<pb::CreditTransfer, ResellerError> {
        self.c()
            .transfer_credits(req)
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// ConfigureLowBalanceReminder.
    pub async fn reminder(
        &self,
        req: pb::ConfigureLowBalanceReminderRequest,
    ) -> Result<pb::Wallet, ResellerError> {
        self.c()
            .configure_low_balance_reminder(req)
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// ConfigureAutoTopUp.
    pub async fn auto_top_up(
        &self,
        req: pb::ConfigureAutoTopUpRequest,
    ) -> Result<pb::Wallet, ResellerError> {
        self.c()
            .configure_auto_top_up(req)
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }

    /// WatchEvents from a cursor.
    pub async fn watch(
        &self,
        after_cursor: u64,
    ) -> Result<tonic::Streaming<proto::common::v1::Event>, ResellerError> {
        self.c()
            .watch_events(proto::common::v1::WatchEventsRequest {
                after_cursor,
                types: vec![
                    "wallet.low_balance".into(),
                    "wallet.top_up_succeeded".into(),
                    "wallet.top_up_failed".into(),
                ],
            })
            .await
            .map(|r| r.into_inner())
            .map_err(wallet_err)
    }
}
