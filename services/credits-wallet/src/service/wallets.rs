//! Wallet use cases: OpenWallet (C8 signup credits), GetWallet (with due expiries, C7), the
//! background sweep of one wallet, and ListLedgerEntries.

use chrono::{DateTime, Utc};
use runtime::{convert::Answer, idempotency::IdempotencyKey};
use serde_json::json;
use shared::{Currency, RatingRule, TierTable};

use super::{Begun, Wallets};
use crate::{
    account::Account,
    domain::{AutoTopUp, LotKind, Reminder},
    error::WalletError,
    model::{EntryKind, FundingMode, LedgerPage, WalletRecord, WalletView},
    store,
};

/// A new wallet.
pub struct OpenWallet {
    /// Id chosen by the caller.
    pub wallet_id: String,
    /// Currency of purchases.
    pub currency: Currency,
    /// C1 price list.
    pub pricing: TierTable,
    /// C2 rating.
    pub rating: RatingRule,
    /// C8 signup credits.
    pub signup_credits: i64,
    /// Their expiry.
    pub signup_expires_at: Option<DateTime<Utc>>,
}

impl Wallets {
    /// OpenWallet: idempotent; C8 signup credits.
    pub async fn open_wallet(
        &self,
        key: &IdempotencyKey,
        cmd: OpenWallet,
    ) -> Result<Answer<WalletView>, WalletError> {
        let mut tx = match self.begin::<WalletView>(key).await? {
            Begun::Replay(r) => return Self::replayed(r),
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        let record = WalletRecord {
            wallet_id: cmd.wallet_id.clone(),
            currency: cmd.currency,
            balance: 0,
            held: 0,
            debt: 0,
            ledger_seq: 0,
            funding: FundingMode::Prepaid,
            payment_method: String::new(),
            rating: cmd.rating,
            pricing: cmd.pricing,
            top_up: AutoTopUp::OFF,
            reminder: Reminder {
                threshold: None,
                armed: false,
            },
            created_at: now,
        };
        if !store::insert_wallet(&mut tx, &record).await? {
            return Err(WalletError::WalletExists(cmd.wallet_id));
        }
        let mut acct = Account::load(&mut tx, record, now).await?;
        if cmd.signup_credits > 0 {
            acct.grant(
                LotKind::Signup,
                cmd.signup_credits,
                cmd.signup_expires_at,
                EntryKind::Grant,
                format!("grant:{}", key.key()),
                "signup credits".into(),
            );
        }
        acct.event(
            "wallet.opened",
            json!({"wallet_id": cmd.wallet_id, "currency": cmd.currency.code(), "signup_credits": cmd.signup_credits}),
        );
        let answer = acct.view();
        self.finish(tx, acct, key, answer).await
    }

    /// GetWallet: the wallet after any due expiry (expired credits never count).
    pub async fn get_wallet(&self, wallet_id: &str) -> Result<WalletView, WalletError> {
        let mut tx = self.db.begin_write().await?;
        let acct = Account::lock(&mut tx, &self.db, wallet_id, self.now()).await?;
        let response = acct.view();
        if acct.has_changes() {
            acct.save(&mut tx).await?;
            tx.commit().await?;
            self.platform.outbox.poke();
        } else {
            tx.rollback().await?;
        }
        Ok(response)
    }

    /// Runs due expiries and hold lapses of one wallet (the background sweep).
    pub async fn sweep_wallet(&self, wallet_id: &str) -> Result<(), WalletError> {
        self.get_wallet(wallet_id).await.map(|_| ())
    }

    /// ListLedgerEntries.
    pub async fn ledger(
        &self,
        wallet_id: &str,
        after_seq: i64,
        page_size: i64,
    ) -> Result<LedgerPage, WalletError> {
        // Existence first, so an unknown wallet is NOT_FOUND rather than an empty page.
        self.read_account(wallet_id).await?;
        let mut entries =
            store::entries_after(&self.db, wallet_id, after_seq, page_size + 1).await?;
        let more = entries.len() as i64 > page_size;
        entries.truncate(usize::try_from(page_size).unwrap_or(0));
        Ok(LedgerPage { entries, more })
    }
}
