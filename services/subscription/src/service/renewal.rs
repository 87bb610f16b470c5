//! Renewal, driven by the jobs: trial notices and ends, period ends, monthly credits (C7).

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use sqlx::{Any, Transaction};

use crate::{
    domain::{self, Change, Plan, Status as SubStatus},
    error::SubError,
    model::{InvoiceRecord, InvoiceStatus, PaymentKind, PeriodStart, SubscriptionRecord},
    store::{self, InvoiceNumbers},
    unit::{Unit, Writes},
    wallet::{Grant, GrantOutcome},
};

use super::{Actor, Subscriptions, system};

/// What one renewal batch did (see [`Subscriptions::renew_batch`]).
#[derive(Debug, Default)]
pub struct RenewalBatch {
    /// Subscriptions claimed (a full batch means more may be due).
    pub claimed: usize,
    /// Invoices issued that the gateway collects (card or direct debit, first attempt due).
    pub to_collect: Vec<InvoiceRecord>,
    /// The saved subscriptions, whose monthly credits may now be due (C7).
    pub renewed: Vec<SubscriptionRecord>,
}

/// How long a month of credits that found no wallet for its account waits before the jobs
/// ask the wallet again (C7).
pub const WALLET_WAIT_RETRY_SECONDS: i64 = 60;

/// A month of plan credits due in the wallet (C7), computed from a subscription read without
/// the lock and applied under it only if the subscription is still in that cycle.
pub(super) struct Allowance {
    pub(super) account_id: String,
    pub(super) cycle: i64,
    /// Month index within the cycle recorded once granted.
    pub(super) index: i64,
    pub(super) month: Option<domain::AllowanceMonth>,
    pub(super) credits: i64,
    /// The wallet call, when there is one to make.
    pub(super) grant: Option<Grant>,
}

impl Subscriptions {
    /// Everything due for one account by now: trial ending notice, trial end (S15, S16),
    /// period ends (scheduled changes, cancellation, renewal invoice), credit allowance (C7).
    /// Idempotent: each step is recorded under the subscription's lock, at most one invoice per
    /// cycle (unique index), and the wallet grant is keyed by subscription and cycle.
    pub async fn process_due(&self, account_id: &str) -> Result<(), SubError> {
        for _ in 0..24 {
            if !self.advance_once(account_id).await? {
                break;
            }
        }
        self.grant_allowance(account_id).await
    }

    /// One step; `true` when something changed (run again to catch up).
    pub(super) async fn advance_once(&self, account_id: &str) -> Result<bool, SubError> {
        let mut tx = self.db.begin_write().await?;
        let now = self.now();
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, now).await?;
        let mut numbers = InvoiceNumbers::new();
        let changed = self.step(&mut tx, &mut unit, &mut numbers).await?;
        if changed {
            numbers.write_back(&mut tx).await?;
            unit.save(&mut tx).await?;
            tx.commit().await?;
            self.platform.outbox.poke();
        } else {
            tx.rollback().await?;
        }
        Ok(changed)
    }

    /// The next thing due on a locked subscription at `unit.now` (trial notice or end, period
    /// end); `true` when something changed. Invoices take their numbers from `numbers`.
    pub(super) async fn step(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
        numbers: &mut InvoiceNumbers,
    ) -> Result<bool, SubError> {
        if unit.sub.pending_op.is_some() {
            return Ok(false);
        }
        let actor = system();
        Ok(match unit.sub.status {
            SubStatus::Trialing => self.trial_step(tx, unit, numbers, &actor).await?,
            SubStatus::Active | SubStatus::PastDue if unit.now >= unit.sub.period_end => {
                self.renew(tx, unit, numbers, &actor).await?;
                true
            }
            _ => false,
        })
    }

    /// One renewal batch, in one write transaction: claims up to `limit` due subscriptions
    /// (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so two replicas take different ones; SQLite's
    /// single writer admits one batch at a time), takes every step due on each (catching up
    /// missed periods, as [`Subscriptions::process_due`] does), numbers all their invoices from
    /// one range of the counter, and commits once. The gateway and the wallet are called by
    /// the caller afterwards ([`Subscriptions::collect_issued`], [`Subscriptions::grant_many`]),
    /// outside any transaction. If the batch fails, nothing of it is kept (the invoice range
    /// included) and its accounts are processed one by one, so one bad subscription cannot
    /// hold back the others.
    pub async fn renew_batch(&self, limit: i64) -> Result<RenewalBatch, SubError> {
        let now = self.now();
        let notice = domain::TRIAL_ENDING_NOTICE_DAYS * 86_400 * 1_000_000;
        let mut tx = self.db.begin_write().await?;
        let claimed = store::claim_due_subscriptions(&mut tx, &self.db, now, notice, limit).await?;
        let accounts: Vec<String> = claimed.iter().map(|s| s.account_id.clone()).collect();
        match self.renew_claimed(&mut tx, claimed, now).await {
            Ok(mut batch) => {
                tx.commit().await?;
                self.platform.outbox.poke();
                batch.claimed = accounts.len();
                Ok(batch)
            }
            Err(e) => {
                tx.rollback().await?;
                tracing::warn!(error = %e, count = accounts.len(), "a renewal batch failed; renewing its subscriptions one by one");
                let mut batch = RenewalBatch {
                    claimed: accounts.len(),
                    ..RenewalBatch::default()
                };
                for account in &accounts {
                    match self.process_due(account).await {
                        Ok(()) => {}
                        Err(e) => {
                            tracing::warn!(account = %account, error = %e, "processing a due subscription failed");
                            // Left for the next pass; not counted as work done.
                            batch.claimed = batch.claimed.saturating_sub(1);
                        }
                    }
                }
                Ok(batch)
            }
        }
    }

    pub(super) async fn renew_claimed(
        &self,
        tx: &mut Transaction<'static, Any>,
        claimed: Vec<SubscriptionRecord>,
        now: DateTime<Utc>,
    ) -> Result<RenewalBatch, SubError> {
        let mut numbers = InvoiceNumbers::new();
        let mut batch = RenewalBatch::default();
        let mut writes = Writes::new();
        for sub in claimed {
            let mut unit = Unit::locked(sub, now);
            let mut changed = false;
            for _ in 0..24 {
                if !self.step(tx, &mut unit, &mut numbers).await? {
                    break;
                }
                changed = true;
            }
            if !changed {
                continue;
            }
            batch.to_collect.extend(
                unit.take_issued()
                    .into_iter()
                    .filter(|i| i.status == InvoiceStatus::Open && i.next_attempt_at.is_some()),
            );
            batch.renewed.push(unit.save_to(&mut writes));
        }
        numbers.write_back(tx).await?;
        writes.flush(tx).await?;
        Ok(batch)
    }

    pub(super) async fn trial_step(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
        numbers: &mut InvoiceNumbers,
        actor: &Actor,
    ) -> Result<bool, SubError> {
        let now = unit.now;
        let Some(ends) = unit.sub.trial_ends_at else {
            return Ok(false);
        };
        if now < ends {
            if !unit.sub.trial_ending_notified
                && now >= ends - Duration::days(domain::TRIAL_ENDING_NOTICE_DAYS)
            {
                unit.sub.trial_ending_notified = true;
                unit.event(
                    "subscription.trial_ending",
                    json!({"trial_ends_at": ends.to_rfc3339()}),
                );
                return Ok(true);
            }
            return Ok(false);
        }
        let verified = store::account(tx, &unit.sub.account_id).await?.verified;
        if !verified || unit.sub.payment_kind == PaymentKind::None {
            // S16: not verified (or nothing to pay with) at the trial's end: access ends.
            unit.sub.status = SubStatus::TrialExpired;
            unit.sub.revision += 1;
            let why = if verified {
                "no payment method was chosen"
            } else {
                "the account was not verified"
            };
            unit.record(&actor.0, "trial_expired", why);
            unit.event("subscription.trial_expired", json!({"reason": why}));
            return Ok(true);
        }
        // S15: the tier chosen during the trial applies now; S17: everything stays.
        let plan = self
            .plan(tx, &unit.sub.plan_id, Some(unit.sub.plan_version))
            .await?;
        let s = &mut unit.sub;
        s.status = SubStatus::Active;
        s.begin_period(PeriodStart::Anchor(ends), &plan)
            .map_err(|e| SubError::Arithmetic(e.to_string()))?;
        s.revision += 1;
        let lines = domain::recurring_lines(&plan, &unit.sub.selection)?;
        let bill = domain::bill(lines, plan.currency, unit.sub.vat_rate)?;
        let cycle = unit.sub.cycle;
        let invoice = unit
            .issue_numbered(tx, &self.db, numbers, "conversion", Some(cycle), bill, None)
            .await?;
        let promoted = self.promote(unit);
        unit.record(
            &actor.0,
            "trial_converted",
            format!(
                "{} contacts on plan {} v{}; invoice {}",
                unit.sub.selection.contacts,
                unit.sub.plan_id,
                unit.sub.plan_version,
                invoice.number
            ),
        );
        unit.event(
            "subscription.trial_converted",
            json!({"contacts": unit.sub.selection.contacts, "invoice_id": invoice.invoice_id, "contacts_promoted": promoted}),
        );
        Ok(true)
    }

    pub(super) async fn renew(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
        numbers: &mut InvoiceNumbers,
        actor: &Actor,
    ) -> Result<(), SubError> {
        if unit.sub.cancel_at_period_end {
            // S13: no renewal; the paid period is over.
            unit.sub.status = SubStatus::Cancelled;
            unit.sub.revision += 1;
            unit.record(
                &actor.0,
                "subscription_ended",
                "cancelled at the period end",
            );
            unit.event(
                "subscription.cancelled",
                json!({"ended_at": unit.sub.period_end.to_rfc3339()}),
            );
            return Ok(());
        }
        let mut plan = self
            .plan(tx, &unit.sub.plan_id, Some(unit.sub.plan_version))
            .await?;
        let mut selection = unit.sub.selection.clone();
        let scheduled = std::mem::take(&mut unit.sub.scheduled);
        for change in &scheduled {
            let new_plan = match change {
                Change::Level { plan_id, version } | Change::Product { plan_id, version } => {
                    Some(self.plan(tx, plan_id, Some(*version)).await?)
                }
                _ => None,
            };
            match domain::plan_change(
                &plan,
                &selection,
                new_plan.as_ref(),
                change,
                unit.sub.active_contacts,
            ) {
                Ok(t) => {
                    plan = t.plan;
                    selection = t.selection;
                    unit.record(&actor.0, "scheduled_change_applied", change.to_string());
                }
                Err(e) => {
                    // S9 at the cycle start: a downgrade that no longer holds the active
                    // contacts is dropped, never applied below them.
                    unit.record(
                        &actor.0,
                        "scheduled_change_dropped",
                        format!("{change}: {e}"),
                    );
                }
            }
        }
        let s = &mut unit.sub;
        s.plan_id = plan.plan_id.clone();
        s.plan_version = plan.version;
        s.selection = selection;
        let period = s
            .begin_period(PeriodStart::Next, &plan)
            .map_err(|e| SubError::Arithmetic(e.to_string()))?;
        s.revision += 1;
        let lines = domain::recurring_lines(&plan, &unit.sub.selection)?;
        let bill = domain::bill(lines, plan.currency, unit.sub.vat_rate)?;
        let cycle = unit.sub.cycle;
        let invoice = unit
            .issue_numbered(tx, &self.db, numbers, "renewal", Some(cycle), bill, None)
            .await?;
        unit.record(
            &actor.0,
            "renewed",
            format!(
                "period {} .. {}; invoice {} for {}",
                period.start.to_rfc3339(),
                period.end.to_rfc3339(),
                invoice.number,
                invoice.total
            ),
        );
        unit.event(
            "subscription.renewed",
            json!({"period_start": period.start.to_rfc3339(), "period_end": period.end.to_rfc3339(), "invoice_id": invoice.invoice_id}),
        );
        Ok(())
    }

    /// C7: the plan's credits for the current month, granted in the wallet, expiring at the
    /// month's end. A monthly plan's month is its period; a yearly plan has twelve, counted from
    /// the period anchor, each granted in its month. Keyed by subscription, cycle and month, so
    /// a retry never grants twice; a month the jobs missed entirely is not granted late (its
    /// credits would already have expired).
    pub(super) async fn grant_allowance(&self, account_id: &str) -> Result<(), SubError> {
        let sub = {
            let mut conn = self.conn().await?;
            match store::read_subscription(&mut conn, account_id).await? {
                Some(s) => s,
                None => return Ok(()),
            }
        };
        self.grant_many(vec![sub]).await.map(|_| ())
    }

    /// The month of credits due on `sub` now, if any (see [`Subscriptions::grant_allowance`]).
    pub(super) fn allowance_due(
        &self,
        sub: &SubscriptionRecord,
        plan: &Plan,
        now: DateTime<Utc>,
    ) -> Result<Option<Allowance>, SubError> {
        if !matches!(sub.status, SubStatus::Active | SubStatus::PastDue) {
            return Ok(None);
        }
        let month = domain::allowance_month(sub.anchor, plan.interval, sub.period_index, now)?;
        let cycle = sub.cycle;
        // Outside the period (the renewal comes first): its credits would expire at once.
        let index = month.map_or(
            i64::from(domain::months_per_period(plan.interval)) - 1,
            |m| i64::from(m.index),
        );
        if (sub.allowance_cycle, sub.allowance_month) >= (cycle, index) {
            return Ok(None);
        }
        let grant = match (plan.monthly_credits, month) {
            (0, _) | (_, None) => None,
            (credits, Some(m)) => {
                // Month 0 keeps the key monthly plans always used.
                let suffix = if m.index == 0 {
                    String::new()
                } else {
                    format!(":m{}", m.index)
                };
                Some(Grant {
                    idempotency_key: format!(
                        "sub-allowance:{}:{cycle}{suffix}",
                        sub.subscription_id
                    ),
                    wallet_id: sub.account_id.clone(),
                    credits: u64::try_from(credits).unwrap_or(0),
                    expires_at: m.end,
                    reference: format!("subscription:{}:cycle{cycle}{suffix}", sub.subscription_id),
                })
            }
        };
        Ok(Some(Allowance {
            account_id: sub.account_id.clone(),
            cycle,
            index,
            month,
            credits: plan.monthly_credits,
            grant,
        }))
    }

    /// Grants one month in the wallet (the account's wallet: wallet id = account id).
    pub(super) async fn call_wallet(&self, allowance: &Allowance) -> GrantOutcome {
        let Some(grant) = &allowance.grant else {
            return GrantOutcome::Granted;
        };
        let account_id = &allowance.account_id;
        let Some(wallet) = &self.wallet else {
            // Not lost: the month waits (and is granted once the service runs with its peer).
            tracing::warn!(
                account = %account_id,
                "no wallet peer configured: the month's credits wait until one is"
            );
            return GrantOutcome::NoWallet;
        };
        let outcome = wallet.grant(grant).await;
        if outcome == GrantOutcome::NoWallet {
            tracing::warn!(
                account = %account_id,
                retry_in_seconds = WALLET_WAIT_RETRY_SECONDS,
                "no wallet for this account yet: the month's credits wait for it"
            );
        }
        outcome
    }

    /// C7 for many subscriptions (read without the lock, e.g. just renewed): see
    /// [`Subscriptions::charge_and_grant`]. Returns how many months of credits were recorded.
    pub async fn grant_many(&self, subs: Vec<SubscriptionRecord>) -> Result<usize, SubError> {
        self.charge_and_grant(Vec::new(), subs).await
    }
}
