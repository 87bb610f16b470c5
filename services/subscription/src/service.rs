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

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, PoisonError},
};

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
use shared::{
    BillingPeriod, ChargeOutcome, ChargeRequest, ChargeStatus, Currency, GatewayError, Money,
    PaymentGateway,
};
use sqlx::{Any, AnyConnection, Transaction};
use tonic::Status;

use futures::{StreamExt, stream};

use crate::{
    convert::{self, ChangeRequest as ChangeAsked},
    domain::{
        self, Change, Plan, Selection, SendingRefusal, SendingState, Status as SubStatus, Target,
        Timing, TrialTerms,
    },
    error::SubError,
    model::{
        ChangeRequestRecord, InvoiceRecord, InvoiceStatus, PaymentKind, PaymentOp, PaymentPurpose,
        RequestStatus, SubscriptionRecord,
    },
    store::{self, InvoiceNumbers},
    unit::{Charged, Unit, Writes},
};

/// How long a preview stays valid.
pub const PREVIEW_TTL_SECONDS: i64 = 3600;

/// How long a request's payment with an unknown outcome is left to the client's retry (with
/// the same idempotency key) before the jobs finish it themselves.
pub const RECONCILE_AFTER_SECONDS: i64 = 60;

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
    /// A direct debit accepted: it settles (or comes back) days later.
    Pending,
    Declined(String),
    Unknown,
}

impl PaymentOutcome {
    /// What [`PaymentOp::outcome`] records.
    fn recorded(&self) -> Option<String> {
        match self {
            PaymentOutcome::Paid => Some("paid".into()),
            PaymentOutcome::Pending => Some("pending".into()),
            PaymentOutcome::Declined(r) => Some(format!("{DECLINED}{r}")),
            PaymentOutcome::Unknown => None,
        }
    }
}

const DECLINED: &str = "declined: ";

/// The reason a finished payment was declined for, if it was.
fn declined(op: &PaymentOp) -> Option<&str> {
    op.outcome.as_deref().and_then(|o| o.strip_prefix(DECLINED))
}

/// How applying a request's payment outcome went.
enum Finished {
    /// Applied now.
    Applied,
    /// Declined: applied now (nothing changed but the mark).
    Declined(String),
    /// Applied before (by the request or the jobs), or not this payment's turn.
    Earlier,
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
    wallet: Option<CreditsWalletClient<PeerChannel>>,
    plans: PlanCache,
    /// The key preview tokens are signed with (read once from the database, where the
    /// migration generated it, so every replica and restart shares it).
    token_key: Arc<tokio::sync::OnceCell<Vec<u8>>>,
}

/// Gateway charges and wallet grants a batch runs at once (bounded, so a slow provider or
/// wallet sees a fixed number of calls in flight per replica).
const CONCURRENT_CALLS: usize = 32;

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

/// What the wallet said to a month's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrantOutcome {
    /// Granted (or nothing to call: no credits, or the month is over).
    Granted,
    /// The account has no wallet yet: the month waits for it.
    NoWallet,
    /// Unreachable or refused otherwise: asked again on the next pass.
    Failed,
}

/// A month of plan credits due in the wallet (C7), computed from a subscription read without
/// the lock and applied under it only if the subscription is still in that cycle.
struct Allowance {
    account_id: String,
    cycle: i64,
    /// Month index within the cycle recorded once granted.
    index: i64,
    month: Option<domain::AllowanceMonth>,
    credits: i64,
    /// The wallet call, when there is one to make.
    request: Option<proto::wallet::v1::GrantCreditsRequest>,
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
            plans: PlanCache::default(),
            token_key: Arc::default(),
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
            .ok_or_else(|| SubError::PlanNotFound(shared::limits::quoted(plan_id).to_string()))?;
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
                );
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
            let response = self.view(&mut tx, &sub).await?;
            return self.finish(tx, key, response).await;
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
        s.allowance_next = None;
        s.allowance_wait = None;
        s.payment_op = None;
        s.payment_since = None;
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
        // Subscribe charges this invoice itself (below), not the collector: issued with no
        // attempt due (rather than updated after the insert).
        unit.charged_by_caller();
        unit.issue(tx, &self.db, kind, Some(cycle), bill, None)
            .await
    }

    /// Steps 2 and 3 of a card or direct-debit Subscribe: the gateway with the payment's key,
    /// then its outcome applied (unless the jobs applied it meanwhile) and the answer recorded.
    async fn pay_subscribe(
        &self,
        key: &IdempotencyKey,
        account_id: &str,
    ) -> Result<pb::Subscription, SubError> {
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
        let mut tx = match self.begin::<pb::Subscription>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        match self.finish_subscribe(&mut tx, unit, &op, &outcome).await? {
            Finished::Applied => {
                let sub = store::read_subscription(&mut tx, account_id)
                    .await?
                    .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
                let response = self.view(&mut tx, &sub).await?;
                self.finish(tx, key, response).await
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

    /// The answer to a Subscribe whose payment was finished before (by the jobs).
    async fn replay_subscribe(
        &self,
        tx: Transaction<'static, Any>,
        key: &IdempotencyKey,
        sub: &SubscriptionRecord,
    ) -> Result<pb::Subscription, SubError> {
        let mut tx = tx;
        match sub.payment_op.as_ref() {
            Some(op) if op.outcome.is_some() && sub.origin_key.as_deref() == Some(key.key()) => {
                if let Some(reason) = declined(op) {
                    return self.refuse(tx, key, reason.to_string()).await;
                }
                let response = self.view(&mut tx, sub).await?;
                self.finish(tx, key, response).await
            }
            _ => Err(SubError::Precondition(
                "the subscription changed while its payment was in flight".into(),
            )),
        }
    }

    /// Applies the outcome of a Subscribe's first payment under the subscription's lock, once:
    /// paid (or a debit pending) makes it active; declined voids the invoice and removes the
    /// subscription (or restores the status it came from). Saves what it changed.
    async fn finish_subscribe(
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
        let settled = matches!(outcome, PaymentOutcome::Paid);
        if settled {
            invoice.status = InvoiceStatus::Paid;
            invoice.paid_at = Some(unit.now);
        } else {
            // A direct debit: access and sending at once; the invoice waits for the bank.
            invoice.status = InvoiceStatus::Pending;
        }
        store::update_invoice_payment(tx, &invoice).await?;
        // The invoice was issued open (its `invoice_issued` event says so) before the charge;
        // what the charge made of it follows, as for every other collected invoice.
        let event = if settled {
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
        let (revision, at_us, amount_minor) = self.verify_token(account_id, token).await?;
        let at = runtime::clock::from_micros(at_us);
        let mut tx = match self.begin::<pb::ApplyChangeResponse>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
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
                let card = unit.sub.payment_kind.charged_by_gateway() && due.is_positive();
                if !card {
                    let (invoice, promoted) = self
                        .apply_upgrade(&mut tx, &mut unit, actor, &change, target, quote, at, None)
                        .await?;
                    let sub = unit.save(&mut tx).await?;
                    let response = self.applied(&mut tx, &sub, invoice, promoted, at).await?;
                    return self.finish(tx, key, response).await;
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
                let mut tx = match self.begin::<pb::ApplyChangeResponse>(key).await? {
                    Begun::Replay(r) => return r.map_err(SubError::Replayed),
                    Begun::Fresh(tx) => tx,
                };
                let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
                match self
                    .finish_change(&mut tx, &mut unit, &payment, &outcome)
                    .await?
                {
                    (Finished::Applied, Some((invoice, promoted))) => {
                        let sub = unit.save(&mut tx).await?;
                        let response = self.applied(&mut tx, &sub, invoice, promoted, at).await?;
                        self.finish(tx, key, response).await
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
    async fn replay_change(
        &self,
        mut tx: Transaction<'static, Any>,
        key: &IdempotencyKey,
        sub: &SubscriptionRecord,
        payment: &PaymentOp,
        at: DateTime<Utc>,
        op: Option<&str>,
    ) -> Result<pb::ApplyChangeResponse, SubError> {
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
        let response = self.applied(&mut tx, sub, invoice, 0, at).await?;
        self.finish(tx, key, response).await
    }

    /// Applies the outcome of an immediate change's payment under the subscription's lock, once:
    /// paid (or a debit pending) applies the change at the previewed instant with its invoice
    /// (S6: what is charged equals what was shown); declined changes nothing but the mark. The
    /// caller saves the unit.
    async fn finish_change(
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
            settled: matches!(outcome, PaymentOutcome::Paid),
        };
        let applied = self
            .apply_upgrade(tx, unit, &actor, change, target, quote, at, Some(charged))
            .await?;
        Ok((Finished::Applied, Some(applied)))
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
        charged: Option<Charged>,
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
            s.allowance_next = None;
            s.allowance_wait = None;
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
            returned_debit: store::has_returned_debit(conn, &sub.account_id).await?,
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

    /// A request's payment, again with its own gateway key: the provider answers a retry with
    /// the first outcome and never charges twice.
    async fn charge_op(&self, op: &PaymentOp) -> PaymentOutcome {
        let currency = match op.currency.parse::<Currency>() {
            Ok(c) => c,
            Err(_) => {
                tracing::error!(key = %op.gateway_key, currency = %op.currency, "stored payment has a bad currency");
                return PaymentOutcome::Unknown;
            }
        };
        let request = ChargeRequest {
            idempotency_key: op.gateway_key.clone(),
            payment_method: op.payment_method.clone(),
            amount: Money::from_minor_units(op.amount_minor, currency),
            description: op.description.clone(),
            requested_at: self.now(),
        };
        self.gateway_charge(&request).await
    }

    async fn gateway_charge(&self, request: &ChargeRequest) -> PaymentOutcome {
        match self.gateway.charge(request).await {
            Ok(ChargeOutcome::Succeeded { .. }) => PaymentOutcome::Paid,
            Ok(ChargeOutcome::Pending { .. }) => PaymentOutcome::Pending,
            Ok(ChargeOutcome::Declined { reason }) => PaymentOutcome::Declined(reason.to_string()),
            Err(GatewayError::Timeout) => {
                tracing::warn!(key = %request.idempotency_key, "gateway timed out; outcome unknown");
                PaymentOutcome::Unknown
            }
            Err(e) => PaymentOutcome::Declined(e.to_string()),
        }
    }

    /// Finishes a request's payment whose outcome stayed unknown (the client never retried):
    /// the gateway again with the same key, then the outcome applied once under the lock, as
    /// the request would have. A later retry of the request gets this outcome.
    pub async fn reconcile_payment(&self, account_id: &str) -> Result<(), SubError> {
        let op = {
            let mut conn = self.conn().await?;
            match store::read_subscription(&mut conn, account_id).await? {
                Some(s) if s.payment_since.is_some() => s.payment_op,
                _ => None,
            }
        };
        let Some(op) = op.filter(|p| p.outcome.is_none()) else {
            return Ok(());
        };
        let outcome = self.charge_op(&op).await;
        if matches!(outcome, PaymentOutcome::Unknown) {
            return Ok(());
        }
        let mut tx = self.db.begin_write().await?;
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        let finished = match op.purpose {
            PaymentPurpose::Subscribe { .. } => {
                self.finish_subscribe(&mut tx, unit, &op, &outcome).await?
            }
            PaymentPurpose::Change { .. } => {
                let (finished, _) = self
                    .finish_change(&mut tx, &mut unit, &op, &outcome)
                    .await?;
                if !matches!(finished, Finished::Earlier) {
                    unit.save(&mut tx).await?;
                }
                finished
            }
        };
        if matches!(finished, Finished::Earlier) {
            tx.rollback().await?;
        } else {
            tracing::info!(account = %account_id, key = %op.gateway_key, "a payment with an unknown outcome was reconciled");
            tx.commit().await?;
            self.platform.outbox.poke();
        }
        Ok(())
    }

    /// A pending direct debit settled or came back at the bank: the invoice is paid, or open
    /// again with the subscription past due and sending refused until it is paid (S18).
    pub async fn settle_debit(&self, invoice_id: &str) -> Result<(), SubError> {
        let invoice = {
            let mut conn = self.conn().await?;
            match store::invoice(&mut conn, &self.db, invoice_id, false).await? {
                Some(i) if i.status == InvoiceStatus::Pending => i,
                _ => return Ok(()),
            }
        };
        let outcome = match self.gateway.charge_status(&invoice.gateway_key).await {
            Ok(Some(record)) => match record.status {
                ChargeStatus::Succeeded => PaymentOutcome::Paid,
                ChargeStatus::Pending => return Ok(()),
                ChargeStatus::Returned => {
                    PaymentOutcome::Declined("the direct debit was returned by the bank".into())
                }
                ChargeStatus::Declined(reason) => PaymentOutcome::Declined(reason.to_string()),
            },
            // No record (e.g. another replica's provider session): never guess a return.
            Ok(None) | Err(_) => return Ok(()),
        };
        let mut tx = self.db.begin_write().await?;
        if self
            .apply_debit_outcome(&mut tx, &invoice.account_id, invoice_id, outcome)
            .await?
        {
            tx.commit().await?;
            self.platform.outbox.poke();
        } else {
            tx.rollback().await?;
        }
        Ok(())
    }

    /// Applies a direct debit's settlement or return to the invoice `invoice_id` of
    /// `account_id` in `tx`, if it is still pending (`false`: it is not, nothing changed).
    async fn apply_debit_outcome(
        &self,
        tx: &mut Transaction<'static, Any>,
        account_id: &str,
        invoice_id: &str,
        outcome: PaymentOutcome,
    ) -> Result<bool, SubError> {
        let mut unit = Unit::lock(tx, &self.db, account_id, self.now()).await?;
        let mut invoice = match store::invoice(tx, &self.db, invoice_id, true).await? {
            Some(i) if i.status == InvoiceStatus::Pending => i,
            _ => return Ok(false),
        };
        let actor = system();
        let now = unit.now;
        if let PaymentOutcome::Declined(reason) = outcome {
            invoice.status = InvoiceStatus::Open;
            invoice.returned_at = Some(now);
            invoice.next_attempt_at = None;
            if matches!(unit.sub.status, SubStatus::Active | SubStatus::PastDue) {
                unit.sub.status = SubStatus::PastDue;
            }
            unit.record(
                &actor.0,
                "direct_debit_returned",
                format!("invoice {}: {reason}", invoice.number),
            );
            unit.event(
                "subscription.payment_returned",
                json!({"invoice_id": invoice.invoice_id, "number": invoice.number, "reason": reason}),
            );
        } else {
            invoice.status = InvoiceStatus::Paid;
            invoice.paid_at = Some(now);
            unit.record(
                &actor.0,
                "direct_debit_settled",
                format!("invoice {} paid", invoice.number),
            );
            unit.event(
                "subscription.invoice_paid",
                json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
            );
        }
        store::update_invoice_payment(tx, &invoice).await?;
        unit.save(tx).await?;
        Ok(true)
    }

    /// Applies a verified Stripe webhook event exactly once: its id is recorded in the
    /// transaction that applies it (`false`: delivered before, nothing changes). A
    /// `payment_intent.succeeded` or `.payment_failed` whose metadata `billing_key` is the
    /// gateway key of a pending direct-debit invoice settles or returns that invoice, as the
    /// jobs' polling would. Other events (card payments, whose outcome the paying request or
    /// the reconciler learns from the gateway, and events for nothing of ours) are recorded
    /// and change nothing. Refunds and disputes: [`Subscriptions::apply_stripe_reversal`].
    pub async fn apply_stripe_event(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
    ) -> Result<bool, SubError> {
        let mut tx = self.db.begin_write().await?;
        if !store::record_stripe_event(&mut tx, &event.id, &event.kind, chrono::Utc::now()).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        let update = event.payment.as_ref();
        let outcome = match update.map(|u| u.status) {
            Some(ChargeStatus::Succeeded) => Some(PaymentOutcome::Paid),
            Some(ChargeStatus::Declined(reason)) => {
                Some(PaymentOutcome::Declined(reason.to_string()))
            }
            _ => None,
        };
        let invoice = match (update.and_then(|u| u.billing_key.as_deref()), &outcome) {
            (Some(key), Some(_)) => store::invoice_by_gateway_key(&mut tx, key).await?,
            _ => None,
        };
        if let (Some(invoice), Some(outcome)) = (invoice, outcome)
            && invoice.status == InvoiceStatus::Pending
        {
            self.apply_debit_outcome(&mut tx, &invoice.account_id, &invoice.invoice_id, outcome)
                .await?;
        }
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(true)
    }
}

impl Subscriptions {
    /// `charge.refunded` and `charge.dispute.created`: money paid for an invoice taken back. The
    /// event names only the PaymentIntent, so its metadata's `billing_key` (our gateway key)
    /// is fetched first, outside the transaction, and finds the invoice it paid. Applied once
    /// (the event id is recorded in the same transaction), and only to a `paid` invoice whose
    /// whole total came back ([`Reversal::is_whole`](runtime::stripe_webhook::Reversal::is_whole)):
    /// - a refund in full makes it `refunded` (`subscription.invoice_refunded`); the
    ///   subscription is not touched: refunding is the platform's own decision;
    /// - a dispute takes the money back without the platform's say: the invoice is open again
    ///   with `returned_at`, the subscription past due and its sending refused, exactly as for a
    ///   returned direct debit (`subscription.payment_returned`, reason `disputed`); it is not
    ///   charged again by itself but collected once the customer gives a new payment method;
    /// - a part taken back changes nothing but says so (`subscription.payment_partly_reversed`).
    ///
    /// A reversal of an invoice whose payment has no final outcome yet is an error (500), so
    /// Stripe delivers it again; one for nothing of ours is recorded and ignored.
    pub async fn apply_stripe_reversal(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
        reversal: &runtime::stripe_webhook::Reversal,
    ) -> anyhow::Result<bool> {
        use runtime::stripe_webhook::ReversalKind;
        // Outside any transaction: the write lock is not held across a call to Stripe.
        let key = match reversal.payment_intent.as_deref() {
            Some(pi) => self.gateway.key_of_charge(pi).await.map_err(|e| {
                anyhow::anyhow!("retrieving PaymentIntent {pi} for {}: {e}", event.id)
            })?,
            None => None,
        };
        let mut tx = self.db.begin_write().await?;
        if !store::record_stripe_event(&mut tx, &event.id, &event.kind, chrono::Utc::now()).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        let found = match &key {
            Some(key) => store::invoice_by_gateway_key(&mut tx, key).await?,
            None => None,
        };
        let Some(found) = found else {
            tracing::info!(event = %event.id, payment_intent = ?reversal.payment_intent, "Stripe refund or dispute for no invoice of this service; recorded and ignored");
            tx.commit().await?;
            return Ok(true);
        };
        let mut unit = Unit::lock(&mut tx, &self.db, &found.account_id, self.now()).await?;
        let mut invoice = store::invoice(&mut tx, &self.db, &found.invoice_id, true)
            .await?
            .ok_or_else(|| runtime::db::DbError::Corrupt("invoice vanished".into()))?;
        match invoice.status {
            InvoiceStatus::Paid => {}
            InvoiceStatus::Pending => {
                tx.rollback().await?;
                anyhow::bail!(
                    "invoice {} has no final payment outcome yet; {} is applied once it has",
                    invoice.invoice_id,
                    event.id
                );
            }
            InvoiceStatus::Open | InvoiceStatus::Void | InvoiceStatus::Refunded => {
                tracing::info!(invoice = %invoice.invoice_id, event = %event.id, status = invoice.status.as_str(), "Stripe refund or dispute for an invoice not paid now; nothing to take back");
                tx.commit().await?;
                return Ok(true);
            }
        }
        let total = invoice.total.to_minor_units().map_err(|e| {
            runtime::db::DbError::Corrupt(format!("invoice {} total: {e}", invoice.invoice_id))
        })?;
        let reason = reversal.kind.as_str();
        let actor = system();
        if !reversal.is_whole(total) {
            let reversed = Money::from_minor_units(reversal.amount, invoice.total.currency());
            unit.record(
                &actor.0,
                "payment_partly_reversed",
                format!("invoice {}: {reversed} {reason}", invoice.number),
            );
            unit.event(
                "subscription.payment_partly_reversed",
                json!({
                    "invoice_id": invoice.invoice_id, "number": invoice.number, "reason": reason,
                    "reversed_amount": reversed.amount_text(),
                    "currency": reversed.currency().code(),
                }),
            );
        } else if reversal.kind == ReversalKind::Refunded {
            invoice.status = InvoiceStatus::Refunded;
            unit.record(
                &actor.0,
                "invoice_refunded",
                format!("invoice {} refunded: {}", invoice.number, invoice.total),
            );
            unit.event(
                "subscription.invoice_refunded",
                json!({
                    "invoice_id": invoice.invoice_id, "number": invoice.number,
                    "amount": invoice.total.amount_text(),
                    "currency": invoice.total.currency().code(),
                }),
            );
        } else {
            invoice.status = InvoiceStatus::Open;
            invoice.paid_at = None;
            invoice.returned_at = Some(unit.now);
            invoice.next_attempt_at = None;
            if matches!(unit.sub.status, SubStatus::Active | SubStatus::PastDue) {
                unit.sub.status = SubStatus::PastDue;
            }
            unit.record(
                &actor.0,
                "payment_disputed",
                format!("invoice {}: the payment is disputed", invoice.number),
            );
            unit.event(
                "subscription.payment_returned",
                json!({"invoice_id": invoice.invoice_id, "number": invoice.number, "reason": reason}),
            );
        }
        store::update_invoice_payment(&mut tx, &invoice).await?;
        unit.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(true)
    }
}

/// The subscription service's side of Stripe's webhooks (`runtime::stripe_webhook`).
pub struct StripeEvents(pub Subscriptions);

#[tonic::async_trait]
impl runtime::stripe_webhook::WebhookHandler for StripeEvents {
    async fn apply(&self, event: &runtime::stripe_webhook::WebhookEvent) -> anyhow::Result<bool> {
        match &event.reversal {
            Some(reversal) => self.0.apply_stripe_reversal(event, reversal).await,
            None => Ok(self.0.apply_stripe_event(event).await?),
        }
    }
}

impl Subscriptions {
    /// UpdatePaymentMethod (S5): the new method pays from now on, open invoices included; with a
    /// card or mandate they are collected at once, so a past-due or suspended subscription is
    /// active (and sends) again as soon as it pays.
    pub async fn update_payment_method(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
        payment: PaymentChoice,
    ) -> Result<pb::UpdatePaymentMethodResponse, SubError> {
        let mut tx = match self.begin::<pb::UpdatePaymentMethodResponse>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, now).await?;
        if !(unit.sub.status.is_live() || unit.sub.status == SubStatus::Trialing) {
            return Err(SubError::Precondition(format!(
                "the subscription is {}: there is nothing to pay",
                unit.sub.status.as_str()
            )));
        }
        if unit.sub.pending_op.is_some() {
            return Err(SubError::Precondition(
                "a payment of this subscription is in flight; try again shortly".into(),
            ));
        }
        unit.sub.payment_kind = payment.kind;
        unit.sub.payment_method = payment.method.clone();
        let open = store::open_invoices(&mut tx, &unit.sub.subscription_id).await?;
        if let Some(busy) = open
            .iter()
            .find(|i| i.gateway_key == format!("{}:{}", i.invoice_id, i.payment_attempts + 1))
        {
            return Err(SubError::Precondition(format!(
                "the payment of invoice {} is being confirmed with the gateway; try again shortly",
                busy.number
            )));
        }
        for invoice in &open {
            let mut invoice = invoice.clone();
            invoice.payment_kind = payment.kind;
            invoice.payment_method = payment.method.clone();
            invoice.next_attempt_at = payment.kind.charged_by_gateway().then_some(now);
            store::update_invoice_payment(&mut tx, &invoice).await?;
        }
        unit.record(
            &actor.0,
            "payment_method_changed",
            format!(
                "paying by {}; {} open invoice(s) moved to it",
                payment.kind.as_str(),
                open.len()
            ),
        );
        unit.event(
            "subscription.payment_method_changed",
            json!({"payment": payment.kind.as_str(), "open_invoices": open.len()}),
        );
        unit.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        // Collected now, outside any transaction (the jobs would on their next run).
        if payment.kind.charged_by_gateway() {
            for invoice in &open {
                if let Err(e) = self.collect(&invoice.invoice_id).await {
                    tracing::warn!(invoice = %invoice.invoice_id, error = %e, "collecting with the new payment method failed; the jobs retry");
                }
            }
        }
        let mut tx = match self.begin::<pb::UpdatePaymentMethodResponse>(key).await? {
            Begun::Replay(r) => return r.map_err(SubError::Replayed),
            Begun::Fresh(tx) => tx,
        };
        let sub = store::read_subscription(&mut tx, account_id)
            .await?
            .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
        let mut invoices = Vec::with_capacity(open.len());
        for invoice in &open {
            if let Some(i) = store::invoice(&mut tx, &self.db, &invoice.invoice_id, false).await? {
                invoices.push(convert::invoice(&i));
            }
        }
        let response = pb::UpdatePaymentMethodResponse {
            subscription: Some(self.view(&mut tx, &sub).await?),
            invoices,
        };
        self.finish(tx, key, response).await
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
    async fn step(
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

    async fn renew_claimed(
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

    async fn trial_step(
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
        s.allowance_next = None;
        s.allowance_wait = None;
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

    async fn renew(
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
        s.allowance_next = None;
        s.allowance_wait = None;
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

    /// C7: the plan's credits for the current month, granted in the wallet, expiring at the
    /// month's end. A monthly plan's month is its period; a yearly plan has twelve, counted from
    /// the period anchor, each granted in its month. Keyed by subscription, cycle and month, so
    /// a retry never grants twice; a month the jobs missed entirely is not granted late (its
    /// credits would already have expired).
    async fn grant_allowance(&self, account_id: &str) -> Result<(), SubError> {
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
    fn allowance_due(
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
        let request = match (plan.monthly_credits, month) {
            (0, _) | (_, None) => None,
            (credits, Some(m)) => {
                // Month 0 keeps the key monthly plans always used.
                let suffix = if m.index == 0 {
                    String::new()
                } else {
                    format!(":m{}", m.index)
                };
                Some(proto::wallet::v1::GrantCreditsRequest {
                    idempotency_key: format!(
                        "sub-allowance:{}:{cycle}{suffix}",
                        sub.subscription_id
                    ),
                    wallet_id: sub.account_id.clone(),
                    credits: u64::try_from(credits).unwrap_or(0),
                    kind: proto::wallet::v1::LotKind::SubscriptionAllowance as i32,
                    expires_at: Some(runtime::convert::timestamp(m.end)),
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
            request,
        }))
    }

    /// Grants one month in the wallet (the account's wallet: wallet id = account id).
    async fn call_wallet(&self, allowance: &Allowance) -> GrantOutcome {
        let Some(request) = &allowance.request else {
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
        match wallet.clone().grant_credits(request.clone()).await {
            Ok(_) => GrantOutcome::Granted,
            Err(status) if status.code() == tonic::Code::NotFound => {
                tracing::warn!(
                    account = %account_id,
                    retry_in_seconds = WALLET_WAIT_RETRY_SECONDS,
                    "no wallet for this account yet: the month's credits wait for it"
                );
                GrantOutcome::NoWallet
            }
            Err(status) => {
                tracing::warn!(account = %account_id, error = %status, "granting subscription credits failed; will retry");
                GrantOutcome::Failed
            }
        }
    }

    /// C7 for many subscriptions (read without the lock, e.g. just renewed): see
    /// [`Subscriptions::settle`]. Returns how many months of credits were recorded.
    pub async fn grant_many(&self, subs: Vec<SubscriptionRecord>) -> Result<usize, SubError> {
        self.settle(Vec::new(), subs).await
    }

    /// One gateway attempt on an open invoice (renewals, conversions, retries, a new payment
    /// method): paid; pending while a direct debit settles; or past due with a retry, or
    /// suspended when retries are used up. The key names the invoice and the attempt, so an
    /// attempt whose outcome stayed unknown is asked again with the same key on the next run.
    pub async fn collect(&self, invoice_id: &str) -> Result<(), SubError> {
        self.collect_many(&[invoice_id.to_string()]).await
    }

    /// [`Subscriptions::collect`] for many invoices (read now, without the lock).
    pub async fn collect_many(&self, invoice_ids: &[String]) -> Result<(), SubError> {
        let invoices = {
            let mut conn = self.conn().await?;
            store::invoices_by_id(&mut conn, &self.db, invoice_ids, false).await?
        };
        self.collect_issued(invoices).await
    }

    /// The next gateway attempt on each of `invoices` (as read, e.g. just issued by a renewal
    /// batch): see [`Subscriptions::settle`].
    pub async fn collect_issued(&self, invoices: Vec<InvoiceRecord>) -> Result<(), SubError> {
        self.settle(invoices, Vec::new()).await.map(|_| ())
    }

    /// The work a renewal batch leaves for after its commit, outside any transaction: the next
    /// gateway attempt on each of `invoices` and the month of credits due on each of `subs`
    /// (both read without the lock), run concurrently and bounded (each charge keyed by invoice
    /// and attempt, each grant by subscription, cycle and month). Then one write transaction
    /// applies what came back, each under its subscription's (and invoice's) lock and only
    /// where it was not applied already: an invoice still open at that attempt with that
    /// payment method, a subscription still in that cycle with that month not recorded. An
    /// attempt whose outcome is unknown is marked to be asked again with its key. Returns how
    /// many months of credits were recorded.
    pub async fn settle(
        &self,
        invoices: Vec<InvoiceRecord>,
        subs: Vec<SubscriptionRecord>,
    ) -> Result<usize, SubError> {
        let now = self.now();
        let mut due = Vec::new();
        for sub in &subs {
            let plan = self.plan_version(&sub.plan_id, sub.plan_version).await?;
            if let Some(a) = self.allowance_due(sub, &plan, now)? {
                due.push(a);
            }
        }
        let charges = stream::iter(invoices)
            .map(|invoice| async move {
                let attempt = invoice.payment_attempts + 1;
                let gateway_key = format!("{}:{attempt}", invoice.invoice_id);
                let outcome = self.charge(&invoice, &gateway_key).await;
                (invoice, attempt, gateway_key, outcome)
            })
            .buffer_unordered(CONCURRENT_CALLS)
            .collect::<Vec<_>>();
        let grants = stream::iter(due)
            .map(|a| async move {
                match self.call_wallet(&a).await {
                    GrantOutcome::Failed => None,
                    outcome => Some((a, outcome)),
                }
            })
            .buffer_unordered(CONCURRENT_CALLS)
            .filter_map(|a| async move { a })
            .collect::<Vec<(Allowance, GrantOutcome)>>();
        let (attempts, granted) = futures::join!(charges, grants);
        let (unknown, mut known): (Vec<_>, Vec<_>) = attempts
            .into_iter()
            .partition(|(_, _, _, outcome)| matches!(outcome, PaymentOutcome::Unknown));
        if !unknown.is_empty() {
            // The money may be taken: the next run asks again with this key, and the payment
            // method cannot change until it has (UpdatePaymentMethod checks the mark).
            let mut conn = self.conn().await?;
            for (invoice, _, gateway_key, _) in &unknown {
                store::mark_attempt_in_flight(&mut conn, &invoice.invoice_id, gateway_key).await?;
            }
        }
        if known.is_empty() && granted.is_empty() {
            return Ok(0);
        }
        // Several invoices of one subscription are applied in the order they were issued.
        known.sort_by_key(|(invoice, ..)| invoice.number);
        let mut accounts: Vec<String> = known
            .iter()
            .map(|(i, ..)| i.account_id.clone())
            .chain(granted.iter().map(|(a, _)| a.account_id.clone()))
            .collect();
        accounts.sort();
        accounts.dedup();
        let ids: Vec<String> = known.iter().map(|(i, ..)| i.invoice_id.clone()).collect();
        let mut tx = self.db.begin_write().await?;
        let now = self.now();
        let mut units: BTreeMap<String, (Unit, bool)> =
            store::lock_subscriptions(&mut tx, &self.db, &accounts)
                .await?
                .into_iter()
                .map(|s| (s.account_id.clone(), (Unit::locked(s, now), false)))
                .collect();
        let mut current: HashMap<String, InvoiceRecord> =
            store::invoices_by_id(&mut tx, &self.db, &ids, true)
                .await?
                .into_iter()
                .map(|i| (i.invoice_id.clone(), i))
                .collect();
        let mut attempted = Vec::with_capacity(current.len());
        for (seen, attempt, gateway_key, outcome) in known {
            let Some((unit, touched)) = units.get_mut(&seen.account_id) else {
                continue;
            };
            let Some(mut invoice) = current.remove(&seen.invoice_id).filter(|i| {
                i.status == InvoiceStatus::Open
                    && i.payment_attempts + 1 == attempt
                    && i.payment_method == seen.payment_method
            }) else {
                continue;
            };
            Self::apply_attempt(unit, &mut invoice, attempt, gateway_key, outcome);
            attempted.push(invoice);
            *touched = true;
        }
        store::update_invoice_payments(&mut tx, &attempted).await?;
        let mut recorded = 0;
        for (a, outcome) in granted {
            let Some((unit, touched)) = units.get_mut(&a.account_id) else {
                continue;
            };
            let s = &mut unit.sub;
            if s.cycle != a.cycle || (s.allowance_cycle, s.allowance_month) >= (a.cycle, a.index) {
                continue;
            }
            if outcome == GrantOutcome::NoWallet {
                // Not granted, so not recorded: the month stays due and the jobs ask again
                // (within the month, its credits expiring at its end as they would have).
                let first = s.allowance_wait.is_none();
                let retry = now + Duration::seconds(WALLET_WAIT_RETRY_SECONDS);
                s.allowance_wait = Some(retry);
                if let (true, Some(m)) = (first, a.month) {
                    let wallet_id = unit.sub.account_id.clone();
                    unit.event(
                        "subscription.credits_waiting_for_wallet",
                        json!({
                            "credits": a.credits, "cycle": a.cycle, "month": m.index,
                            "wallet_id": wallet_id, "retry_at": retry.to_rfc3339(),
                            "expires_at": m.end.to_rfc3339(),
                        }),
                    );
                }
                *touched = true;
                continue;
            }
            s.allowance_wait = None;
            s.allowance_cycle = a.cycle;
            s.allowance_month = a.index;
            // A yearly plan's next month is due at this month's end.
            s.allowance_next = a.month.filter(|m| !m.last && a.credits > 0).map(|m| m.end);
            if let (Some(m), true) = (a.month, a.request.is_some()) {
                unit.event(
                    "subscription.credits_granted",
                    json!({"credits": a.credits, "cycle": a.cycle, "month": m.index, "expires_at": m.end.to_rfc3339()}),
                );
            }
            *touched = true;
            recorded += 1;
        }
        let mut writes = Writes::new();
        let mut saved = 0;
        for (unit, touched) in units.into_values() {
            if touched {
                unit.save_to(&mut writes);
                saved += 1;
            }
        }
        if saved > 0 {
            writes.flush(&mut tx).await?;
            tx.commit().await?;
            self.platform.outbox.poke();
        } else {
            tx.rollback().await?;
        }
        Ok(recorded)
    }

    /// Applies one attempt's known outcome to a locked subscription and its open invoice.
    fn apply_attempt(
        unit: &mut Unit,
        invoice: &mut InvoiceRecord,
        attempt: u32,
        gateway_key: String,
        outcome: PaymentOutcome,
    ) {
        let now = unit.now;
        invoice.payment_attempts = attempt;
        let actor = system();
        match outcome {
            PaymentOutcome::Paid | PaymentOutcome::Pending | PaymentOutcome::Unknown => {
                let settled = !matches!(outcome, PaymentOutcome::Pending);
                invoice.gateway_key = gateway_key;
                invoice.next_attempt_at = None;
                if matches!(unit.sub.status, SubStatus::PastDue | SubStatus::Suspended) {
                    unit.sub.status = SubStatus::Active;
                }
                if settled {
                    invoice.status = InvoiceStatus::Paid;
                    invoice.paid_at = Some(now);
                    unit.record(
                        &actor.0,
                        "payment_succeeded",
                        format!("invoice {}", invoice.number),
                    );
                    unit.event(
                        "subscription.invoice_paid",
                        json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
                    );
                } else {
                    invoice.status = InvoiceStatus::Pending;
                    unit.record(
                        &actor.0,
                        "direct_debit_submitted",
                        format!("invoice {}", invoice.number),
                    );
                    unit.event(
                        "subscription.invoice_payment_pending",
                        json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
                    );
                }
            }
            PaymentOutcome::Declined(reason) => {
                invoice.gateway_key = gateway_key;
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
        SendingRefusal::PaymentReturned => pb::SendingRefusal::PaymentReturned,
    };
    pb::SendingDecision {
        allowed: false,
        refusal: refusal as i32,
        message: r.message().to_string(),
        trial_mails_left: left,
    }
}

type TokenMac = hmac::Hmac<sha2::Sha256>;

/// Bytes of the MAC a token carries (128 bits; a token stays well within the 128 characters
/// of an id).
const TOKEN_TAG_BYTES: usize = 16;

/// What a token that does not decode or verify is told (INVALID_ARGUMENT, unlike a genuine
/// but outdated one, which is FAILED_PRECONDITION "stale").
const MALFORMED_TOKEN: &str =
    "preview token is malformed or was not issued by this service for this account";

impl Subscriptions {
    async fn token_mac(&self, account_id: &str, body: &str) -> Result<TokenMac, SubError> {
        use hmac::Mac;
        let key = self
            .token_key
            .get_or_try_init(|| async {
                let mut conn = self.conn().await?;
                Ok::<_, SubError>(store::preview_token_key(&mut conn).await?.into_bytes())
            })
            .await?;
        let mut mac = TokenMac::new_from_slice(key)
            .map_err(|e| SubError::Arithmetic(format!("preview token key: {e}")))?;
        mac.update(account_id.as_bytes());
        mac.update(b":");
        mac.update(body.as_bytes());
        Ok(mac)
    }

    /// `body.signature`: the body (`revision.at_micros.amount_minor`) signed for the account
    /// (HMAC-SHA256's first [`TOKEN_TAG_BYTES`], hex), so a token cannot be edited or moved
    /// to another account.
    async fn sign_token(&self, account_id: &str, body: &str) -> Result<String, SubError> {
        use hmac::Mac;
        let tag = self
            .token_mac(account_id, body)
            .await?
            .finalize()
            .into_bytes();
        let hex: String = tag
            .iter()
            .take(TOKEN_TAG_BYTES)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(format!("{body}.{hex}"))
    }

    /// The body of a token this service signed for `account_id`, or INVALID_ARGUMENT.
    async fn verify_token(
        &self,
        account_id: &str,
        token: &str,
    ) -> Result<(i64, i64, i64), SubError> {
        use hmac::Mac;
        let bad = || SubError::invalid("preview_token", MALFORMED_TOKEN);
        let (body, hex) = token.rsplit_once('.').ok_or_else(bad)?;
        let tag = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .filter(|t| t.len() == TOKEN_TAG_BYTES)
            .ok_or_else(bad)?;
        self.token_mac(account_id, body)
            .await?
            .verify_truncated_left(&tag)
            .map_err(|_| bad())?;
        parse_token(body)
    }
}

/// `revision.at_micros.amount_minor`, the body of a verified token.
fn parse_token(token: &str) -> Result<(i64, i64, i64), SubError> {
    let bad = || SubError::invalid("preview_token", MALFORMED_TOKEN);
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
