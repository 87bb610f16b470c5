//! Plan changes: previews, upgrades (paid in three steps), scheduled downgrades, change
//! requests, add-on cancellation, Cancel and Resume (S6-S13, S19).

use chrono::{DateTime, Duration, Utc};
use runtime::idempotency::IdempotencyKey;
use serde_json::json;
use shared::{BillingPeriod, Money};
use sqlx::{Any, AnyConnection, Transaction};

use crate::{
    convert::ChangeRequest as ChangeAsked,
    domain::{self, Change, Plan, Status as SubStatus, Target, Timing},
    error::SubError,
    model::{
        AddOnCancelled, ChangeApplied, ChangePreview, ChangeRequestRecord, InvoiceRecord,
        PaymentOp, PaymentPurpose, PeriodStart, RequestStatus, SubscriptionRecord,
        SubscriptionView,
    },
    store,
    unit::{Charged, Unit},
};

use super::{
    Actor, Answer, Begun, Subscriptions,
    payment::{Finished, PaymentOutcome, declined},
};

/// How long a preview stays valid.
pub const PREVIEW_TTL_SECONDS: i64 = 3600;

impl Subscriptions {
    pub(super) async fn resolve(
        &self,
        conn: &mut AnyConnection,
        asked: &ChangeAsked,
    ) -> Result<(Change, Option<Plan>), SubError> {
        Ok(match asked {
            ChangeAsked::Plain(c) => (c.clone(), None),
            ChangeAsked::Level(id) => {
                let p = self.plan(conn, id, None).await?;
                (
                    Change::Level {
                        plan_id: p.plan_id.clone(),
                        version: p.version,
                    },
                    Some(p),
                )
            }
            ChangeAsked::Product(id) => {
                let p = self.plan(conn, id, None).await?;
                (
                    Change::Product {
                        plan_id: p.plan_id.clone(),
                        version: p.version,
                    },
                    Some(p),
                )
            }
        })
    }

    pub(super) fn changeable(sub: &SubscriptionRecord) -> Result<(), SubError> {
        if !matches!(sub.status, SubStatus::Active | SubStatus::PastDue) {
            return Err(SubError::Precondition(format!(
                "the subscription is {}: only an active subscription can be changed",
                sub.status.as_str()
            )));
        }
        if sub.pending_op.is_some() {
            return Err(SubError::Precondition(
                "another change of this subscription is being paid; try again shortly".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn period(sub: &SubscriptionRecord) -> BillingPeriod {
        BillingPeriod {
            start: sub.period_start,
            end: sub.period_end,
        }
    }

    /// The target of a change and, for an immediate one, its quote at `at` (S6-S10, S19).
    pub(super) fn evaluate(
        sub: &SubscriptionRecord,
        plan: &Plan,
        new_plan: Option<&Plan>,
        change: &Change,
        at: DateTime<Utc>,
    ) -> Result<(Target, Option<domain::UpgradeQuote>), SubError> {
        let target =
            domain::plan_change(plan, &sub.selection, new_plan, change, sub.active_contacts)?;
        let quote = if target.timing == Timing::Immediate {
            Some(domain::quote_upgrade(
                plan,
                &sub.selection,
                &target.plan,
                &target.selection,
                &Self::period(sub),
                at,
                sub.vat_rate,
            )?)
        } else {
            None
        };
        Ok((target, quote))
    }

    /// PreviewChange (S6).
    pub async fn preview_change(
        &self,
        account_id: &str,
        asked: &ChangeAsked,
    ) -> Result<ChangePreview, SubError> {
        let mut conn = self.conn().await?;
        let sub = store::read_subscription(&mut conn, account_id)
            .await?
            .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
        Self::changeable(&sub)?;
        let plan = self
            .plan(&mut conn, &sub.plan_id, Some(sub.plan_version))
            .await?;
        let (change, new_plan) = self.resolve(&mut conn, asked).await?;
        let now = self.now();
        let (target, quote) = Self::evaluate(&sub, &plan, new_plan.as_ref(), &change, now)?;
        let currency = plan.currency;
        let zero = Money::zero(currency);
        let (bill, new_recurring) = match &quote {
            Some(q) => (Some(q.bill.clone()), q.new_recurring),
            None => (
                None,
                domain::recurring_price(&target.plan, &target.selection)?,
            ),
        };
        let due = bill.as_ref().map_or(zero, |b| b.total);
        let token = self
            .sign_token(
                account_id,
                &format!(
                    "{}.{}.{}",
                    sub.revision,
                    now.timestamp_micros(),
                    due.to_minor_units()
                        .map_err(|e| SubError::Arithmetic(e.to_string()))?
                ),
            )
            .await?;
        Ok(ChangePreview {
            preview_token: token,
            change,
            timing: target.timing,
            effective_at: match target.timing {
                Timing::Immediate => Some(now),
                Timing::NextCycle => Some(sub.period_end),
                Timing::ChangeRequest => None,
            },
            bill,
            amount_due_today: due,
            new_recurring_price: new_recurring,
            expires_at: now + Duration::seconds(PREVIEW_TTL_SECONDS),
        })
    }

    /// ApplyChange (S6-S10, S12, S19): charges exactly the previewed amount, or refuses when
    /// anything changed since the preview.
    pub async fn apply_change(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
        asked: &ChangeAsked,
        token: &str,
    ) -> Result<Answer<ChangeApplied>, SubError> {
        let (revision, at_us, amount_minor) = self.verify_token(account_id, token).await?;
        let at = runtime::clock::from_micros(at_us);
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, now).await?;
        let op = format!("change:{revision}:{at_us}:{}", key.key());
        if let Some(done) = unit
            .sub
            .payment_op
            .clone()
            .filter(|p| p.op == op && p.outcome.is_some())
        {
            // The jobs finished this request's payment after the client stopped waiting.
            return self
                .replay_change(tx, key, &unit.sub, &done, at, None)
                .await;
        }
        let resuming = unit.sub.pending_op.as_deref() == Some(op.as_str());
        if !resuming {
            Self::changeable(&unit.sub)?;
        }
        if unit.sub.revision != revision {
            return Err(SubError::StalePreview(
                "the subscription changed since the preview".into(),
            ));
        }
        if at > now
            || now - at > Duration::seconds(PREVIEW_TTL_SECONDS)
            || at < unit.sub.period_start
        {
            return Err(SubError::StalePreview("the preview expired".into()));
        }
        let plan = self
            .plan(&mut tx, &unit.sub.plan_id, Some(unit.sub.plan_version))
            .await?;
        let (change, new_plan) = self.resolve(&mut tx, asked).await?;
        let (target, quote) = Self::evaluate(&unit.sub, &plan, new_plan.as_ref(), &change, at)?;
        let due = quote
            .as_ref()
            .map_or(Money::zero(plan.currency), |q| q.bill.total);
        if due.to_minor_units().ok() != Some(amount_minor) {
            return Err(SubError::StalePreview(format!(
                "the change now costs {due}, not the previewed amount"
            )));
        }
        match target.timing {
            Timing::ChangeRequest => {
                let request = self
                    .file_request(&mut tx, &mut unit, actor, &change)
                    .await?;
                let sub = unit.save(&mut tx).await?;
                let applied = ChangeApplied {
                    timing: Timing::ChangeRequest,
                    effective_at: None,
                    subscription: self.view(&mut tx, &sub).await?,
                    invoice: None,
                    change_request: Some(request),
                    contacts_promoted: 0,
                };
                self.finish(tx, key, applied).await
            }
            Timing::NextCycle => {
                let effective = self.schedule(&mut unit, actor, &change);
                let sub = unit.save(&mut tx).await?;
                let applied = ChangeApplied {
                    timing: Timing::NextCycle,
                    effective_at: Some(effective),
                    subscription: self.view(&mut tx, &sub).await?,
                    invoice: None,
                    change_request: None,
                    contacts_promoted: 0,
                };
                self.finish(tx, key, applied).await
            }
            Timing::Immediate => {
                let Some(quote) = quote else {
                    return Err(SubError::Arithmetic(
                        "an immediate change without a quote".into(),
                    ));
                };
                let card = unit.sub.payment_kind.charged_by_gateway() && due.is_positive();
                if !card {
                    let (invoice, promoted) = self
                        .apply_upgrade(&mut tx, &mut unit, actor, &change, target, quote, at, None)
                        .await?;
                    let sub = unit.save(&mut tx).await?;
                    let applied = self.applied(&mut tx, &sub, invoice, promoted, at).await?;
                    return self.finish(tx, key, applied).await;
                }
                // Step 1: mark the subscription so nothing else changes it while paying, and
                // keep the payment (keyed by subscription and revision) for a retry or the jobs.
                let payment = if resuming {
                    let p = unit.sub.payment_op.clone().ok_or_else(|| {
                        SubError::Precondition("no payment is in flight for this change".into())
                    })?;
                    tx.rollback().await?;
                    p
                } else {
                    let p = PaymentOp {
                        op: op.clone(),
                        gateway_key: format!("{}:change:{revision}", unit.sub.subscription_id),
                        payment_method: unit.sub.payment_method.clone(),
                        amount_minor,
                        currency: due.currency().code().to_string(),
                        description: format!("change of subscription of {account_id}: {change}"),
                        actor: actor.0.clone(),
                        purpose: PaymentPurpose::Change {
                            change: change.clone(),
                            revision,
                            at_us,
                        },
                        outcome: None,
                    };
                    unit.sub.pending_op = Some(op.clone());
                    unit.sub.payment_op = Some(p.clone());
                    unit.sub.payment_since = Some(now);
                    unit.save(&mut tx).await?;
                    tx.commit().await?;
                    p
                };
                // Step 2: the gateway.
                let outcome = self.charge_op(&payment).await;
                if matches!(outcome, PaymentOutcome::Unknown) {
                    return Err(SubError::PaymentOutcomeUnknown);
                }
                // Step 3: apply the outcome (unless the jobs did meanwhile).
                let mut tx = match self.begin(key).await? {
                    Begun::Replay(r) => return r,
                    Begun::Fresh(tx) => tx,
                };
                let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
                match self
                    .finish_change(&mut tx, &mut unit, &payment, &outcome)
                    .await?
                {
                    (Finished::Applied, Some((invoice, promoted))) => {
                        let sub = unit.save(&mut tx).await?;
                        let applied = self.applied(&mut tx, &sub, invoice, promoted, at).await?;
                        self.finish(tx, key, applied).await
                    }
                    (Finished::Declined(reason), _) => {
                        unit.save(&mut tx).await?;
                        self.refuse(tx, key, reason).await
                    }
                    (Finished::Earlier | Finished::Applied, _) => {
                        let sub = unit.sub.clone();
                        self.replay_change(tx, key, &sub, &payment, at, Some(&op))
                            .await
                    }
                }
            }
        }
    }

    /// The answer to an ApplyChange whose payment was finished before (by the jobs).
    pub(super) async fn replay_change(
        &self,
        mut tx: Transaction<'static, Any>,
        key: &IdempotencyKey,
        sub: &SubscriptionRecord,
        payment: &PaymentOp,
        at: DateTime<Utc>,
        op: Option<&str>,
    ) -> Result<Answer<ChangeApplied>, SubError> {
        let done = sub
            .payment_op
            .as_ref()
            .filter(|p| p.op == op.unwrap_or(&payment.op) && p.outcome.is_some());
        let Some(done) = done else {
            return Err(SubError::Precondition(
                "the subscription changed while the payment was in flight".into(),
            ));
        };
        if let Some(reason) = declined(done) {
            return self.refuse(tx, key, reason.to_string()).await;
        }
        let invoice = store::invoice_by_gateway_key(&mut tx, &done.gateway_key)
            .await?
            .ok_or_else(|| SubError::InvoiceNotFound(done.gateway_key.clone()))?;
        let applied = self.applied(&mut tx, sub, invoice, 0, at).await?;
        self.finish(tx, key, applied).await
    }

    /// Applies the outcome of an immediate change's payment under the subscription's lock, once:
    /// paid (or a debit pending) applies the change at the previewed instant with its invoice
    /// (S6: what is charged equals what was shown); declined changes nothing but the mark. The
    /// caller saves the unit.
    pub(super) async fn finish_change(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
        payment: &PaymentOp,
        outcome: &PaymentOutcome,
    ) -> Result<(Finished, Option<(InvoiceRecord, u64)>), SubError> {
        let PaymentPurpose::Change { change, at_us, .. } = &payment.purpose else {
            return Ok((Finished::Earlier, None));
        };
        let in_flight = unit.sub.pending_op.as_deref() == Some(payment.op.as_str())
            && unit
                .sub
                .payment_op
                .as_ref()
                .is_some_and(|p| p.op == payment.op && p.outcome.is_none());
        if !in_flight || matches!(outcome, PaymentOutcome::Unknown) {
            return Ok((Finished::Earlier, None));
        }
        let mut done = payment.clone();
        done.outcome = outcome.recorded();
        unit.sub.pending_op = None;
        unit.sub.payment_since = None;
        unit.sub.payment_op = Some(done);
        let actor = Actor(payment.actor.clone());
        if let PaymentOutcome::Declined(reason) = outcome {
            unit.record(
                &actor.0,
                "change_payment_declined",
                format!("{change}: {reason}"),
            );
            unit.event(
                "subscription.payment_failed",
                json!({"reason": reason, "change": change.to_string(), "final": true}),
            );
            return Ok((Finished::Declined(reason.clone()), None));
        }
        let at = runtime::clock::from_micros(*at_us);
        let plan = self
            .plan(tx, &unit.sub.plan_id, Some(unit.sub.plan_version))
            .await?;
        let new_plan = match change {
            Change::Level { plan_id, version } | Change::Product { plan_id, version } => {
                Some(self.plan(tx, plan_id, Some(*version)).await?)
            }
            _ => None,
        };
        let (target, quote) = Self::evaluate(&unit.sub, &plan, new_plan.as_ref(), change, at)?;
        let Some(quote) =
            quote.filter(|q| q.bill.total.to_minor_units().ok() == Some(payment.amount_minor))
        else {
            // Nothing else changes a subscription while its payment is in flight, so this is
            // a bug; the money was taken and the log says where.
            tracing::error!(key = %payment.gateway_key, "a paid change no longer quotes what was charged");
            return Err(SubError::Arithmetic(
                "a paid change no longer quotes what was charged".into(),
            ));
        };
        let charged = Charged {
            gateway_key: payment.gateway_key.clone(),
            captured: matches!(outcome, PaymentOutcome::Paid),
        };
        let applied = self
            .apply_upgrade(tx, unit, &actor, change, target, quote, at, Some(charged))
            .await?;
        Ok((Finished::Applied, Some(applied)))
    }

    pub(super) async fn applied(
        &self,
        conn: &mut AnyConnection,
        sub: &SubscriptionRecord,
        invoice: InvoiceRecord,
        promoted: u64,
        at: DateTime<Utc>,
    ) -> Result<ChangeApplied, SubError> {
        Ok(ChangeApplied {
            timing: Timing::Immediate,
            effective_at: Some(at),
            subscription: self.view(conn, sub).await?,
            invoice: Some(invoice),
            change_request: None,
            contacts_promoted: promoted,
        })
    }

    /// S7/S8: the upgrade takes effect now; its invoice carries the proration lines; pending
    /// contacts are promoted up to the new limit (S12).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn apply_upgrade(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
        actor: &Actor,
        change: &Change,
        target: Target,
        quote: domain::UpgradeQuote,
        at: DateTime<Utc>,
        charged: Option<Charged>,
    ) -> Result<(InvoiceRecord, u64), SubError> {
        let s = &mut unit.sub;
        s.plan_id = target.plan.plan_id.clone();
        s.plan_version = target.plan.version;
        s.selection = target.selection;
        s.revision += 1;
        if quote.restarts_period {
            // S8: a new full period starts on the day of the upgrade.
            s.begin_period(PeriodStart::Anchor(at), &target.plan)
                .map_err(|e| SubError::Arithmetic(e.to_string()))?;
        }
        let cycle = quote.restarts_period.then_some(s.cycle);
        let invoice = unit
            .issue(tx, &self.db, "change", cycle, quote.bill, charged)
            .await?;
        unit.record(
            &actor.0,
            "upgraded",
            format!("{change}; invoice {} for {}", invoice.number, invoice.total),
        );
        unit.event(
            "subscription.upgraded",
            json!({"change": change.to_string(), "invoice_id": invoice.invoice_id}),
        );
        let promoted = self.promote(unit);
        Ok((invoice, promoted))
    }

    pub(super) fn schedule(
        &self,
        unit: &mut Unit,
        actor: &Actor,
        change: &Change,
    ) -> DateTime<Utc> {
        unit.sub.scheduled.push(change.clone());
        unit.sub.revision += 1;
        let effective = unit.sub.period_end;
        unit.record(
            &actor.0,
            "change_scheduled",
            format!("{change} from {}", effective.to_rfc3339()),
        );
        unit.event(
            "subscription.change_scheduled",
            json!({"change": change.to_string(), "effective_at": effective.to_rfc3339()}),
        );
        effective
    }

    pub(super) async fn file_request(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
        actor: &Actor,
        change: &Change,
    ) -> Result<ChangeRequestRecord, SubError> {
        let request = ChangeRequestRecord {
            request_id: format!("chr_{}", uuid::Uuid::now_v7().simple()),
            subscription_id: unit.sub.subscription_id.clone(),
            account_id: unit.sub.account_id.clone(),
            change: change.clone(),
            status: RequestStatus::Open,
            filed_by: actor.0.clone(),
            filed_at: unit.now,
            resolved_by: String::new(),
            resolved_at: None,
            note: String::new(),
        };
        store::insert_request(tx, &request).await?;
        unit.record(
            &actor.0,
            "change_request_filed",
            format!("{change} (request {})", request.request_id),
        );
        unit.event(
            "subscription.change_request_filed",
            json!({"request_id": request.request_id, "change": change.to_string()}),
        );
        Ok(request)
    }

    /// CancelAddOn (S13): the add-on ends at the start of the next cycle; not self-serve on
    /// some plans (S10).
    pub async fn cancel_add_on(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
        code: &str,
    ) -> Result<Answer<AddOnCancelled>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        Self::changeable(&unit.sub)?;
        let plan = self
            .plan(&mut tx, &unit.sub.plan_id, Some(unit.sub.plan_version))
            .await?;
        let change = Change::RemoveAddOn(code.to_string());
        if unit.sub.scheduled.contains(&change) {
            return Err(SubError::Precondition(format!(
                "add-on {} already ends at the next cycle",
                shared::limits::quoted(code)
            )));
        }
        let target = domain::plan_change(
            &plan,
            &unit.sub.selection,
            None,
            &change,
            unit.sub.active_contacts,
        )?;
        let (effective, request) = if target.timing == Timing::ChangeRequest {
            let r = self
                .file_request(&mut tx, &mut unit, actor, &change)
                .await?;
            (None, Some(r))
        } else {
            (Some(self.schedule(&mut unit, actor, &change)), None)
        };
        let sub = unit.save(&mut tx).await?;
        let cancelled = AddOnCancelled {
            effective_at: effective,
            subscription: self.view(&mut tx, &sub).await?,
            change_request: request,
        };
        self.finish(tx, key, cancelled).await
    }

    /// Cancel (S13): no renewal; usable until the end of the paid period.
    pub async fn cancel(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
        resume: bool,
    ) -> Result<Answer<SubscriptionView>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        if !unit.sub.status.is_live() {
            return Err(SubError::Precondition(format!(
                "the subscription is {}",
                unit.sub.status.as_str()
            )));
        }
        if unit.sub.cancel_at_period_end != resume {
            return Err(SubError::Precondition(if resume {
                "the subscription is not cancelled".into()
            } else {
                "the subscription is already cancelled at the period end".into()
            }));
        }
        unit.sub.cancel_at_period_end = !resume;
        unit.sub.revision += 1;
        let end = unit.sub.period_end.to_rfc3339();
        if resume {
            unit.record(&actor.0, "resumed", "the cancellation was taken back");
            unit.event("subscription.resumed", json!({}));
        } else {
            unit.record(&actor.0, "cancelled", format!("ends at {end}"));
            unit.event("subscription.cancel_scheduled", json!({"ends_at": end}));
        }
        let sub = unit.save(&mut tx).await?;
        let view = self.view(&mut tx, &sub).await?;
        self.finish(tx, key, view).await
    }

    /// ListChangeRequests.
    pub async fn list_requests(
        &self,
        account_id: &str,
        open_only: bool,
    ) -> Result<Vec<ChangeRequestRecord>, SubError> {
        Ok(store::requests(&self.db, account_id, open_only).await?)
    }

    /// ResolveChangeRequest (S10): staff approve (scheduled for the next cycle) or reject.
    pub async fn resolve_request(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        request_id: &str,
        approve: bool,
        note: &str,
    ) -> Result<Answer<ChangeRequestRecord>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let found = store::request(&mut tx, request_id)
            .await?
            .ok_or_else(|| SubError::ChangeRequestNotFound(request_id.to_string()))?;
        let mut unit = Unit::lock(&mut tx, &self.db, &found.account_id, self.now()).await?;
        // Read again under the subscription's lock: one resolution wins.
        let mut request = store::request(&mut tx, request_id)
            .await?
            .ok_or_else(|| SubError::ChangeRequestNotFound(request_id.to_string()))?;
        if request.status != RequestStatus::Open {
            return Err(SubError::Precondition(format!(
                "change request {} is already {}",
                shared::limits::quoted(request_id),
                request.status.as_str()
            )));
        }
        if approve {
            let plan = self
                .plan(&mut tx, &unit.sub.plan_id, Some(unit.sub.plan_version))
                .await?;
            let new_plan = match &request.change {
                Change::Level { plan_id, version } | Change::Product { plan_id, version } => {
                    Some(self.plan(&mut tx, plan_id, Some(*version)).await?)
                }
                _ => None,
            };
            // The rules still hold (S9 floor) when staff apply it.
            domain::plan_change(
                &plan,
                &unit.sub.selection,
                new_plan.as_ref(),
                &request.change,
                unit.sub.active_contacts,
            )?;
            let change = request.change.clone();
            self.schedule(&mut unit, actor, &change);
        }
        request.status = if approve {
            RequestStatus::Approved
        } else {
            RequestStatus::Rejected
        };
        request.resolved_by = actor.0.clone();
        request.resolved_at = Some(unit.now);
        request.note = note.to_string();
        store::update_request(&mut tx, &request).await?;
        unit.record(
            &actor.0,
            "change_request_resolved",
            format!("{request_id} {}", request.status.as_str()),
        );
        unit.event(
            "subscription.change_request_resolved",
            json!({"request_id": request_id, "status": request.status.as_str()}),
        );
        unit.save(&mut tx).await?;
        self.finish(tx, key, request).await
    }
}
