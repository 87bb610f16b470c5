//! A wallet's settings: ConfigureAutoTopUp (C4, C5, C6), ConfigureLowBalanceReminder (C3) and
//! SetFundingMode (C9).

use runtime::{convert::Answer, idempotency::IdempotencyKey};

use super::{Locked, Wallets};
use crate::{
    domain::AutoTopUp,
    error::WalletError,
    model::{FundingMode, WalletView},
};

impl Wallets {
    /// ConfigureAutoTopUp (C4, C5, C6).
    pub async fn configure_auto_top_up(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
        top_up: AutoTopUp,
        payment_method: &str,
    ) -> Result<Answer<WalletView>, WalletError> {
        let (tx, mut acct) = match self.begin_on::<WalletView>(key, wallet_id).await? {
            Locked::Replay(r) => return Self::replayed(r),
            Locked::Fresh(tx, acct) => (tx, *acct),
        };
        if !payment_method.is_empty() {
            acct.wallet.payment_method = payment_method.to_string();
        }
        if top_up != AutoTopUp::OFF && acct.wallet.payment_method.is_empty() {
            return Err(WalletError::invalid(
                "payment_method",
                "auto top-up needs a card or direct-debit method on file",
            ));
        }
        acct.wallet.top_up = top_up;
        let answer = acct.view();
        self.finish(tx, acct, key, answer).await
    }

    /// ConfigureLowBalanceReminder (C3).
    pub async fn configure_reminder(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
        threshold: Option<i64>,
    ) -> Result<Answer<WalletView>, WalletError> {
        let (tx, mut acct) = match self.begin_on::<WalletView>(key, wallet_id).await? {
            Locked::Replay(r) => return Self::replayed(r),
            Locked::Fresh(tx, acct) => (tx, *acct),
        };
        acct.set_reminder(threshold);
        let answer = acct.view();
        self.finish(tx, acct, key, answer).await
    }

    /// SetFundingMode (C9).
    pub async fn set_funding_mode(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
        mode: FundingMode,
        payment_method: &str,
    ) -> Result<Answer<WalletView>, WalletError> {
        let (tx, mut acct) = match self.begin_on::<WalletView>(key, wallet_id).await? {
            Locked::Replay(r) => return Self::replayed(r),
            Locked::Fresh(tx, acct) => (tx, *acct),
        };
        if !payment_method.is_empty() {
            acct.wallet.payment_method = payment_method.to_string();
        }
        if mode == FundingMode::OnDemand && acct.wallet.payment_method.is_empty() {
            return Err(WalletError::invalid(
                "payment_method",
                "on-demand funding needs a card or direct-debit method",
            ));
        }
        acct.wallet.funding = mode;
        let answer = acct.view();
        self.finish(tx, acct, key, answer).await
    }
}
