//! Trials, Subscribe (with its first payment in three steps), GetSubscription, VerifyAccount.

use chrono::Duration;
use runtime::idempotency::IdempotencyKey;
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::{Any, Transaction};

use crate::{
    domain::{self, Plan, Selection, Status as SubStatus, TrialTerms},
    error::SubError,
    model::{
        AccountRecord, InvoiceRecord, InvoiceStatus, PaymentKind, PaymentOp, PaymentPurpose,
        PeriodStart, SubscriptionRecord, SubscriptionView,
    },
    store,
    unit::Unit,
};

use super::{
    Actor, Answer, Begun, Subscriptions,
    payment::{Finished, PaymentOutcome, declined},
};

/// How a new subscription pays.
#[derive(Debug, Clone)]
pub struct PaymentChoice {
    /// Card or bank transfer.
    pub kind: PaymentKind,
    /// Card token.
    pub method: String,
}

/// What Subscribe buys.
#[derive(Debug, Clone)]
pub struct SubscribeCmd {
    /// Account.
    pub account_id: String,
    /// Plan (latest version).
    pub plan_id: String,
    /// Tier, seats, add-ons.
    pub selection: Selection,
    /// Payment.
    pub payment: PaymentChoice,
    /// VAT rate.
    pub vat_rate: Decimal,
}

impl Subscriptions {
    /// StartTrial (S14): the plan's trial terms, or larger ones granted by hand.
    pub async fn start_trial(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
        plan_id: &str,
        contacts: Option<u64>,
        terms_override: Option<TrialTerms>,
    ) -> Result<Answer<SubscriptionView>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        let plan = self.plan(&mut tx, plan_id, None).await?;
        let terms = terms_override.or(plan.trial).ok_or_else(|| {
            SubError::Precondition(format!(
                "plan {} offers no trial",
                shared::limits::quoted(plan_id)
            ))
        })?;
        if terms.days == 0 || terms.days > domain::MAX_TRIAL_DAYS {
            return Err(SubError::invalid(
                "terms_override.days",
                format!("must be 1..={}", domain::MAX_TRIAL_DAYS),
            ));
        }
        let selection = Selection {
            contacts: contacts.unwrap_or(plan.slider.min()),
            seats: plan.included_seats.max(1),
            add_ons: Vec::new(),
        }
        .checked(&plan)?;
        store::ensure_account(&mut tx, account_id).await?;
        let ends = now + Duration::days(i64::from(terms.days));
        let sub = SubscriptionRecord {
            subscription_id: format!("sub_{}", uuid::Uuid::now_v7().simple()),
            account_id: account_id.to_string(),
            plan_id: plan.plan_id.clone(),
            plan_version: plan.version,
            status: SubStatus::Trialing,
            selection,
            payment_kind: PaymentKind::None,
            payment_method: String::new(),
            vat_rate: Decimal::ZERO,
            anchor: now,
            period_index: 0,
            cycle: 0,
            period_start: now,
            period_end: ends,
            trial_ends_at: Some(ends),
            trial: Some(terms),
            trial_mails_sent: 0,
            trial_ending_notified: false,
            cancel_at_period_end: false,
            scheduled: Vec::new(),
            active_contacts: 0,
            pending_contacts: 0,
            revision: 1,
            pending_op: None,
            origin_key: Some(key.key().to_string()),
            allowance_cycle: 0,
            history_seq: 0,
            created_at: now,
            allowance_month: 0,
            allowance_next: None,
            payment_op: None,
            payment_since: None,
            allowance_wait: None,
        };
        let mut unit = Unit::create(sub, now);
        unit.record(
            &actor.0,
            "trial_started",
            format!(
                "plan {} v{}: {} days, contact cap {}, free mails {}",
                plan.plan_id, plan.version, terms.days, terms.contact_cap, terms.free_mails
            ),
        );
        unit.event(
            "subscription.trial_started",
            json!({"plan_id": plan.plan_id, "trial_ends_at": ends.to_rfc3339()}),
        );
        let sub = unit.save(&mut tx).await?;
        let view = self.view(&mut tx, &sub).await?;
        self.finish(tx, key, view).await
    }

    /// Subscribe (S15, S16, S17, S18).
    pub async fn subscribe(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        cmd: SubscribeCmd,
    ) -> Result<Answer<SubscriptionView>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        let plan = self.plan(&mut tx, &cmd.plan_id, None).await?;
        let selection = cmd.selection.clone().checked(&plan)?;
        store::ensure_account(&mut tx, &cmd.account_id).await?;
        let existing = store::lock_subscription(&mut tx, &self.db, &cmd.account_id).await?;
        let (mut unit, invoice) = match existing {
            // Resuming a card payment this key started.
            Some(s)
                if s.status == SubStatus::Incomplete
                    && s.origin_key.as_deref() == Some(key.key()) =>
            {
                tx.rollback().await?;
                return self.pay_subscribe(key, &cmd.account_id).await;
            }
            // This key's payment was finished by the jobs after the client stopped waiting.
            Some(s)
                if s.origin_key.as_deref() == Some(key.key())
                    && s.pending_op.is_none()
                    && s.payment_op.as_ref().is_some_and(|p| {
                        p.outcome.is_some() && matches!(p.purpose, PaymentPurpose::Subscribe { .. })
                    }) =>
            {
                return self.replay_subscribe(tx, key, &s).await;
            }
            Some(s) if s.status == SubStatus::Trialing => {
                // S15: the tier (and payment) chosen during the trial applies at its end.
                let mut unit = Unit::create(s, now);
                unit.mark_existing();
                unit.sub.plan_id = plan.plan_id.clone();
                unit.sub.plan_version = plan.version;
                unit.sub.selection = selection.clone();
                unit.sub.payment_kind = cmd.payment.kind;
                unit.sub.payment_method = cmd.payment.method.clone();
                unit.sub.vat_rate = cmd.vat_rate;
                unit.sub.revision += 1;
                unit.record(
                    &actor.0,
                    "trial_tier_chosen",
                    format!(
                        "plan {} v{}, {} contacts, {} seats, paying by {}",
                        plan.plan_id,
                        plan.version,
                        selection.contacts,
                        selection.seats,
                        cmd.payment.kind.as_str()
                    ),
                );
                let sub = unit.save(&mut tx).await?;
                let view = self.view(&mut tx, &sub).await?;
                return self.finish(tx, key, view).await;
            }
            Some(s) if matches!(s.status, SubStatus::TrialExpired | SubStatus::Cancelled) => {
                // S16: buying after a trial needs the account review.
                if s.trial.is_some() && !store::account(&mut tx, &cmd.account_id).await?.verified {
                    return Err(SubError::Precondition(
                        "the account must be verified before buying after the trial (S16)".into(),
                    ));
                }
                // S17: the same subscription row keeps the contacts the account has.
                let prev = s.status;
                let mut unit = Unit::create(s, now);
                unit.mark_existing();
                self.start_paid(&mut unit, &plan, &selection, &cmd, key, prev)?;
                let invoice = self
                    .issue_first(&mut tx, &mut unit, &plan, "subscribe")
                    .await?;
                (unit, invoice)
            }
            Some(_) => return Err(SubError::AlreadySubscribed(cmd.account_id.clone())),
            None => {
                let sub = SubscriptionRecord {
                    subscription_id: format!("sub_{}", uuid::Uuid::now_v7().simple()),
                    account_id: cmd.account_id.clone(),
                    plan_id: String::new(),
                    plan_version: 0,
                    status: SubStatus::Incomplete,
                    selection: selection.clone(),
                    payment_kind: PaymentKind::None,
                    payment_method: String::new(),
                    vat_rate: Decimal::ZERO,
                    anchor: now,
                    period_index: 0,
                    cycle: 0,
                    period_start: now,
                    period_end: now,
                    trial_ends_at: None,
                    trial: None,
                    trial_mails_sent: 0,
                    trial_ending_notified: false,
                    cancel_at_period_end: false,
                    scheduled: Vec::new(),
                    active_contacts: 0,
                    pending_contacts: 0,
                    revision: 0,
                    pending_op: None,
                    origin_key: None,
                    allowance_cycle: 0,
                    history_seq: 0,
                    created_at: now,
                    allowance_month: 0,
                    allowance_next: None,
                    payment_op: None,
                    payment_since: None,
                    allowance_wait: None,
                };
                let mut unit = Unit::create(sub, now);
                self.start_paid(
                    &mut unit,
                    &plan,
                    &selection,
                    &cmd,
                    key,
                    SubStatus::Incomplete,
                )?;
                let invoice = self
                    .issue_first(&mut tx, &mut unit, &plan, "subscribe")
                    .await?;
                (unit, invoice)
            }
        };
        let card = cmd.payment.kind.charged_by_gateway() && invoice.status == InvoiceStatus::Open;
        if !card {
            // S18: bank transfer gives access at once; sending waits for the money.
            unit.sub.status = SubStatus::Active;
            unit.sub.pending_op = None;
            unit.record(
                &actor.0,
                "subscribed",
                format!(
                    "plan {} v{}, {} contacts, paying by {}; invoice {} open",
                    plan.plan_id,
                    plan.version,
                    selection.contacts,
                    cmd.payment.kind.as_str(),
                    invoice.number
                ),
            );
            unit.event(
                "subscription.started",
                json!({"plan_id": plan.plan_id, "payment": cmd.payment.kind.as_str()}),
            );
            let sub = unit.save(&mut tx).await?;
            let view = self.view(&mut tx, &sub).await?;
            return self.finish(tx, key, view).await;
        }
        // "from:<status>:subscribe:<invoice>": what to go back to on a decline, and the invoice a
        // retry with the same key resumes.
        let from = unit.sub.pending_op.take().unwrap_or_default();
        let op = format!("{from}:subscribe:{}", invoice.invoice_id);
        unit.sub.pending_op = Some(op.clone());
        unit.sub.payment_op = Some(PaymentOp {
            op,
            gateway_key: format!("{}:1", invoice.invoice_id),
            payment_method: invoice.payment_method.clone(),
            amount_minor: invoice
                .total
                .to_minor_units()
                .map_err(|e| SubError::Arithmetic(e.to_string()))?,
            currency: invoice.currency.code().to_string(),
            description: format!("invoice {}", invoice.number),
            actor: actor.0.clone(),
            purpose: PaymentPurpose::Subscribe {
                invoice_id: invoice.invoice_id.clone(),
            },
            outcome: None,
        });
        unit.sub.payment_since = Some(now);
        unit.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        self.pay_subscribe(key, &cmd.account_id).await
    }

    pub(super) fn start_paid(
        &self,
        unit: &mut Unit,
        plan: &Plan,
        selection: &Selection,
        cmd: &SubscribeCmd,
        key: &IdempotencyKey,
        previous: SubStatus,
    ) -> Result<(), SubError> {
        let now = unit.now;
        let s = &mut unit.sub;
        s.plan_id = plan.plan_id.clone();
        s.plan_version = plan.version;
        s.selection = selection.clone();
        s.payment_kind = cmd.payment.kind;
        s.payment_method = cmd.payment.method.clone();
        s.vat_rate = cmd.vat_rate;
        s.status = SubStatus::Incomplete;
        s.begin_period(PeriodStart::Anchor(now), plan)
            .map_err(|e| SubError::Arithmetic(e.to_string()))?;
        s.cancel_at_period_end = false;
        s.scheduled.clear();
        s.revision += 1;
        s.origin_key = Some(key.key().to_string());
        s.payment_op = None;
        s.payment_since = None;
        // Remember what to go back to if the first card payment is declined.
        s.pending_op = Some(format!("from:{}", previous.as_str()));
        Ok(())
    }

    pub(super) async fn issue_first(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
        plan: &Plan,
        kind: &str,
    ) -> Result<InvoiceRecord, SubError> {
        let lines = domain::recurring_lines(plan, &unit.sub.selection)?;
        let bill = domain::bill(lines, plan.currency, unit.sub.vat_rate)?;
        let cycle = unit.sub.cycle;
        // Subscribe charges this invoice itself (below), not the collector: issued with no
        // attempt due (rather than updated after the insert).
        unit.charged_by_caller();
        unit.issue(tx, &self.db, kind, Some(cycle), bill, None)
            .await
    }

    /// Steps 2 and 3 of a card or direct-debit Subscribe: the gateway with the payment's key,
    /// then its outcome applied (unless the jobs applied it meanwhile) and the answer recorded.
    pub(super) async fn pay_subscribe(
        &self,
        key: &IdempotencyKey,
        account_id: &str,
    ) -> Result<Answer<SubscriptionView>, SubError> {
        let op = {
            let mut conn = self.conn().await?;
            store::read_subscription(&mut conn, account_id)
                .await?
                .and_then(|s| s.payment_op)
                .ok_or_else(|| SubError::Precondition("no payment is in flight".into()))?
        };
        let outcome = self.charge_op(&op).await;
        if matches!(outcome, PaymentOutcome::Unknown) {
            return Err(SubError::PaymentOutcomeUnknown);
        }
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        match self.finish_subscribe(&mut tx, unit, &op, &outcome).await? {
            Finished::Applied => {
                let sub = store::read_subscription(&mut tx, account_id)
                    .await?
                    .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
                let view = self.view(&mut tx, &sub).await?;
                self.finish(tx, key, view).await
            }
            Finished::Declined(reason) => self.refuse(tx, key, reason).await,
            Finished::Earlier => {
                let sub = store::read_subscription(&mut tx, account_id)
                    .await?
                    .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
                self.replay_subscribe(tx, key, &sub).await
            }
        }
    }

    /// The answer to a Subscribe whose payment was finished before (by the jobs).
    pub(super) async fn replay_subscribe(
        &self,
        tx: Transaction<'static, Any>,
        key: &IdempotencyKey,
        sub: &SubscriptionRecord,
    ) -> Result<Answer<SubscriptionView>, SubError> {
        let mut tx = tx;
        match sub.payment_op.as_ref() {
            Some(op) if op.outcome.is_some() && sub.origin_key.as_deref() == Some(key.key()) => {
                if let Some(reason) = declined(op) {
                    return self.refuse(tx, key, reason.to_string()).await;
                }
                let view = self.view(&mut tx, sub).await?;
                self.finish(tx, key, view).await
            }
            _ => Err(SubError::Precondition(
                "the subscription changed while its payment was in flight".into(),
            )),
        }
    }

    /// Applies the outcome of a Subscribe's first payment under the subscription's lock, once:
    /// paid (or a debit pending) makes it active; declined voids the invoice and removes the
    /// subscription (or restores the status it came from). Saves what it changed.
    pub(super) async fn finish_subscribe(
        &self,
        tx: &mut Transaction<'static, Any>,
        mut unit: Unit,
        op: &PaymentOp,
        outcome: &PaymentOutcome,
    ) -> Result<Finished, SubError> {
        let current = unit.sub.payment_op.as_ref();
        let PaymentPurpose::Subscribe { invoice_id } = &op.purpose else {
            return Ok(Finished::Earlier);
        };
        if unit.sub.status != SubStatus::Incomplete
            || current.is_none_or(|c| c.op != op.op || c.outcome.is_some())
            || matches!(outcome, PaymentOutcome::Unknown)
        {
            return Ok(Finished::Earlier);
        }
        let mut invoice = store::invoice(tx, &self.db, invoice_id, true)
            .await?
            .ok_or_else(|| SubError::InvoiceNotFound(invoice_id.clone()))?;
        invoice.payment_attempts = 1;
        invoice.gateway_key = op.gateway_key.clone();
        invoice.next_attempt_at = None;
        let mut done = op.clone();
        done.outcome = outcome.recorded();
        unit.sub.payment_since = None;
        let account_id = unit.sub.account_id.clone();
        if let PaymentOutcome::Declined(reason) = outcome {
            invoice.status = InvoiceStatus::Void;
            store::update_invoice_payment(tx, &invoice).await?;
            let from = unit
                .sub
                .pending_op
                .as_deref()
                .and_then(|op| op.strip_prefix("from:"))
                .and_then(|s| s.split(':').next())
                .and_then(SubStatus::parse)
                .unwrap_or(SubStatus::Incomplete);
            runtime::outbox::append(
                tx,
                "subscription.payment_failed",
                &unit.sub.subscription_id,
                &json!({"account_id": account_id, "invoice_id": invoice_id, "reason": reason, "final": true}),
                unit.now.timestamp_micros(),
            )
            .await?;
            if from == SubStatus::Incomplete {
                store::delete_subscription(tx, &unit.sub.subscription_id).await?;
            } else {
                unit.sub.status = from;
                unit.sub.pending_op = None;
                unit.sub.payment_op = Some(done);
                unit.record(&op.actor, "payment_declined", reason.clone());
                unit.save(tx).await?;
            }
            return Ok(Finished::Declined(reason.clone()));
        }
        let captured = matches!(outcome, PaymentOutcome::Paid);
        if captured {
            invoice.status = InvoiceStatus::Paid;
            invoice.paid_at = Some(unit.now);
        } else {
            // A direct debit: access and sending at once; the invoice waits for the bank.
            invoice.status = InvoiceStatus::Pending;
        }
        store::update_invoice_payment(tx, &invoice).await?;
        // The invoice was issued open (its `invoice_issued` event says so) before the charge;
        // what the charge made of it follows, as for every other collected invoice.
        let event = if captured {
            "subscription.invoice_paid"
        } else {
            "subscription.invoice_payment_pending"
        };
        unit.event(
            event,
            json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
        );
        let from = unit.sub.pending_op.take().unwrap_or_default();
        unit.sub.payment_op = Some(done);
        unit.sub.status = SubStatus::Active;
        // S12/S17: a returning account's pending contacts fit the new tier.
        self.promote(&mut unit);
        let kind = unit.sub.payment_kind.as_str();
        unit.record(
            &op.actor,
            "subscribed",
            format!(
                "plan {} v{}, {} contacts, {kind}; invoice {} {}",
                unit.sub.plan_id,
                unit.sub.plan_version,
                unit.sub.selection.contacts,
                invoice.number,
                invoice.status.as_str()
            ),
        );
        unit.event(
            "subscription.started",
            json!({"plan_id": unit.sub.plan_id, "payment": kind, "resumed_from": from}),
        );
        unit.save(tx).await?;
        Ok(Finished::Applied)
    }

    /// GetSubscription.
    pub async fn get_subscription(&self, account_id: &str) -> Result<SubscriptionView, SubError> {
        let mut conn = self.conn().await?;
        let sub = store::read_subscription(&mut conn, account_id)
            .await?
            .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
        self.view(&mut conn, &sub).await
    }

    /// VerifyAccount (S16).
    pub async fn verify_account(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
    ) -> Result<Answer<AccountRecord>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        store::ensure_account(&mut tx, account_id).await?;
        store::verify_account(&mut tx, account_id, &actor.0, now).await?;
        if store::lock_subscription(&mut tx, &self.db, account_id)
            .await?
            .is_some()
        {
            let mut unit = Unit::lock(&mut tx, &self.db, account_id, now).await?;
            unit.record(&actor.0, "account_verified", "account review passed");
            unit.event("subscription.account_verified", json!({}));
            unit.save(&mut tx).await?;
        }
        let account = store::account(&mut tx, account_id).await?;
        self.finish(tx, key, account).await
    }
}
