//! Credits given or moved without a payment: GrantCredits (C7, C8), AdjustCredits (an
//! operator's correction) and TransferCredits (two wallets in one transaction).

use chrono::{DateTime, Utc};
use runtime::{convert::Answer, idempotency::IdempotencyKey};

use super::{Begun, Locked, Wallets};
use crate::{
    account::Account,
    domain::LotKind,
    error::WalletError,
    model::{EntryKind, Transferred, WalletChanged},
};

impl Wallets {
    /// GrantCredits (C7, C8).
    pub async fn grant(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
        kind: LotKind,
        credits: i64,
        expires_at: Option<DateTime<Utc>>,
        reference: &str,
    ) -> Result<Answer<WalletChanged>, WalletError> {
        let (tx, mut acct) = match self.begin_on::<WalletChanged>(key, wallet_id).await? {
            Locked::Replay(r) => return Self::replayed(r),
            Locked::Fresh(tx, acct) => (tx, *acct),
        };
        if expires_at.is_some_and(|e| e <= acct.now) {
            return Err(WalletError::invalid("expires_at", "must be in the future"));
        }
        let reference = if reference.is_empty() {
            format!("grant:{}", key.key())
        } else {
            reference.to_string()
        };
        let (_, entry) = acct.grant(
            kind,
            credits,
            expires_at,
            EntryKind::Grant,
            reference,
            format!("{} credits", kind.as_str()),
        );
        let answer = WalletChanged {
            entry,
            wallet: acct.view(),
        };
        self.finish(tx, acct, key, answer).await
    }

    /// AdjustCredits: an operator's correction with a reason.
    pub async fn adjust(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
        delta: i64,
        reason: &str,
    ) -> Result<Answer<WalletChanged>, WalletError> {
        let (tx, mut acct) = match self.begin_on::<WalletChanged>(key, wallet_id).await? {
            Locked::Replay(r) => return Self::replayed(r),
            Locked::Fresh(tx, acct) => (tx, *acct),
        };
        let before = acct.clone();
        let reference = format!("adjustment:{}", key.key());
        let entry = if delta > 0 {
            acct.grant(
                LotKind::Adjustment,
                delta,
                None,
                EntryKind::Adjustment,
                reference,
                reason.to_string(),
            )
            .1
        } else {
            match acct.debit(-delta, EntryKind::Adjustment, reference, reason.to_string()) {
                Ok(e) => e,
                Err(shortfall) => {
                    let err = WalletError::Insufficient {
                        shortfall,
                        top_up: None,
                    };
                    return self.refuse(tx, before, key, err).await;
                }
            }
        };
        let answer = WalletChanged {
            entry,
            wallet: acct.view(),
        };
        self.finish(tx, acct, key, answer).await
    }

    /// TransferCredits: both wallets locked in id order (so two opposite transfers cannot
    /// deadlock), debit and grant in one transaction.
    pub async fn transfer(
        &self,
        key: &IdempotencyKey,
        from: &str,
        to: &str,
        credits: i64,
        reason: &str,
    ) -> Result<Answer<Transferred>, WalletError> {
        let mut tx = match self.begin::<Transferred>(key).await? {
            Begun::Replay(r) => return Self::replayed(r),
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        let (first, second) = if from < to { (from, to) } else { (to, from) };
        let a = Account::lock(&mut tx, &self.db, first, now).await?;
        let b = Account::lock(&mut tx, &self.db, second, now).await?;
        let (mut source, mut target) = if from < to { (a, b) } else { (b, a) };
        let before = source.clone();
        if source.wallet.debt > 0 {
            let debt = source.wallet.debt;
            target.save(&mut tx).await?;
            return self.refuse(tx, before, key, WalletError::Debt(debt)).await;
        }
        let reference = format!("transfer:{}", key.key());
        let expires_at = match source.debit_for_transfer(
            credits,
            reference.clone(),
            format!("to {to}: {reason}"),
        ) {
            Ok(e) => e,
            Err(shortfall) => {
                target.save(&mut tx).await?;
                let err = WalletError::Insufficient {
                    shortfall,
                    top_up: None,
                };
                return self.refuse(tx, before, key, err).await;
            }
        };
        target.grant(
            LotKind::Adjustment,
            credits,
            expires_at,
            EntryKind::Transfer,
            reference,
            format!("from {from}: {reason}"),
        );
        let answer = Transferred {
            credits,
            from: source.view(),
            to: target.view(),
        };
        target.save(&mut tx).await?;
        self.finish(tx, source, key, answer).await
    }
}
