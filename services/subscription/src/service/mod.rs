//! The use cases: each runs in write transactions on the locked subscription, with its
//! idempotency key, history and outbox events in the same transaction.
//!
//! A card payment never happens inside a transaction. Subscribe and an immediate change with a
//! card run in three steps: (1) a transaction marks the subscription (`incomplete`, or a
//! `pending_op` naming the change) so nothing else changes it meanwhile; (2) the gateway is
//! called with a key derived from the subscription, so a retry never charges twice; (3) a second
//! transaction applies the outcome and records the response under the request's key. A timeout
//! leaves the mark and the payment (`payment_op`, with the gateway key): a retry with the same
//! key resumes it, and when the client never retries the jobs finish it after
//! [`RECONCILE_AFTER_SECONDS`] with the same gateway key. Either way the outcome is applied
//! once, under the subscription's lock, and a later retry of the request gets that outcome.
//!
//! Direct debits (a mandate on file) are charged like cards and give access and sending at once
//! (as the wallet's on-demand debits do, C9), but their invoice is `pending` until the bank
//! settles it; a returned debit reopens the invoice, makes the subscription past due and
//! refuses sending until it is paid (S18: money not received), e.g. after UpdatePaymentMethod.

mod catalog;
mod changes;
mod collection;
mod contacts;
mod invoices;
mod payment;
mod preview_token;
mod reconciliation;
mod renewal;
mod sending;
mod signup;

pub use changes::PREVIEW_TTL_SECONDS;
pub use payment::StripeEvents;
pub use reconciliation::RECONCILE_AFTER_SECONDS;
pub use renewal::{RenewalBatch, WALLET_WAIT_RETRY_SECONDS};
pub use runtime::convert::Answer;
pub use signup::{PaymentChoice, SubscribeCmd};

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError},
};

use chrono::{DateTime, Utc};
use runtime::{
    Platform,
    db::Db,
    idempotency::{Claimed, IdempotencyKey},
};
use shared::PaymentGateway;
use sqlx::{Any, AnyConnection, Transaction};
use tonic::Status;

use crate::{
    convert::Reply,
    domain::{self, Plan},
    error::SubError,
    model::{SubscriptionRecord, SubscriptionView},
    store,
    wallet::Wallet,
};

/// Who makes a request, as recorded in the history (S5): `user:<id>` or `service:<token>`.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// The system itself (renewals, trial ends).
pub fn system() -> Actor {
    Actor("system".into())
}

/// How a mutating request starts: answered before (the recorded answer, or refusal), or fresh
/// in a write transaction that has claimed its key.
enum Begun<T: Reply> {
    Replay(Result<Answer<T>, SubError>),
    Fresh(Transaction<'static, Any>),
}

/// Published plan versions never change (a publish makes a new version), so a version read
/// once is kept: renewal batches price hundreds of subscriptions on a handful of plans.
type PlanCache = Arc<std::sync::Mutex<HashMap<(String, u32), Plan>>>;

/// The service's use cases.
#[derive(Clone)]
pub struct Subscriptions {
    db: Db,
    platform: Platform,
    gateway: Arc<dyn PaymentGateway>,
    wallet: Option<Wallet>,
    plans: PlanCache,
    /// The key preview tokens are signed with (read once from the database, where the
    /// migration generated it, so every replica and restart shares it).
    token_key: Arc<tokio::sync::OnceCell<Vec<u8>>>,
}

impl Subscriptions {
    /// The use cases on `platform`, paying through `gateway`, granting credits through `wallet`.
    pub fn new(
        platform: Platform,
        gateway: Arc<dyn PaymentGateway>,
        wallet: Option<impl Into<Wallet>>,
    ) -> Self {
        Self {
            db: platform.db.clone(),
            platform,
            gateway,
            wallet: wallet.map(Into::into),
            plans: PlanCache::default(),
            token_key: Arc::default(),
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.platform.clock.now()
    }

    async fn begin<T: Reply>(&self, key: &IdempotencyKey) -> Result<Begun<T>, SubError> {
        let mut tx = self.db.begin_write().await?;
        match key.claim::<T::Message>(&mut tx).await? {
            Claimed::Replay(r) => Ok(Begun::Replay(
                r.map(Answer::Replayed).map_err(SubError::Replayed),
            )),
            Claimed::New => Ok(Begun::Fresh(tx)),
        }
    }

    /// Records `answer` (as its message) under `key` and commits.
    async fn finish<T: Reply>(
        &self,
        mut tx: Transaction<'static, Any>,
        key: &IdempotencyKey,
        answer: T,
    ) -> Result<Answer<T>, SubError> {
        key.record(&mut tx, &answer.to_message(), self.now().timestamp_micros())
            .await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(Answer::Fresh(answer))
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Any>, SubError> {
        Ok(self.db.connection().await?)
    }

    async fn plan(
        &self,
        conn: &mut AnyConnection,
        plan_id: &str,
        version: Option<u32>,
    ) -> Result<Plan, SubError> {
        if let Some(v) = version {
            let cached = self
                .plans
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&(plan_id.to_string(), v))
                .cloned();
            if let Some(plan) = cached {
                return Ok(plan);
            }
        }
        let plan = store::plan(conn, plan_id, version)
            .await?
            .map(|(p, _)| p)
            .ok_or_else(|| {
                SubError::PlanNotFound(match version {
                    Some(v) => format!("{} version {v}", shared::limits::quoted(plan_id)),
                    None => shared::limits::quoted(plan_id).to_string(),
                })
            })?;
        self.plans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((plan.plan_id.clone(), plan.version), plan.clone());
        Ok(plan)
    }

    async fn view(
        &self,
        conn: &mut AnyConnection,
        sub: &SubscriptionRecord,
    ) -> Result<SubscriptionView, SubError> {
        let verified = store::account(conn, &sub.account_id).await?.verified;
        let plan = self
            .plan(conn, &sub.plan_id, Some(sub.plan_version))
            .await?;
        let recurring_price = domain::recurring_price(&plan, &sub.selection)?;
        let history = store::history(conn, &sub.subscription_id).await?;
        Ok(SubscriptionView {
            sub: sub.clone(),
            verified,
            recurring_price,
            history,
        })
    }

    /// Records a declined payment under the request's key (a retry gets the same refusal).
    async fn refuse<R>(
        &self,
        mut tx: Transaction<'static, Any>,
        key: &IdempotencyKey,
        reason: String,
    ) -> Result<R, SubError> {
        let err = SubError::PaymentDeclined(reason);
        key.record_status(
            &mut tx,
            &Status::from(err.clone_refusal()),
            self.now().timestamp_micros(),
        )
        .await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Err(err)
    }

    /// A plan version, from the cache or read on a pooled connection.
    async fn plan_version(&self, plan_id: &str, version: u32) -> Result<Plan, SubError> {
        let cached = self
            .plans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(plan_id.to_string(), version))
            .cloned();
        match cached {
            Some(plan) => Ok(plan),
            None => {
                let mut conn = self.conn().await?;
                self.plan(&mut conn, plan_id, Some(version)).await
            }
        }
    }
}

impl SubError {
    /// A copy of a recorded refusal.
    fn clone_refusal(&self) -> SubError {
        match self {
            SubError::PaymentDeclined(r) => SubError::PaymentDeclined(r.clone()),
            other => SubError::Precondition(other.to_string()),
        }
    }
}
