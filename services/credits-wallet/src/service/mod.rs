//! The wallet's use cases: each runs in write transactions on the locked wallet, with its
//! idempotency key and outbox events in the same transaction.
//!
//! A payment never happens inside a transaction. A send that must buy credits (C5 shortfall,
//! C9 on demand) or a purchase runs in three steps:
//! 1. a transaction records the purchase as `processing`, tied to the request's idempotency key;
//! 2. the gateway is called with the purchase id as its idempotency key;
//! 3. a second transaction applies the outcome: grants the credits and, for a send, debits them,
//!    recording the response under the request's key.
//!
//! A crash or a gateway timeout between the steps leaves a `processing` purchase: a retry with
//! the same key resumes it (the gateway returns the first outcome for the same purchase id), and
//! the reconciler ([`crate::jobs`]) finishes it otherwise. Credits are never granted twice (the
//! purchase's status moves once, under the wallet's lock) and a paid purchase is never lost.

//!
//! The families, one file each: [`wallets`] (open, read, sweep, ledger), [`grants`] (grants,
//! adjustments, transfers), [`settings`] (auto top-up, reminder, funding mode), [`purchases`]
//! (purchases, the gateway, reconciliation, Stripe's webhooks) and [`sends`] (rating, charges,
//! holds, captures). A send applies [`send_rules`] to its locked account, alone or in a batch
//! of [`group_commit`], the front a send use case tries first when the caller has one.
//! Dependencies only point down this list: `sends` -> `group_commit` -> `send_rules`,
//! `purchases` -> this module; none points back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use chrono::{DateTime, Utc};
use runtime::{
    Platform,
    convert::{Answer, Reply},
    db::Db,
    idempotency::{Claimed, IdempotencyKey},
};
use shared::PaymentGateway;
use sqlx::{Any, Transaction};
use tonic::Status;

use crate::{account::Account, error::WalletError, store};

pub mod grants;
pub mod group_commit;
pub mod purchases;
pub mod send_rules;
pub mod sends;
pub mod settings;
pub mod wallets;

/// The wallet service's use cases.
#[derive(Clone)]
pub struct Wallets {
    pub(crate) db: Db,
    pub(crate) platform: Platform,
    gateway: Arc<dyn PaymentGateway>,
    paying_now: PayingNow,
}

/// The purchases a request of this process is paying right now (its gateway call under way),
/// each with the instant it began. Shared by every clone of a [`Wallets`].
#[derive(Clone, Default)]
struct PayingNow(Arc<Mutex<HashMap<String, Instant>>>);

/// Removes its purchase from [`PayingNow`] when the request's gateway call ends, however it
/// ends (an answer, an error, or the request dropped at its deadline).
pub(super) struct Paying {
    paying_now: PayingNow,
    purchase_id: String,
}

impl PayingNow {
    fn start(&self, purchase_id: &str) -> Paying {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(purchase_id.to_string(), Instant::now());
        Paying {
            paying_now: self.clone(),
            purchase_id: purchase_id.to_string(),
        }
    }

    /// Whether a request began paying `purchase_id` less than `budget` ago and is still at it.
    fn within(&self, purchase_id: &str, budget: std::time::Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(purchase_id)
            .is_some_and(|began| began.elapsed() < budget)
    }
}

impl Drop for Paying {
    fn drop(&mut self) {
        self.paying_now
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.purchase_id);
    }
}

/// A mutation begun: answered before (the recorded answer or refusal), or its key claimed in
/// a fresh write transaction.
enum Begun<T: Reply> {
    Replay(Result<Answer<T>, Status>),
    Fresh(Transaction<'static, Any>),
}

/// Like [`Begun`] for a send, whose answer is recorded encoded ([`SendAnswer`]).
enum BegunSend {
    Replay(Result<Vec<u8>, Status>),
    Fresh(Transaction<'static, Any>),
}

/// A claimed key and the wallet locked in its transaction, due housekeeping applied.
enum Locked<T: Reply> {
    Replay(Result<Answer<T>, Status>),
    Fresh(Transaction<'static, Any>, Box<Account>),
}

impl Wallets {
    /// The use cases on `platform`, paying through `gateway`.
    pub fn new(platform: Platform, gateway: Arc<dyn PaymentGateway>) -> Self {
        Self {
            db: platform.db.clone(),
            platform,
            gateway,
            paying_now: PayingNow::default(),
        }
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.platform.clock.now()
    }

    /// The start of every mutation answering a `T`: claim `key` (or find the answer it
    /// recorded, replayed).
    async fn begin<T: Reply>(&self, key: &IdempotencyKey) -> Result<Begun<T>, WalletError> {
        let mut tx = self.db.begin_write().await?;
        match key.claim::<T::Message>(&mut tx).await? {
            Claimed::Replay(r) => Ok(Begun::Replay(r.map(Answer::Replayed))),
            Claimed::New => Ok(Begun::Fresh(tx)),
        }
    }

    /// The start of every single-wallet mutation: claim `key`, lock `wallet_id`, and remove what
    /// is due (expired lots, lapsed holds) so expired credits never count.
    async fn begin_on<T: Reply>(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
    ) -> Result<Locked<T>, WalletError> {
        let mut tx = match self.begin::<T>(key).await? {
            Begun::Replay(r) => return Ok(Locked::Replay(r)),
            Begun::Fresh(tx) => tx,
        };
        let acct = Account::lock(&mut tx, &self.db, wallet_id, self.now()).await?;
        Ok(Locked::Fresh(tx, Box::new(acct)))
    }

    /// Like [`Wallets::begin`] for a send, whose answer is recorded encoded.
    async fn begin_bytes(&self, key: &IdempotencyKey) -> Result<BegunSend, WalletError> {
        let mut tx = self.db.begin_write().await?;
        match key.claim_bytes(&mut tx).await? {
            Claimed::Replay(r) => Ok(BegunSend::Replay(r)),
            Claimed::New => Ok(BegunSend::Fresh(tx)),
        }
    }

    /// Saves `acct`, records `answer`'s message under `key`, commits.
    async fn finish<T: Reply>(
        &self,
        mut tx: Transaction<'static, Any>,
        acct: Account,
        key: &IdempotencyKey,
        answer: T,
    ) -> Result<Answer<T>, WalletError> {
        acct.save(&mut tx).await?;
        key.record(&mut tx, &answer.to_message(), self.now().timestamp_micros())
            .await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(Answer::Fresh(answer))
    }

    /// Saves what happened before the refusal (expiries), records the refusal under `key` so a
    /// retry gets the same answer, commits, and returns the refusal.
    async fn refuse<R>(
        &self,
        mut tx: Transaction<'static, Any>,
        before: Account,
        key: &IdempotencyKey,
        err: WalletError,
    ) -> Result<R, WalletError> {
        before.save(&mut tx).await?;
        if err.is_recorded_refusal() {
            let status = Status::from(err.clone_refusal());
            key.record_status(&mut tx, &status, self.now().timestamp_micros())
                .await?;
        }
        tx.commit().await?;
        self.platform.outbox.poke();
        Err(err)
    }

    fn replayed<R>(r: Result<R, Status>) -> Result<R, WalletError> {
        r.map_err(WalletError::Replayed)
    }

    async fn read_account(&self, wallet_id: &str) -> Result<Account, WalletError> {
        let mut conn = self.db.connection().await?;
        let record = store::read_wallet(&mut conn, wallet_id)
            .await?
            .ok_or_else(|| WalletError::WalletNotFound(wallet_id.to_string()))?;
        Account::load(&mut conn, record, self.now()).await
    }
}

impl WalletError {
    /// A copy of a recorded refusal (the variants [`WalletError::is_recorded_refusal`] names).
    pub(crate) fn clone_refusal(&self) -> WalletError {
        match self {
            WalletError::Insufficient { shortfall, top_up } => WalletError::Insufficient {
                shortfall: *shortfall,
                top_up: *top_up,
            },
            WalletError::PaymentDeclined(r) => WalletError::PaymentDeclined(r.clone()),
            WalletError::Debt(d) => WalletError::Debt(*d),
            other => WalletError::Precondition(other.to_string()),
        }
    }
}
