//! Purchases (C1) and what finishes them: PurchaseCredits and QuoteCreditPurchase, the gateway
//! call, the reconciler's step for one open purchase, Stripe's webhooks (payment outcomes,
//! refunds and disputes), and the automatic purchase after a debit (C4).
//!
//! A payment never happens inside a transaction (see [`super`]): a purchase is recorded
//! `processing`, paid, then its outcome applied under the wallet's lock, each status once.

use chrono::{DateTime, Duration, Utc};
use runtime::{convert::Answer, idempotency::IdempotencyKey, payments::PaymentProvider};
use serde_json::json;
use shared::{ChargeOutcome, ChargeRequest, ChargeStatus, GatewayError, Money, TierTable};
use sqlx::{Any, Transaction};

use super::{Locked, Paying, Wallets};
use crate::{
    account::Account,
    domain::{self, LotKind},
    error::WalletError,
    model::{CreditQuote, EntryKind, FundingMode, PurchaseRecord, PurchaseStatus, PurchaseTrigger},
    store,
};

/// What a gateway call came to.
#[derive(Debug, Clone)]
pub enum PaymentOutcome {
    /// Paid.
    Paid,
    /// A direct debit submitted; settles later.
    Pending,
    /// Refused, with the reason shown to the caller.
    Declined(String),
    /// Not known (timeout): left `processing` for a retry or the reconciler.
    Unknown,
}

/// What a request may need, beyond the gateway's own limit, to apply a payment's outcome.
const PAYMENT_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

impl Wallets {
    /// QuoteCreditPurchase (C1).
    pub async fn quote(&self, wallet_id: &str, credits: i64) -> Result<CreditQuote, WalletError> {
        let acct = self.read_account(wallet_id).await?;
        let amount = price(&acct.wallet.pricing, credits)?;
        let unit_price = acct
            .wallet
            .pricing
            .unit_price_at(u64::try_from(credits).unwrap_or(0))
            .map_err(|e| WalletError::invalid("credits", e.to_string()))?;
        Ok(CreditQuote {
            credits,
            amount,
            unit_price,
        })
    }

    /// PurchaseCredits (C1): card purchases grant at once, direct debits on settlement, a
    /// decline grants nothing and says why.
    pub async fn purchase(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
        credits: i64,
        payment_method: &str,
        expires_at: Option<DateTime<Utc>>,
        expected: Option<Money>,
    ) -> Result<Answer<PurchaseRecord>, WalletError> {
        let (mut tx, acct) = match self.begin_on::<PurchaseRecord>(key, wallet_id).await? {
            Locked::Replay(r) => return Self::replayed(r),
            Locked::Fresh(tx, acct) => (tx, *acct),
        };
        let purchase = match store::purchase_by_origin(&mut tx, key.key()).await? {
            Some(p) => p,
            None => {
                let method = if payment_method.is_empty() {
                    acct.wallet.payment_method.clone()
                } else {
                    payment_method.to_string()
                };
                if method.is_empty() {
                    return Err(WalletError::invalid(
                        "payment_method",
                        "no payment method given and none on file",
                    ));
                }
                if expires_at.is_some_and(|e| e <= acct.now) {
                    return Err(WalletError::invalid("expires_at", "must be in the future"));
                }
                let amount = price(&acct.wallet.pricing, credits)?;
                if let Some(expected) = expected
                    && expected != amount
                {
                    return Err(WalletError::Precondition(format!(
                        "the price of {credits} credits is {amount}, not the expected {expected}; quote again"
                    )));
                }
                let p = new_purchase(
                    &acct,
                    Some(key.key()),
                    PurchaseTrigger::Manual,
                    credits,
                    amount,
                    method,
                    expires_at,
                );
                store::insert_purchase(&mut tx, &p, acct.now).await?;
                p
            }
        };
        // From before the commit that shows the purchase to the reconciler.
        let paying = self.paying_for_request(&purchase);
        acct.save(&mut tx).await?;
        tx.commit().await?;

        let outcome = self.pay(&purchase).await;
        drop(paying);

        let (mut tx, mut acct) = match self.begin_on::<PurchaseRecord>(key, wallet_id).await? {
            Locked::Replay(r) => return Self::replayed(r),
            Locked::Fresh(tx, acct) => (tx, *acct),
        };
        let mut p = store::purchase(&mut tx, &purchase.purchase_id)
            .await?
            .ok_or_else(|| runtime::db::DbError::Corrupt("purchase vanished".into()))?;
        apply_outcome(&mut tx, &mut acct, &mut p, &outcome).await?;
        if p.status == PurchaseStatus::Processing {
            // Outcome unknown: answer without recording the key, so a retry resumes it.
            acct.save(&mut tx).await?;
            tx.commit().await?;
            self.platform.outbox.poke();
            return Ok(Answer::Fresh(p));
        }
        self.finish(tx, acct, key, p).await
    }

    /// Calls the gateway for `p` (its id is the gateway's idempotency key).
    pub(super) async fn pay(&self, p: &PurchaseRecord) -> PaymentOutcome {
        let request = ChargeRequest {
            idempotency_key: p.purchase_id.clone(),
            payment_method: p.payment_method.clone(),
            amount: p.amount,
            description: format!("{} credits for wallet {}", p.credits, p.wallet_id),
            requested_at: self.now(),
        };
        match self.gateway.charge(&request).await {
            Ok(ChargeOutcome::Succeeded { .. }) => PaymentOutcome::Paid,
            Ok(ChargeOutcome::Pending { .. }) => PaymentOutcome::Pending,
            Ok(ChargeOutcome::Declined { reason }) => PaymentOutcome::Declined(reason.to_string()),
            Err(GatewayError::Timeout) => {
                tracing::warn!(purchase = %p.purchase_id, "gateway timed out; outcome unknown, will reconcile");
                PaymentOutcome::Unknown
            }
            Err(e) => PaymentOutcome::Declined(e.to_string()),
        }
    }

    /// Marks `p` as being paid by the request that recorded it (PurchaseCredits, or a send that
    /// buys credits) until the returned guard is dropped: meanwhile the reconciler leaves `p` to
    /// this request ([`Wallets::being_paid_by_its_request`]). Taken before the commit that
    /// records `p` and dropped once the request's gateway call has ended.
    pub(super) fn paying_for_request(&self, p: &PurchaseRecord) -> Paying {
        self.paying_now.start(&p.purchase_id)
    }

    /// How long a request may take to pay one purchase: the gateway's time limit (Stripe's
    /// per-call limit; with the simulator, which answers at once, the request deadline) plus a
    /// margin.
    fn payment_budget(&self) -> std::time::Duration {
        let config = &self.platform.config;
        let gateway = match (config.payment_provider, &config.stripe) {
            (PaymentProvider::Stripe, Some(stripe)) => stripe.timeout,
            _ => config.request_timeout,
        };
        gateway + PAYMENT_MARGIN
    }

    /// Whether a request of this process is still paying `p` (its gateway call began less than
    /// [`Wallets::payment_budget`] ago and has not ended). The reconciler leaves such a purchase
    /// to its request rather than call the gateway a second time for it: a provider that
    /// ignored the idempotency key (localstripe does) would charge twice; the first outcome is
    /// the request's to apply, and if it stays unknown (a timeout) the reconciler finishes the
    /// purchase once the call has ended. A request of another replica is not seen: there the
    /// provider's idempotency key is what keeps the charge single, as it always did.
    fn being_paid_by_its_request(&self, p: &PurchaseRecord) -> bool {
        self.paying_now
            .within(&p.purchase_id, self.payment_budget())
    }

    /// Drives an automatic purchase to its outcome after the request that recorded it.
    pub(crate) fn drive_in_background(&self, p: PurchaseRecord) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.reconcile_purchase(&p.purchase_id).await {
                tracing::warn!(purchase = %p.purchase_id, error = %e, "automatic purchase not finished; the reconciler retries");
            }
        });
    }

    /// Whether a `processing` purchase that pays for a send (C5, C9) is still its request's to
    /// finish. The request grants the credits and debits them in one transaction; if the
    /// reconciler granted them first, another send on the wallet could spend them in between
    /// and the send that paid for them would be refused for lack of credits (found by the
    /// crash test: a restart's first reconciliation racing the callers' retries). So the
    /// reconciler leaves such a purchase alone for twice the request deadline (service clock),
    /// long enough for the request, or a retry after a crash, to finish it; after that it grants
    /// the credits so a paid purchase is never lost.
    fn left_to_its_request(&self, p: &PurchaseRecord) -> bool {
        let grace =
            Duration::from_std(self.platform.config.request_timeout * 2).unwrap_or(Duration::MAX);
        funds_a_send(p) && self.now() - p.created_at < grace
    }

    /// Finishes one open purchase: asks the gateway (same idempotency key) and applies the
    /// outcome, or applies a direct debit's settlement or return.
    pub async fn reconcile_purchase(&self, purchase_id: &str) -> Result<(), WalletError> {
        let p = {
            let mut conn = self.db.connection().await?;
            match store::purchase(&mut conn, purchase_id).await? {
                Some(p) => p,
                None => return Ok(()),
            }
        };
        let outcome = match p.status {
            PurchaseStatus::Processing
                if self.left_to_its_request(&p) || self.being_paid_by_its_request(&p) =>
            {
                return Ok(());
            }
            PurchaseStatus::Processing => self.pay(&p).await,
            PurchaseStatus::PendingSettlement => {
                match self.gateway.charge_status(&p.purchase_id).await {
                    Ok(Some(record)) => match record.status {
                        ChargeStatus::Succeeded => PaymentOutcome::Paid,
                        ChargeStatus::Returned => {
                            PaymentOutcome::Declined("direct debit returned".into())
                        }
                        ChargeStatus::Declined(reason) => {
                            PaymentOutcome::Declined(reason.to_string())
                        }
                        ChargeStatus::Pending => return Ok(()),
                    },
                    Ok(None) => PaymentOutcome::Declined(
                        "the gateway has no record of this direct debit".into(),
                    ),
                    Err(_) => return Ok(()),
                }
            }
            _ => return Ok(()),
        };
        if matches!(outcome, PaymentOutcome::Unknown) {
            return Ok(());
        }
        let mut tx = self.db.begin_write().await?;
        let (mut acct, mut p) = self.lock_purchase(&mut tx, &p).await?;
        apply_outcome(&mut tx, &mut acct, &mut p, &outcome).await?;
        acct.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(())
    }

    /// Applies a verified Stripe webhook event exactly once: its id is recorded in the
    /// transaction that applies it (`false`: delivered before, nothing changes).
    ///
    /// - `payment_intent.succeeded` / `.payment_failed` for one of our purchases (the
    ///   PaymentIntent's metadata `billing_key` is the purchase id) move that purchase as the
    ///   reconciler would, under the wallet's lock, each status once; a purchase still being
    ///   finished by its own request (a send it pays for) is left to it.
    /// - `charge.refunded` / `charge.dispute.created` carry a Charge or a Dispute, which do not
    ///   carry the PaymentIntent's metadata and the wallet does not store Stripe's ids: the
    ///   PaymentIntent they name is retrieved from the gateway (one `GET`, before the
    ///   transaction; a failure answers an error and Stripe delivers again) for its
    ///   `billing_key`. A succeeded purchase whose whole price came back
    ///   ([`Reversal::is_whole`](runtime::stripe_webhook::Reversal::is_whole)) is `returned`: its credits clawed back exactly as for a
    ///   returned direct debit (C9: own lot first, debt for what was spent), with
    ///   `wallet.payment_returned` whose reason is `refunded` or `disputed`. A part of the price
    ///   coming back moves no credits and emits `wallet.payment_partly_reversed` for an operator.
    ///   A purchase already returned or failed is left as it is (a dispute after a full refund
    ///   takes nothing twice); one with no outcome yet is not applied (an error, so Stripe
    ///   delivers again once the reconciler has finished it).
    /// - `charge.dispute.closed` in our favour (`won`, or an inquiry `warning_closed`), for a
    ///   purchase a whole dispute returned: its credits are granted again in a new lot (a debt
    ///   the dispute left is paid first), the purchase is `succeeded` again, and
    ///   `wallet.payment_reinstated` is emitted. A dispute of a part, or one that took nothing
    ///   (a purchase refunded first), gives nothing back; a whole one whose creation is not
    ///   applied yet is an error, so Stripe delivers the closing again after it. A `lost`
    ///   dispute changes nothing: its creation already took the credits back.
    ///
    /// Events for nothing of ours are recorded and ignored.
    pub async fn apply_stripe_event(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
    ) -> anyhow::Result<bool> {
        if let Some(reversal) = &event.reversal {
            return self.apply_reversal(event, reversal).await;
        }
        if let Some(reinstatement) = &event.reinstatement {
            return self.apply_reinstatement(event, reinstatement).await;
        }
        let mut tx = self.db.begin_write().await?;
        let received = chrono::Utc::now();
        if !runtime::stripe_webhook::record_event(&mut tx, &event.id, &event.kind, received).await?
        {
            tx.rollback().await?;
            return Ok(false);
        }
        let (purchase, outcome) = match event.final_payment() {
            Some((key, declined)) => (
                store::purchase(&mut tx, key).await?,
                Some(declined.map_or(PaymentOutcome::Paid, PaymentOutcome::Declined)),
            ),
            None => (None, None),
        };
        let (Some(p), Some(outcome)) = (purchase, outcome) else {
            tx.commit().await?;
            return Ok(true);
        };
        if p.status == PurchaseStatus::Processing && self.left_to_its_request(&p) {
            tracing::info!(purchase = %p.purchase_id, event = %event.id, "Stripe event for a purchase its request is finishing; left to it");
            tx.commit().await?;
            return Ok(true);
        }
        let (mut acct, mut p) = self.lock_purchase(&mut tx, &p).await?;
        apply_outcome(&mut tx, &mut acct, &mut p, &outcome).await?;
        acct.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(true)
    }

    /// `charge.refunded` and `charge.dispute.created` (see [`Wallets::apply_stripe_event`]).
    async fn apply_reversal(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
        reversal: &runtime::stripe_webhook::Reversal,
    ) -> anyhow::Result<bool> {
        let (mut tx, p) = match self
            .charge_event(event, reversal.payment_intent.as_deref())
            .await?
        {
            ChargeEvent::Seen => return Ok(false),
            ChargeEvent::NotOurs => return Ok(true),
            ChargeEvent::Purchase(tx, p) => (tx, *p),
        };
        match p.status {
            PurchaseStatus::Succeeded => {}
            PurchaseStatus::Returned | PurchaseStatus::Failed => {
                tracing::info!(purchase = %p.purchase_id, event = %event.id, status = p.status.as_str(), "Stripe refund or dispute for a purchase whose credits are already gone; nothing to take back");
                tx.commit().await?;
                return Ok(true);
            }
            PurchaseStatus::Processing | PurchaseStatus::PendingSettlement => {
                tx.rollback().await?;
                anyhow::bail!(
                    "purchase {} has no final outcome yet; {} is applied once it has",
                    p.purchase_id,
                    event.id
                );
            }
        }
        let (mut acct, mut p) = self.lock_purchase(&mut tx, &p).await?;
        apply_reversal(&mut tx, &mut acct, &mut p, reversal).await?;
        acct.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(true)
    }

    /// `charge.dispute.closed` in our favour (see [`Wallets::apply_stripe_event`]).
    async fn apply_reinstatement(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
        reinstatement: &runtime::stripe_webhook::Reinstatement,
    ) -> anyhow::Result<bool> {
        let (mut tx, p) = match self
            .charge_event(event, reinstatement.payment_intent.as_deref())
            .await?
        {
            ChargeEvent::Seen => return Ok(false),
            ChargeEvent::NotOurs => return Ok(true),
            ChargeEvent::Purchase(tx, p) => (tx, *p),
        };
        let whole = reinstatement.is_whole(price_minor(&p)?);
        if whole && p.status == PurchaseStatus::Succeeded {
            // The dispute's creation, which took the credits back, is not applied yet (Stripe
            // does not promise order): not recorded, so Stripe delivers this again after it.
            tx.rollback().await?;
            anyhow::bail!(
                "purchase {}: the dispute closed by {} has not been applied yet",
                p.purchase_id,
                event.id
            );
        }
        if !(whole && returned_by_dispute(&p)) {
            tracing::info!(purchase = %p.purchase_id, event = %event.id, status = p.status.as_str(), "Stripe dispute closed in our favour for a purchase it took nothing from; nothing to give back");
            tx.commit().await?;
            return Ok(true);
        }
        let (mut acct, mut p) = self.lock_purchase(&mut tx, &p).await?;
        reinstate(&mut tx, &mut acct, &mut p).await?;
        acct.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(true)
    }

    /// The transaction that records a charge-level event (a refund, a dispute) and the purchase
    /// the event's PaymentIntent paid for ([`runtime::stripe_webhook::begin_charge_event`]).
    async fn charge_event(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
        payment_intent: Option<&str>,
    ) -> anyhow::Result<ChargeEvent> {
        let Some((mut tx, key)) = runtime::stripe_webhook::begin_charge_event(
            &self.db,
            self.gateway.as_ref(),
            event,
            payment_intent,
        )
        .await?
        else {
            return Ok(ChargeEvent::Seen);
        };
        let purchase = match &key {
            Some(key) => store::purchase(&mut tx, key).await?,
            None => None,
        };
        match purchase {
            Some(p) => Ok(ChargeEvent::Purchase(tx, Box::new(p))),
            None => {
                tracing::info!(event = %event.id, payment_intent = ?payment_intent, "Stripe refund or dispute for no purchase of this wallet; recorded and ignored");
                tx.commit().await?;
                Ok(ChargeEvent::NotOurs)
            }
        }
    }

    /// `p`'s wallet locked (due housekeeping applied) and `p` read again under that lock.
    async fn lock_purchase(
        &self,
        tx: &mut Transaction<'static, Any>,
        p: &PurchaseRecord,
    ) -> Result<(Account, PurchaseRecord), WalletError> {
        let acct = Account::lock(tx, &self.db, &p.wallet_id, self.now()).await?;
        let p = store::purchase(tx, &p.purchase_id)
            .await?
            .ok_or_else(|| runtime::db::DbError::Corrupt("purchase vanished".into()))?;
        Ok((acct, p))
    }
}

/// A charge-level Stripe event, read by [`Wallets::charge_event`].
enum ChargeEvent {
    /// Applied before (its id is recorded): nothing to do.
    Seen,
    /// About no purchase of this wallet: recorded, committed, nothing else to do.
    NotOurs,
    /// Recorded in this transaction, not committed yet; the purchase it is about.
    Purchase(Transaction<'static, Any>, Box<PurchaseRecord>),
}

/// The wallet's side of Stripe's webhooks (`runtime::stripe_webhook`).
pub struct StripeEvents(pub Wallets);

#[tonic::async_trait]
impl runtime::stripe_webhook::WebhookHandler for StripeEvents {
    async fn apply(&self, event: &runtime::stripe_webhook::WebhookEvent) -> anyhow::Result<bool> {
        self.0.apply_stripe_event(event).await
    }
}

pub(super) fn new_purchase(
    acct: &Account,
    origin_key: Option<&str>,
    trigger: PurchaseTrigger,
    credits: i64,
    amount: Money,
    payment_method: String,
    expires_at: Option<DateTime<Utc>>,
) -> PurchaseRecord {
    PurchaseRecord {
        purchase_id: format!("pur_{}", uuid::Uuid::now_v7().simple()),
        wallet_id: acct.wallet.wallet_id.clone(),
        origin_key: origin_key.map(str::to_string),
        trigger,
        credits,
        amount,
        payment_method,
        status: PurchaseStatus::Processing,
        failure_reason: String::new(),
        lot_id: None,
        expires_at,
        created_at: acct.now,
    }
}

/// The rounded price of `credits` from the wallet's volume tiers (C1).
pub(super) fn price(pricing: &TierTable, credits: i64) -> Result<Money, WalletError> {
    let quantity =
        u64::try_from(credits).map_err(|_| WalletError::invalid("credits", "must be positive"))?;
    pricing
        .price(quantity)
        .map(|m| m.round_to_minor_unit())
        .map_err(|e| WalletError::invalid("credits", e.to_string()))
}

/// Whether a purchase pays for a send now (see [`PurchaseTrigger::funds_a_send`]).
fn funds_a_send(p: &PurchaseRecord) -> bool {
    p.trigger.funds_a_send(p.origin_key.is_some())
}

/// Applies a gateway outcome to a purchase under the wallet's lock. Each status moves once:
/// an outcome for a purchase that already moved is ignored.
pub(super) async fn apply_outcome(
    tx: &mut Transaction<'static, Any>,
    acct: &mut Account,
    p: &mut PurchaseRecord,
    outcome: &PaymentOutcome,
) -> Result<(), WalletError> {
    let auto = matches!(
        p.trigger,
        PurchaseTrigger::AutoFixed | PurchaseTrigger::AutoShortfall
    );
    let (ok_event, failed_event) = if auto {
        ("wallet.top_up_succeeded", "wallet.top_up_failed")
    } else {
        ("wallet.purchase_succeeded", "wallet.purchase_failed")
    };
    let granted = p.lot_id.is_some();
    let payload = |p: &PurchaseRecord| {
        json!({
            "wallet_id": p.wallet_id, "purchase_id": p.purchase_id, "credits": p.credits,
            "amount": p.amount.amount_text(), "currency": p.amount.currency().code(),
            "trigger": p.trigger.as_str(), "reason": p.failure_reason,
        })
    };
    let grant = |acct: &mut Account, p: &mut PurchaseRecord| {
        let (lot_id, _) = acct.grant(
            LotKind::Purchased,
            p.credits,
            p.expires_at,
            EntryKind::Purchase,
            format!("purchase:{}", p.purchase_id),
            format!("{} credits for {}", p.credits, p.amount),
        );
        p.lot_id = Some(lot_id);
    };
    match (p.status, outcome) {
        (PurchaseStatus::Processing, PaymentOutcome::Paid) => {
            p.status = PurchaseStatus::Succeeded;
            grant(acct, p);
            acct.event(ok_event, payload(p));
        }
        (PurchaseStatus::Processing, PaymentOutcome::Pending) => {
            p.status = PurchaseStatus::PendingSettlement;
            if funds_a_send(p) {
                grant(acct, p);
            }
        }
        (PurchaseStatus::Processing, PaymentOutcome::Declined(reason)) => {
            p.status = PurchaseStatus::Failed;
            p.failure_reason = reason.clone();
            acct.event(failed_event, payload(p));
        }
        (PurchaseStatus::PendingSettlement, PaymentOutcome::Paid) => {
            p.status = PurchaseStatus::Succeeded;
            if !granted {
                grant(acct, p);
            }
            acct.event(ok_event, payload(p));
        }
        (PurchaseStatus::PendingSettlement, PaymentOutcome::Declined(reason)) => {
            p.status = if granted {
                PurchaseStatus::Returned
            } else {
                PurchaseStatus::Failed
            };
            p.failure_reason = reason.clone();
            if granted {
                acct.claw_back(
                    p.lot_id.as_deref(),
                    p.credits,
                    format!("purchase:{}", p.purchase_id),
                    "returned direct debit",
                );
            }
            acct.event("wallet.payment_returned", payload(p));
        }
        _ => return Ok(()),
    }
    store::update_purchase(tx, p, acct.now).await?;
    Ok(())
}

/// Applies a refund or dispute to a succeeded purchase under the wallet's lock: all its
/// credits back when the whole price came back, only an event otherwise
/// ([`Reversal::is_whole`](runtime::stripe_webhook::Reversal::is_whole)). A purchase that is not `succeeded` is left as it is.
async fn apply_reversal(
    tx: &mut Transaction<'static, Any>,
    acct: &mut Account,
    p: &mut PurchaseRecord,
    reversal: &runtime::stripe_webhook::Reversal,
) -> Result<(), WalletError> {
    if p.status != PurchaseStatus::Succeeded {
        return Ok(());
    }
    let reason = reversal.kind.as_str();
    if !reversal.is_whole(price_minor(p)?) {
        let reversed = Money::from_minor_units(reversal.amount, p.amount.currency());
        acct.event(
            "wallet.payment_partly_reversed",
            json!({
                "wallet_id": p.wallet_id, "purchase_id": p.purchase_id, "credits": p.credits,
                "amount": p.amount.amount_text(), "currency": p.amount.currency().code(),
                "trigger": p.trigger.as_str(), "reason": reason,
                "reversed_amount": reversed.amount_text(),
            }),
        );
        return Ok(());
    }
    p.status = PurchaseStatus::Returned;
    p.failure_reason = reason.to_string();
    acct.claw_back(
        p.lot_id.as_deref(),
        p.credits,
        format!("purchase:{}", p.purchase_id),
        match reversal.kind {
            runtime::stripe_webhook::ReversalKind::Refunded => "payment refunded",
            runtime::stripe_webhook::ReversalKind::Disputed => "payment disputed",
        },
    );
    acct.event(
        "wallet.payment_returned",
        json!({
            "wallet_id": p.wallet_id, "purchase_id": p.purchase_id, "credits": p.credits,
            "amount": p.amount.amount_text(), "currency": p.amount.currency().code(),
            "trigger": p.trigger.as_str(), "reason": reason,
        }),
    );
    store::update_purchase(tx, p, acct.now).await?;
    Ok(())
}

/// `p`'s price in minor units, as a refund or a dispute names amounts.
fn price_minor(p: &PurchaseRecord) -> Result<i64, runtime::db::DbError> {
    p.amount
        .to_minor_units()
        .map_err(|e| runtime::db::DbError::Corrupt(format!("purchase amount: {e}")))
}

/// Whether `p`'s credits were taken back by a dispute ([`apply_reversal`] records the reason).
fn returned_by_dispute(p: &PurchaseRecord) -> bool {
    p.status == PurchaseStatus::Returned
        && p.failure_reason == runtime::stripe_webhook::ReversalKind::Disputed.as_str()
}

/// A dispute of the whole of `p` closed in our favour: the credits its creation took back are
/// granted again, in a new lot with the purchase's expiry (a debt the dispute left is paid from
/// them first), and `p` is `succeeded` again. Applied only to a purchase a dispute returned.
async fn reinstate(
    tx: &mut Transaction<'static, Any>,
    acct: &mut Account,
    p: &mut PurchaseRecord,
) -> Result<(), WalletError> {
    if !returned_by_dispute(p) {
        return Ok(());
    }
    let (lot_id, _) = acct.grant(
        LotKind::Purchased,
        p.credits,
        p.expires_at,
        EntryKind::Purchase,
        format!("purchase:{}", p.purchase_id),
        format!("{} credits for {}: dispute won", p.credits, p.amount),
    );
    p.status = PurchaseStatus::Succeeded;
    p.failure_reason = String::new();
    p.lot_id = Some(lot_id);
    acct.event(
        "wallet.payment_reinstated",
        json!({
            "wallet_id": p.wallet_id, "purchase_id": p.purchase_id, "credits": p.credits,
            "amount": p.amount.amount_text(), "currency": p.amount.currency().code(),
            "trigger": p.trigger.as_str(),
        }),
    );
    store::update_purchase(tx, p, acct.now).await?;
    Ok(())
}

/// C4: after a debit leaves the available balance at or below the threshold, record one
/// automatic purchase (driven after commit; the reconciler finishes it after a crash).
pub(super) async fn fixed_top_up_after(
    tx: &mut Transaction<'static, Any>,
    acct: &mut Account,
) -> Result<Option<PurchaseRecord>, WalletError> {
    if acct.wallet.funding != FundingMode::Prepaid || acct.wallet.payment_method.is_empty() {
        return Ok(None);
    }
    let in_flight = store::auto_fixed_in_flight(tx, &acct.wallet.wallet_id).await?;
    let Some(credits) = domain::plan_top_up_after_debit(
        &acct.wallet.top_up,
        acct.available(),
        acct.auto_bought_this_month,
        in_flight,
    ) else {
        return Ok(None);
    };
    let amount = price(&acct.wallet.pricing, credits)?;
    let method = acct.wallet.payment_method.clone();
    let p = new_purchase(
        acct,
        None,
        PurchaseTrigger::AutoFixed,
        credits,
        amount,
        method,
        None,
    );
    store::insert_purchase(tx, &p, acct.now).await?;
    acct.auto_bought_this_month += credits;
    Ok(Some(p))
}
