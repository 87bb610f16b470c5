//! The use cases: each runs in write transactions on the locked subscription, with its
//! idempotency key, history and outbox events in the same transaction.
//!
//! A card payment never happens inside a transaction. Subscribe and an immediate change with a
//! card run in three steps: (1) a transaction marks the subscription (`incomplete`, or a
//! `pending_op` naming the change) so nothing else changes it meanwhile; (2) the gateway is
//! called with a key derived from the subscription, so a retry never charges twice; (3) a second
//! transaction applies the outcome and records the response under the request's key. A timeout
//! leaves the mark: a retry with the same key resumes it.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use prost::Message;
use proto::subscription::v1 as pb;
use proto::wallet::v1::credits_wallet_client::CreditsWalletClient;
use runtime::{
    Platform,
    client::PeerChannel,
    db::{Db, DbError},
    idempotency::{Claimed, IdempotencyKey},
};
use rust_decimal::Decimal;
use serde_json::json;
use shared::{BillingPeriod, ChargeOutcome, ChargeRequest, GatewayError, Money, PaymentGateway};
use sqlx::{Any, AnyConnection, Transaction};
use tonic::Status;

use crate::{
    convert::{self, ChangeRequest as ChangeAsked},
    domain::{
        self, Change, Plan, Selection, SendingRefusal, SendingState, Status as SubStatus, Target,
        Timing, TrialTerms,
    },
    error::SubError,
    model::{
        ChangeRequestRecord, InvoiceRecord, InvoiceStatus, PaymentKind, RequestStatus,
        SubscriptionRecord,
    },
    store,
    unit::Unit,
};

/// How long a preview stays valid.
pub const PREVIEW_TTL_SECONDS: i64 = 3600;

/// Who makes a request, as recorded in the history (S5): `user:<id>` or `service:<token>`.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// The system itself (renewals, trial ends).
pub fn system() -> Actor {
    Actor("system".into())
}

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

enum Begun<R> {
    Replay(Result<R, Status>),
    Fresh(Transaction<'static, Any>),
}

/// What a gateway call came to.
enum PaymentOutcome {
    Paid,
    Declined(String),
    Unknown,
}

/// The service's use cases.
#[derive(Clone)]
pub struct Subscriptions {
    db: Db,
    platform: Platform,
    gateway: Arc<dyn PaymentGateway>,
    wallet: Option<CreditsWalletClient<PeerChannel>>,
}

impl Subscriptions {
    /// The use cases on `platform`, paying through `gateway`, granting credits through `wallet`.
    pub fn new(
        platform: Platform,
        gateway: Arc<dyn PaymentGateway>,
        wallet: Option<CreditsWalletClient<PeerChannel>>,
    ) -> Self {
        Self {
            db: platform.db.clone(),
            platform,
            gateway,
            wallet,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.platform.clock.now()
    }

    async fn begin<R: Message + Default>(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Begun<R>, SubError> {
        let mut tx = self.db.begin_write().await?;
        match key.claim::<R>(&mut tx).await? {
            Claimed::Replay(r) => Ok(Begun::Replay(r)),
            Claimed::New => Ok(Begun::Fresh(tx)),
        }
    }

    /// Records `response` under `key` and commits.
    async fn finish<R: Message>(
        &self,
        mut tx: Transaction<'static, Any>,
        key: &IdempotencyKey,
        response: R,
    ) -> Result<R, SubError> {
        key.record(&mut tx, &response, self.now().timestamp_micros())
            .await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(response)
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Any>, SubError> {
        Ok(self.db.pool().acquire().await.map_err(DbError::from)?)
    }

    async fn plan(
        &self,
        conn: &mut AnyConnection,
        plan_id: &str,
        version: Option<u32>,
    ) -> Result<Plan, SubError> {
        store::plan(conn, plan_id, version)
            .await?
            .map(|(p, _)| p)
            .ok_or_else(|| {
                SubError::PlanNotFound(match version {
                    Some(v) => format!("{plan_id:?} version {v}"),
                    None => format!("{plan_id:?}"),
                })
            })
    }

    async fn view(
        &self,
        conn: &mut AnyConnection,
        sub: &SubscriptionRecord,
    ) -> Result<pb::Subscription, SubError> {
        let verified = store::account(conn, &sub.account_id).await?.verified;
        let plan = self
            .plan(conn, &sub.plan_id, Some(sub.plan_version))
            .await?;
        let price = domain::recurring_price(&plan, &sub.selection)?;
        let history = store::history(conn, &sub.subscription_id).await?;
        Ok(convert::subscription(sub, verified, Some(price), &history))
    }

    // ---- catalog --------------------------------------------------------------------------

    /// PublishPlan: the same plan id again makes version + 1.
    pub async fn publish_plan(
        &self,
        key: &IdempotencyKey,
        mut plan: Plan,
    ) -> Result<pb::Plan, SubError> {
        let mut tx = match self.begin::<pb::Plan>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        plan.version = store::next_plan_version(&mut tx, &plan.plan_id).await?;
        if !store::insert_plan(&mut tx, &plan, now).await? {
            return Err(SubError::Precondition(format!(
                "plan {} was published concurrently; retry",
                plan.plan_id
            )));
        }
        runtime::outbox::append(
            &mut tx,
            "subscription.plan_published",
            &plan.plan_id,
            &json!({"plan_id": plan.plan_id, "version": plan.version}),
            now.timestamp_micros(),
        )
        .await?;
        let response = convert::plan(&plan, now);
        self.finish(tx, key, response).await
    }

    /// GetPlan.
    pub async fn get_plan(
        &self,
        plan_id: &str,
        version: Option<u32>,
    ) -> Result<pb::Plan, SubError> {
        let mut conn = self.conn().await?;
        let (plan, at) = store::plan(&mut conn, plan_id, version)
            .await?
            .ok_or_else(|| SubError::PlanNotFound(format!("{plan_id:?}")))?;
        Ok(convert::plan(&plan, at))
    }

    /// ListPlans.
    pub async fn list_plans(
        &self,
        product: Option<domain::Product>,
        all_versions: bool,
    ) -> Result<pb::ListPlansResponse, SubError> {
        let plans = store::list_plans(&self.db, product, all_versions).await?;
        Ok(pb::ListPlansResponse {
            plans: plans.iter().map(|(p, at)| convert::plan(p, *at)).collect(),
        })
    }

    // ---- trial, subscribe, verify ---------------------------------------------------------

    /// StartTrial (S14): the plan's trial terms, or larger ones granted by hand.
    pub async fn start_trial(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
        plan_id: &str,
        contacts: Option<u64>,
        terms_override: Option<TrialTerms>,
    ) -> Result<pb::Subscription, SubError> {
        let mut tx = match self.begin::<pb::Subscription>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        let plan = self.plan(&mut tx, plan_id, None).await?;
        let terms = terms_override
            .or(plan.trial)
            .ok_or_else(|| SubError::Precondition(format!("plan {plan_id} offers no trial")))?;
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
        let response = self.view(&mut tx, &sub).await?;
        self.finish(tx, key, response).await
    }

    /// Subscribe (S15, S16, S17, S18).
    pub async fn subscribe(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        cmd: SubscribeCmd,
    ) -> Result<pb::Subscription, SubError> {
        let mut tx = match self.begin::<pb::Subscription>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
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
                let invoice_id = s
                    .pending_op
                    .as_deref()
                    .and_then(|op| op.rsplit(':').next())
                    .unwrap_or_default()
                    .to_string();
                tx.rollback().await?;
                return self
                    .pay_subscribe(key, actor, &cmd.account_id, &invoice_id)
                    .await;
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
                let response = self.view(&mut tx, &sub).await?;
                return self.finish(tx, key, response).await;
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
                self.start_paid(&mut unit, &plan, &selection, &cmd, key, prev);
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
                };
                let mut unit = Unit::create(sub, now);
                self.start_paid(
                    &mut unit,
                    &plan,
                    &selection,
                    &cmd,
                    key,
                    SubStatus::Incomplete,
                );
                let invoice = self
                    .issue_first(&mut tx, &mut unit, &plan, "subscribe")
                    .await?;
                (unit, invoice)
            }
        };
        let card = cmd.payment.kind == PaymentKind::Card && invoice.status == InvoiceStatus::Open;
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
            let response = self.view(&mut tx, &sub).await?;
            return self.finish(tx, key, response).await;
        }
        // "from:<status>:subscribe:<invoice>": what to go back to on a decline, and the invoice a
        // retry with the same key resumes.
        let from = unit.sub.pending_op.take().unwrap_or_default();
        unit.sub.pending_op = Some(format!("{from}:subscribe:{}", invoice.invoice_id));
        unit.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        self.pay_subscribe(key, actor, &cmd.account_id, &invoice.invoice_id)
            .await
    }

    fn start_paid(
        &self,
        unit: &mut Unit,
        plan: &Plan,
        selection: &Selection,
        cmd: &SubscribeCmd,
        key: &IdempotencyKey,
        previous: SubStatus,
    ) {
        let now = unit.now;
        let s = &mut unit.sub;
        s.plan_id = plan.plan_id.clone();
        s.plan_version = plan.version;
        s.selection = selection.clone();
        s.payment_kind = cmd.payment.kind;
        s.payment_method = cmd.payment.method.clone();
        s.vat_rate = cmd.vat_rate;
        s.status = SubStatus::Incomplete;
        s.anchor = now;
        s.period_index = 0;
        s.cycle += 1;
        s.period_start = now;
        s.period_end = shared::period_start(now, plan.interval, 1).unwrap_or(now);
        s.cancel_at_period_end = false;
        s.scheduled.clear();
        s.revision += 1;
        s.origin_key = Some(key.key().to_string());
        s.allowance_cycle = if plan.monthly_credits > 0 {
            s.cycle - 1
        } else {
            s.cycle
        };
        // Remember what to go back to if the first card payment is declined.
        s.pending_op = Some(format!("from:{}", previous.as_str()));
    }

    async fn issue_first(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
        plan: &Plan,
        kind: &str,
    ) -> Result<InvoiceRecord, SubError> {
        let lines = domain::recurring_lines(plan, &unit.sub.selection)?;
        let bill = domain::bill(lines, plan.currency, unit.sub.vat_rate)?;
        let cycle = unit.sub.cycle;
        let mut invoice = unit
            .issue(tx, &self.db, kind, Some(cycle), bill, false)
            .await?;
        if invoice.next_attempt_at.is_some() {
            // Subscribe charges this invoice itself (below), not the collector.
            invoice.next_attempt_at = None;
            store::update_invoice_payment(tx, &invoice).await?;
        }
        Ok(invoice)
    }

    /// Steps 2 and 3 of a card Subscribe.
    async fn pay_subscribe(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
        invoice_id: &str,
    ) -> Result<pb::Subscription, SubError> {
        let invoice = {
            let mut conn = self.conn().await?;
            store::invoice(&mut conn, &self.db, invoice_id, false)
                .await?
                .ok_or_else(|| SubError::InvoiceNotFound(invoice_id.to_string()))?
        };
        let outcome = self
            .charge(&invoice, &format!("{}:1", invoice.invoice_id))
            .await;
        let mut tx = match self.begin::<pb::Subscription>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        let mut invoice = store::invoice(&mut tx, &self.db, invoice_id, true)
            .await?
            .ok_or_else(|| SubError::InvoiceNotFound(invoice_id.to_string()))?;
        if unit.sub.status != SubStatus::Incomplete {
            return Err(SubError::Precondition(
                "the subscription changed while its payment was in flight".into(),
            ));
        }
        match outcome {
            PaymentOutcome::Unknown => {
                tx.rollback().await?;
                Err(SubError::PaymentOutcomeUnknown)
            }
            PaymentOutcome::Paid => {
                invoice.status = InvoiceStatus::Paid;
                invoice.payment_attempts = 1;
                invoice.paid_at = Some(unit.now);
                store::update_invoice_payment(&mut tx, &invoice).await?;
                let from = unit.sub.pending_op.take().unwrap_or_default();
                unit.sub.status = SubStatus::Active;
                // S12/S17: a returning account's pending contacts fit the new tier.
                self.promote(&mut unit);
                unit.record(
                    &actor.0,
                    "subscribed",
                    format!(
                        "plan {} v{}, {} contacts, card; invoice {} paid",
                        unit.sub.plan_id,
                        unit.sub.plan_version,
                        unit.sub.selection.contacts,
                        invoice.number
                    ),
                );
                unit.event(
                    "subscription.started",
                    json!({"plan_id": unit.sub.plan_id, "payment": "card", "resumed_from": from}),
                );
                let sub = unit.save(&mut tx).await?;
                let response = self.view(&mut tx, &sub).await?;
                self.finish(tx, key, response).await
            }
            PaymentOutcome::Declined(reason) => {
                invoice.status = InvoiceStatus::Void;
                invoice.payment_attempts = 1;
                store::update_invoice_payment(&mut tx, &invoice).await?;
                let from = unit
                    .sub
                    .pending_op
                    .as_deref()
                    .and_then(|op| op.strip_prefix("from:"))
                    .and_then(|s| s.split(':').next())
                    .and_then(SubStatus::parse)
                    .unwrap_or(SubStatus::Incomplete);
                runtime::outbox::append(
                    &mut tx,
                    "subscription.payment_failed",
                    &unit.sub.subscription_id,
                    &json!({"account_id": account_id, "invoice_id": invoice_id, "reason": reason, "final": true}),
                    unit.now.timestamp_micros(),
                )
                .await?;
                if from == SubStatus::Incomplete {
                    store::delete_subscription(&mut tx, &unit.sub.subscription_id).await?;
                } else {
                    unit.sub.status = from;
                    unit.sub.pending_op = None;
                    unit.record(&actor.0, "payment_declined", reason.clone());
                    unit.save(&mut tx).await?;
                }
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
        }
    }

    /// GetSubscription.
    pub async fn get_subscription(&self, account_id: &str) -> Result<pb::Subscription, SubError> {
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
    ) -> Result<pb::VerifyAccountResponse, SubError> {
        let mut tx = match self.begin::<pb::VerifyAccountResponse>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
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
        let response = pb::VerifyAccountResponse {
            account_id: account_id.to_string(),
            verified: account.verified,
            verified_at: account.verified_at.map(runtime::convert::timestamp),
        };
        self.finish(tx, key, response).await
    }

    // ---- contacts -------------------------------------------------------------------------

    /// AdmitContacts (S1, S11, S12): up to the limit subscribed, the rest pending upgrade. The
    /// plan never changes by itself.
    pub async fn admit_contacts(
        &self,
        key: &IdempotencyKey,
        account_id: &str,
        n: u64,
    ) -> Result<pb::AdmitContactsResponse, SubError> {
        let mut tx = match self.begin::<pb::AdmitContactsResponse>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        if matches!(
            unit.sub.status,
            SubStatus::Cancelled | SubStatus::TrialExpired
        ) {
            return Err(SubError::Precondition(format!(
                "the subscription is {}: no contacts can be added",
                unit.sub.status.as_str()
            )));
        }
        let (subscribed, pending) =
            domain::admit(unit.sub.contact_limit(), unit.sub.active_contacts, n);
        unit.sub.active_contacts += subscribed;
        unit.sub.pending_contacts += pending;
        if pending > 0 {
            unit.event(
                "subscription.contact_limit_reached",
                json!({"pending_upgrade": pending, "limit": unit.sub.contact_limit()}),
            );
        }
        let sub = unit.save(&mut tx).await?;
        let response = pb::AdmitContactsResponse {
            subscribed,
            pending_upgrade: pending,
            usage: Some(convert::usage(&sub)),
        };
        self.finish(tx, key, response).await
    }

    /// ReleaseContacts (S1).
    pub async fn release_contacts(
        &self,
        key: &IdempotencyKey,
        account_id: &str,
        subscribed: u64,
        pending: u64,
    ) -> Result<pb::ContactUsage, SubError> {
        let mut tx = match self.begin::<pb::ContactUsage>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        if subscribed > unit.sub.active_contacts {
            return Err(SubError::invalid(
                "subscribed",
                format!("only {} contacts are active", unit.sub.active_contacts),
            ));
        }
        if pending > unit.sub.pending_contacts {
            return Err(SubError::invalid(
                "pending",
                format!("only {} contacts are pending", unit.sub.pending_contacts),
            ));
        }
        unit.sub.active_contacts -= subscribed;
        unit.sub.pending_contacts -= pending;
        let sub = unit.save(&mut tx).await?;
        self.finish(tx, key, convert::usage(&sub)).await
    }

    /// GetContactUsage.
    pub async fn contact_usage(&self, account_id: &str) -> Result<pb::ContactUsage, SubError> {
        let mut conn = self.conn().await?;
        let sub = store::read_subscription(&mut conn, account_id)
            .await?
            .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
        Ok(convert::usage(&sub))
    }

    /// S12: pending contacts become subscribed as far as the limit allows.
    fn promote(&self, unit: &mut Unit) -> u64 {
        let n = domain::promote(
            unit.sub.contact_limit(),
            unit.sub.active_contacts,
            unit.sub.pending_contacts,
        );
        if n > 0 {
            unit.sub.active_contacts += n;
            unit.sub.pending_contacts -= n;
            unit.event(
                "subscription.contacts_promoted",
                json!({"count": n, "limit": unit.sub.contact_limit()}),
            );
        }
        n
    }

    // ---- changes --------------------------------------------------------------------------

    async fn resolve(
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

    fn changeable(sub: &SubscriptionRecord) -> Result<(), SubError> {
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

    fn period(sub: &SubscriptionRecord) -> BillingPeriod {
        BillingPeriod {
            start: sub.period_start,
            end: sub.period_end,
        }
    }

    /// The target of a change and, for an immediate one, its quote at `at` (S6-S10, S19).
    fn evaluate(
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
    ) -> Result<pb::ChangePreview, SubError> {
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
        let token = format!(
            "{}.{}.{}",
            sub.revision,
            now.timestamp_micros(),
            due.to_minor_units()
                .map_err(|e| SubError::Arithmetic(e.to_string()))?
        );
        Ok(pb::ChangePreview {
            preview_token: token,
            change: Some(convert::change(&change)),
            timing: convert::timing(target.timing) as i32,
            effective_at: match target.timing {
                Timing::Immediate => Some(runtime::convert::timestamp(now)),
                Timing::NextCycle => Some(runtime::convert::timestamp(sub.period_end)),
                Timing::ChangeRequest => None,
            },
            lines: bill
                .as_ref()
                .map(|b| convert::lines(&b.lines))
                .unwrap_or_default(),
            subtotal: Some(convert::money(&bill.as_ref().map_or(zero, |b| b.subtotal))),
            vat: Some(convert::money(&bill.as_ref().map_or(zero, |b| b.vat))),
            amount_due_today: Some(convert::money(&due)),
            new_recurring_price: Some(convert::money(&new_recurring)),
            expires_at: Some(runtime::convert::timestamp(
                now + Duration::seconds(PREVIEW_TTL_SECONDS),
            )),
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
    ) -> Result<pb::ApplyChangeResponse, SubError> {
        let (revision, at_us, amount_minor) = parse_token(token)?;
        let at = runtime::clock::from_micros(at_us);
        let mut tx = match self.begin::<pb::ApplyChangeResponse>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, now).await?;
        let op = format!("change:{revision}:{at_us}:{}", key.key());
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
                let response = pb::ApplyChangeResponse {
                    timing: pb::ChangeTiming::ChangeRequest as i32,
                    effective_at: None,
                    subscription: Some(self.view(&mut tx, &sub).await?),
                    invoice: None,
                    change_request: Some(convert::request(&request)),
                    contacts_promoted: 0,
                };
                self.finish(tx, key, response).await
            }
            Timing::NextCycle => {
                let effective = self.schedule(&mut unit, actor, &change);
                let sub = unit.save(&mut tx).await?;
                let response = pb::ApplyChangeResponse {
                    timing: pb::ChangeTiming::NextCycle as i32,
                    effective_at: Some(runtime::convert::timestamp(effective)),
                    subscription: Some(self.view(&mut tx, &sub).await?),
                    invoice: None,
                    change_request: None,
                    contacts_promoted: 0,
                };
                self.finish(tx, key, response).await
            }
            Timing::Immediate => {
                let Some(quote) = quote else {
                    return Err(SubError::Arithmetic(
                        "an immediate change without a quote".into(),
                    ));
                };
                let card = unit.sub.payment_kind == PaymentKind::Card && due.is_positive();
                if !card {
                    let (invoice, promoted) = self
                        .apply_upgrade(&mut tx, &mut unit, actor, &change, target, quote, at, false)
                        .await?;
                    let sub = unit.save(&mut tx).await?;
                    let response = self.applied(&mut tx, &sub, invoice, promoted, at).await?;
                    return self.finish(tx, key, response).await;
                }
                let sub_id = unit.sub.subscription_id.clone();
                let method = unit.sub.payment_method.clone();
                // Step 1: mark the subscription so nothing else changes it while paying.
                if !resuming {
                    unit.sub.pending_op = Some(op.clone());
                    unit.save(&mut tx).await?;
                    tx.commit().await?;
                } else {
                    tx.rollback().await?;
                }
                // Step 2: the gateway, keyed by subscription and revision.
                let request = ChargeRequest {
                    idempotency_key: format!("{sub_id}:change:{revision}"),
                    payment_method: method,
                    amount: due,
                    description: format!("change of subscription of {account_id}: {change}"),
                    requested_at: now,
                };
                let outcome = self.gateway_charge(&request).await;
                // Step 3: apply the outcome.
                let mut tx = match self.begin::<pb::ApplyChangeResponse>(key).await? {
                    Begun::Replay(r) => return r.map_err(SubError::Replayed),
                    Begun::Fresh(tx) => tx,
                };
                let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
                if unit.sub.pending_op.as_deref() != Some(op.as_str()) {
                    return Err(SubError::Precondition(
                        "the subscription changed while the payment was in flight".into(),
                    ));
                }
                match outcome {
                    PaymentOutcome::Unknown => {
                        tx.rollback().await?;
                        Err(SubError::PaymentOutcomeUnknown)
                    }
                    PaymentOutcome::Declined(reason) => {
                        unit.sub.pending_op = None;
                        unit.record(
                            &actor.0,
                            "change_payment_declined",
                            format!("{change}: {reason}"),
                        );
                        unit.event(
                            "subscription.payment_failed",
                            json!({"reason": reason, "change": change.to_string(), "final": true}),
                        );
                        unit.save(&mut tx).await?;
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
                    PaymentOutcome::Paid => {
                        unit.sub.pending_op = None;
                        let (invoice, promoted) = self
                            .apply_upgrade(
                                &mut tx, &mut unit, actor, &change, target, quote, at, true,
                            )
                            .await?;
                        let sub = unit.save(&mut tx).await?;
                        let response = self.applied(&mut tx, &sub, invoice, promoted, at).await?;
                        self.finish(tx, key, response).await
                    }
                }
            }
        }
    }

    async fn applied(
        &self,
        conn: &mut AnyConnection,
        sub: &SubscriptionRecord,
        invoice: InvoiceRecord,
        promoted: u64,
        at: DateTime<Utc>,
    ) -> Result<pb::ApplyChangeResponse, SubError> {
        Ok(pb::ApplyChangeResponse {
            timing: pb::ChangeTiming::Immediate as i32,
            effective_at: Some(runtime::convert::timestamp(at)),
            subscription: Some(self.view(conn, sub).await?),
            invoice: Some(convert::invoice(&invoice)),
            change_request: None,
            contacts_promoted: promoted,
        })
    }

    /// S7/S8: the upgrade takes effect now; its invoice carries the proration lines; pending
    /// contacts are promoted up to the new limit (S12).
    #[allow(clippy::too_many_arguments)]
    async fn apply_upgrade(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
        actor: &Actor,
        change: &Change,
        target: Target,
        quote: domain::UpgradeQuote,
        at: DateTime<Utc>,
        paid: bool,
    ) -> Result<(InvoiceRecord, u64), SubError> {
        let s = &mut unit.sub;
        s.plan_id = target.plan.plan_id.clone();
        s.plan_version = target.plan.version;
        s.selection = target.selection;
        s.revision += 1;
        if quote.restarts_period {
            // S8: a new full period starts on the day of the upgrade.
            s.anchor = at;
            s.period_index = 0;
            s.cycle += 1;
            s.period_start = at;
            s.period_end = shared::period_start(at, target.plan.interval, 1)
                .map_err(|e| SubError::Arithmetic(e.to_string()))?;
            if target.plan.monthly_credits == 0 {
                s.allowance_cycle = s.cycle;
            }
        }
        let cycle = quote.restarts_period.then_some(s.cycle);
        let invoice = unit
            .issue(tx, &self.db, "change", cycle, quote.bill, paid)
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

    fn schedule(&self, unit: &mut Unit, actor: &Actor, change: &Change) -> DateTime<Utc> {
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

    async fn file_request(
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
    ) -> Result<pb::CancelAddOnResponse, SubError> {
        let mut tx = match self.begin::<pb::CancelAddOnResponse>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
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
                "add-on {code} already ends at the next cycle"
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
        let response = pb::CancelAddOnResponse {
            effective_at: effective.map(runtime::convert::timestamp),
            subscription: Some(self.view(&mut tx, &sub).await?),
            change_request: request.as_ref().map(convert::request),
        };
        self.finish(tx, key, response).await
    }

    /// Cancel (S13): no renewal; usable until the end of the paid period.
    pub async fn cancel(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
        resume: bool,
    ) -> Result<pb::Subscription, SubError> {
        let mut tx = match self.begin::<pb::Subscription>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
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
        let response = self.view(&mut tx, &sub).await?;
        self.finish(tx, key, response).await
    }

    /// ListChangeRequests.
    pub async fn list_requests(
        &self,
        account_id: &str,
        open_only: bool,
    ) -> Result<pb::ListChangeRequestsResponse, SubError> {
        let rows = store::requests(&self.db, account_id, open_only).await?;
        Ok(pb::ListChangeRequestsResponse {
            change_requests: rows.iter().map(convert::request).collect(),
        })
    }

    /// ResolveChangeRequest (S10): staff approve (scheduled for the next cycle) or reject.
    pub async fn resolve_request(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        request_id: &str,
        approve: bool,
        note: &str,
    ) -> Result<pb::ChangeRequest, SubError> {
        let mut tx = match self.begin::<pb::ChangeRequest>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
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
                "change request {request_id} is already {}",
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
        self.finish(tx, key, convert::request(&request)).await
    }

    // ---- invoices -------------------------------------------------------------------------

    /// ListInvoices.
    pub async fn list_invoices(
        &self,
        account_id: &str,
    ) -> Result<pb::ListInvoicesResponse, SubError> {
        let mut conn = self.conn().await?;
        let rows = store::invoices_of(&mut conn, account_id).await?;
        Ok(pb::ListInvoicesResponse {
            invoices: rows.iter().map(convert::invoice).collect(),
        })
    }

    /// GetInvoice.
    pub async fn get_invoice(&self, invoice_id: &str) -> Result<pb::Invoice, SubError> {
        let mut conn = self.conn().await?;
        store::invoice(&mut conn, &self.db, invoice_id, false)
            .await?
            .map(|i| convert::invoice(&i))
            .ok_or_else(|| SubError::InvoiceNotFound(invoice_id.to_string()))
    }

    /// RecordBankTransfer (S18): the money for an open bank-transfer invoice arrived.
    pub async fn record_bank_transfer(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        invoice_id: &str,
        amount: Money,
    ) -> Result<pb::Invoice, SubError> {
        let mut tx = match self.begin::<pb::Invoice>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let found = store::invoice(&mut tx, &self.db, invoice_id, false)
            .await?
            .ok_or_else(|| SubError::InvoiceNotFound(invoice_id.to_string()))?;
        let mut unit = Unit::lock(&mut tx, &self.db, &found.account_id, self.now()).await?;
        let mut invoice = store::invoice(&mut tx, &self.db, invoice_id, true)
            .await?
            .ok_or_else(|| SubError::InvoiceNotFound(invoice_id.to_string()))?;
        if invoice.status != InvoiceStatus::Open
            || invoice.payment_kind != PaymentKind::BankTransfer
        {
            return Err(SubError::Precondition(format!(
                "invoice {} is {} and paid by {}: no bank transfer is awaited",
                invoice.number,
                invoice.status.as_str(),
                invoice.payment_kind.as_str()
            )));
        }
        if amount != invoice.total {
            return Err(SubError::invalid(
                "amount",
                format!("the invoice total is {}", invoice.total),
            ));
        }
        invoice.status = InvoiceStatus::Paid;
        invoice.paid_at = Some(unit.now);
        store::update_invoice_payment(&mut tx, &invoice).await?;
        unit.record(
            &actor.0,
            "bank_transfer_received",
            format!("invoice {} paid: {}", invoice.number, invoice.total),
        );
        unit.event(
            "subscription.invoice_paid",
            json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
        );
        unit.save(&mut tx).await?;
        self.finish(tx, key, convert::invoice(&invoice)).await
    }

    // ---- sending --------------------------------------------------------------------------

    async fn decision(
        &self,
        conn: &mut AnyConnection,
        sub: Option<&SubscriptionRecord>,
        mails: u64,
    ) -> Result<pb::SendingDecision, SubError> {
        let now = self.now();
        let Some(sub) = sub else {
            return Ok(refused(SendingRefusal::NoSubscription, 0));
        };
        // What the jobs will record at the period or trial end counts from that instant.
        let mut status = sub.status;
        if status.is_live() && sub.cancel_at_period_end && now >= sub.period_end {
            status = SubStatus::Cancelled;
        }
        if status == SubStatus::Trialing
            && sub.trial_ends_at.is_some_and(|t| now >= t)
            && !store::account(conn, &sub.account_id).await?.verified
        {
            status = SubStatus::TrialExpired;
        }
        let free = sub.trial.map_or(0, |t| t.free_mails);
        let left = if status == SubStatus::Trialing && free > 0 {
            free.saturating_sub(sub.trial_mails_sent)
        } else {
            0
        };
        let state = SendingState {
            status,
            trial_mails_sent: sub.trial_mails_sent,
            trial_free_mails: free,
            unpaid_bank_transfer: store::has_unpaid_bank_transfer(conn, &sub.account_id).await?,
        };
        Ok(match domain::may_send(&state, mails) {
            Ok(()) => pb::SendingDecision {
                allowed: true,
                refusal: pb::SendingRefusal::Unspecified as i32,
                message: String::new(),
                trial_mails_left: left,
            },
            Err(r) => refused(r, left),
        })
    }

    /// CheckSending (S2, S13, S14, S16, S18).
    pub async fn check_sending(
        &self,
        account_id: &str,
        mails: u64,
    ) -> Result<pb::SendingDecision, SubError> {
        let mut conn = self.conn().await?;
        let sub = store::read_subscription(&mut conn, account_id).await?;
        self.decision(&mut conn, sub.as_ref(), mails).await
    }

    /// RecordMailsSent (S14): counts against the trial's free mails.
    pub async fn record_mails_sent(
        &self,
        key: &IdempotencyKey,
        account_id: &str,
        mails: u64,
    ) -> Result<pb::SendingDecision, SubError> {
        let mut tx = match self.begin::<pb::SendingDecision>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        if unit.sub.status == SubStatus::Trialing {
            unit.sub.trial_mails_sent = unit.sub.trial_mails_sent.saturating_add(mails);
        }
        let sub = unit.save(&mut tx).await?;
        let response = self.decision(&mut tx, Some(&sub), 0).await?;
        self.finish(tx, key, response).await
    }

    // ---- payments -------------------------------------------------------------------------

    async fn charge(&self, invoice: &InvoiceRecord, gateway_key: &str) -> PaymentOutcome {
        let request = ChargeRequest {
            idempotency_key: gateway_key.to_string(),
            payment_method: invoice.payment_method.clone(),
            amount: invoice.total,
            description: format!("invoice {}", invoice.number),
            requested_at: self.now(),
        };
        self.gateway_charge(&request).await
    }

    async fn gateway_charge(&self, request: &ChargeRequest) -> PaymentOutcome {
        match self.gateway.charge(request).await {
            Ok(ChargeOutcome::Succeeded { .. } | ChargeOutcome::Pending { .. }) => {
                PaymentOutcome::Paid
            }
            Ok(ChargeOutcome::Declined { reason }) => PaymentOutcome::Declined(reason.to_string()),
            Err(GatewayError::Timeout) => {
                tracing::warn!(key = %request.idempotency_key, "gateway timed out; outcome unknown");
                PaymentOutcome::Unknown
            }
            Err(e) => PaymentOutcome::Declined(e.to_string()),
        }
    }

    // ---- renewal (driven by the jobs) -----------------------------------------------------

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
    async fn advance_once(&self, account_id: &str) -> Result<bool, SubError> {
        let mut tx = self.db.begin_write().await?;
        let now = self.now();
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, now).await?;
        if unit.sub.pending_op.is_some() {
            tx.rollback().await?;
            return Ok(false);
        }
        let actor = system();
        let changed = match unit.sub.status {
            SubStatus::Trialing => self.trial_step(&mut tx, &mut unit, &actor).await?,
            SubStatus::Active | SubStatus::PastDue if now >= unit.sub.period_end => {
                self.renew(&mut tx, &mut unit, &actor).await?;
                true
            }
            _ => false,
        };
        if changed {
            unit.save(&mut tx).await?;
            tx.commit().await?;
            self.platform.outbox.poke();
        } else {
            tx.rollback().await?;
        }
        Ok(changed)
    }

    async fn trial_step(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
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
        s.anchor = ends;
        s.period_index = 0;
        s.cycle += 1;
        s.period_start = ends;
        s.period_end = shared::period_start(ends, plan.interval, 1)
            .map_err(|e| SubError::Arithmetic(e.to_string()))?;
        s.revision += 1;
        s.allowance_cycle = if plan.monthly_credits > 0 {
            s.cycle - 1
        } else {
            s.cycle
        };
        let lines = domain::recurring_lines(&plan, &unit.sub.selection)?;
        let bill = domain::bill(lines, plan.currency, unit.sub.vat_rate)?;
        let cycle = unit.sub.cycle;
        let invoice = unit
            .issue(tx, &self.db, "conversion", Some(cycle), bill, false)
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

    async fn renew(
        &self,
        tx: &mut Transaction<'static, Any>,
        unit: &mut Unit,
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
        s.period_index += 1;
        let period = BillingPeriod::nth(s.anchor, plan.interval, s.period_index)
            .map_err(|e| SubError::Arithmetic(e.to_string()))?;
        s.period_start = period.start;
        s.period_end = period.end;
        s.cycle += 1;
        s.revision += 1;
        if plan.monthly_credits == 0 {
            s.allowance_cycle = s.cycle;
        }
        let lines = domain::recurring_lines(&plan, &unit.sub.selection)?;
        let bill = domain::bill(lines, plan.currency, unit.sub.vat_rate)?;
        let cycle = unit.sub.cycle;
        let invoice = unit
            .issue(tx, &self.db, "renewal", Some(cycle), bill, false)
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

    /// C7: the plan's credits for the current cycle, granted in the wallet, expiring at the
    /// period end. Keyed by subscription and cycle, so a retry never grants twice.
    async fn grant_allowance(&self, account_id: &str) -> Result<(), SubError> {
        let sub = {
            let mut conn = self.conn().await?;
            match store::read_subscription(&mut conn, account_id).await? {
                Some(s) => s,
                None => return Ok(()),
            }
        };
        if sub.allowance_cycle >= sub.cycle
            || !matches!(sub.status, SubStatus::Active | SubStatus::PastDue)
        {
            return Ok(());
        }
        let plan = {
            let mut conn = self.conn().await?;
            self.plan(&mut conn, &sub.plan_id, Some(sub.plan_version))
                .await?
        };
        let cycle = sub.cycle;
        let granted = match (&self.wallet, plan.monthly_credits) {
            (_, 0) => true,
            (None, _) => {
                tracing::warn!(account = %account_id, cycle, "no wallet peer configured: subscription credits not granted");
                true
            }
            (Some(wallet), credits) if sub.period_end > self.now() => {
                let request = proto::wallet::v1::GrantCreditsRequest {
                    idempotency_key: format!("sub-allowance:{}:{cycle}", sub.subscription_id),
                    wallet_id: account_id.to_string(),
                    credits: u64::try_from(credits).unwrap_or(0),
                    kind: proto::wallet::v1::LotKind::SubscriptionAllowance as i32,
                    expires_at: Some(runtime::convert::timestamp(sub.period_end)),
                    reference: format!("subscription:{}:cycle{cycle}", sub.subscription_id),
                };
                match wallet.clone().grant_credits(request).await {
                    Ok(_) => true,
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        tracing::warn!(account = %account_id, "no wallet for this account: subscription credits not granted");
                        true
                    }
                    Err(status) => {
                        tracing::warn!(account = %account_id, error = %status, "granting subscription credits failed; will retry");
                        false
                    }
                }
            }
            // The period is already over: its credits would expire at once.
            (Some(_), _) => true,
        };
        if !granted {
            return Ok(());
        }
        let mut tx = self.db.begin_write().await?;
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        if unit.sub.allowance_cycle < cycle {
            unit.sub.allowance_cycle = cycle;
            if plan.monthly_credits > 0 && self.wallet.is_some() {
                unit.event(
                    "subscription.credits_granted",
                    json!({"credits": plan.monthly_credits, "cycle": cycle}),
                );
            }
            unit.save(&mut tx).await?;
            tx.commit().await?;
            self.platform.outbox.poke();
        } else {
            tx.rollback().await?;
        }
        Ok(())
    }

    /// One card attempt on an open invoice (renewals, conversions, retries): paid, or past
    /// due with a retry, or suspended when retries are used up.
    pub async fn collect(&self, invoice_id: &str) -> Result<(), SubError> {
        let invoice = {
            let mut conn = self.conn().await?;
            match store::invoice(&mut conn, &self.db, invoice_id, false).await? {
                Some(i) => i,
                None => return Ok(()),
            }
        };
        let attempt = invoice.payment_attempts + 1;
        let outcome = self
            .charge(&invoice, &format!("{}:{attempt}", invoice.invoice_id))
            .await;
        if matches!(outcome, PaymentOutcome::Unknown) {
            return Ok(());
        }
        let mut tx = self.db.begin_write().await?;
        let now = self.now();
        let mut unit = Unit::lock(&mut tx, &self.db, &invoice.account_id, now).await?;
        let mut invoice = match store::invoice(&mut tx, &self.db, invoice_id, true).await? {
            Some(i) if i.status == InvoiceStatus::Open && i.payment_attempts + 1 == attempt => i,
            _ => {
                tx.rollback().await?;
                return Ok(());
            }
        };
        invoice.payment_attempts = attempt;
        let actor = system();
        match outcome {
            PaymentOutcome::Paid | PaymentOutcome::Unknown => {
                invoice.status = InvoiceStatus::Paid;
                invoice.paid_at = Some(now);
                invoice.next_attempt_at = None;
                if matches!(unit.sub.status, SubStatus::PastDue | SubStatus::Suspended) {
                    unit.sub.status = SubStatus::Active;
                }
                unit.record(
                    &actor.0,
                    "payment_succeeded",
                    format!("invoice {}", invoice.number),
                );
                unit.event(
                    "subscription.invoice_paid",
                    json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
                );
            }
            PaymentOutcome::Declined(reason) => {
                invoice.next_attempt_at = domain::next_retry(attempt, now);
                let last = invoice.next_attempt_at.is_none();
                if unit.sub.status.is_live() {
                    unit.sub.status = if last {
                        SubStatus::Suspended
                    } else {
                        SubStatus::PastDue
                    };
                }
                unit.record(
                    &actor.0,
                    "payment_failed",
                    format!("invoice {} attempt {attempt}: {reason}", invoice.number),
                );
                unit.event(
                    "subscription.payment_failed",
                    json!({"invoice_id": invoice.invoice_id, "attempt": attempt, "reason": reason, "final": last}),
                );
            }
        }
        store::update_invoice_payment(&mut tx, &invoice).await?;
        unit.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(())
    }
}

fn refused(r: SendingRefusal, left: u64) -> pb::SendingDecision {
    let refusal = match r {
        SendingRefusal::NoSubscription => pb::SendingRefusal::NoSubscription,
        SendingRefusal::TrialMailCap => pb::SendingRefusal::TrialMailCap,
        SendingRefusal::BankTransferUnpaid => pb::SendingRefusal::BankTransferUnpaid,
        SendingRefusal::TrialOverNotVerified => pb::SendingRefusal::TrialOverNotVerified,
        SendingRefusal::Cancelled => pb::SendingRefusal::Cancelled,
        SendingRefusal::PaymentPastDue => pb::SendingRefusal::PaymentPastDue,
        SendingRefusal::PaymentPending => pb::SendingRefusal::PaymentPending,
    };
    pb::SendingDecision {
        allowed: false,
        refusal: refusal as i32,
        message: r.message().to_string(),
        trial_mails_left: left,
    }
}

/// `revision.at_micros.amount_minor`.
fn parse_token(token: &str) -> Result<(i64, i64, i64), SubError> {
    let bad = || SubError::invalid("preview_token", "is not a token from PreviewChange");
    let mut parts = token.split('.');
    let mut next =
        || -> Result<i64, SubError> { parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad) };
    let t = (next()?, next()?, next()?);
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(t)
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
