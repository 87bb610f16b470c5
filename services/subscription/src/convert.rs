//! Conversions between the service's records and its protobuf messages, by hand.

use chrono::{DateTime, Utc};
use proto::{common::v1::Money as PbMoney, subscription::v1 as pb};
pub use runtime::convert::Reply;
use runtime::convert::timestamp;
use shared::{BillingInterval, ContactSlider, Currency, Money, Tier, TierMode, TierTable};

use crate::{
    domain::{
        AddOn, Change, Level, Line, Plan, Product, ProrationPolicy, SelfServe, SendingRefusal,
        Status, Timing, TrialTerms,
    },
    error::SubError,
    model::{
        AccountRecord, AddOnCancelled, ChangeApplied, ChangePreview, ChangeRequestRecord,
        ContactUsage, ContactsAdmitted, HistoryRecord, InvoiceRecord, InvoiceStatus, PaymentKind,
        PaymentMethodUpdated, PublishedPlan, RequestStatus, SendingDecision, SubscriptionRecord,
        SubscriptionView,
    },
};

fn decimal(field: &'static str, s: &str) -> Result<rust_decimal::Decimal, SubError> {
    runtime::convert::decimal(field, s).map_err(|(f, m)| SubError::invalid(f, m))
}

/// Money as its message (rendered by [`Money::amount_text`], e.g. "0.00").
pub fn money(m: &Money) -> PbMoney {
    runtime::convert::money(m)
}

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(timestamp(t))
}

/// Parses a product.
pub fn product_from(v: i32, field: &'static str) -> Result<Product, SubError> {
    match pb::Product::try_from(v) {
        Ok(pb::Product::Marketing) => Ok(Product::Marketing),
        Ok(pb::Product::Sales) => Ok(Product::Sales),
        Ok(pb::Product::Bundle) => Ok(Product::Bundle),
        _ => Err(SubError::invalid(
            field,
            "must be PRODUCT_MARKETING, PRODUCT_SALES or PRODUCT_BUNDLE",
        )),
    }
}

fn product(p: Product) -> pb::Product {
    match p {
        Product::Marketing => pb::Product::Marketing,
        Product::Sales => pb::Product::Sales,
        Product::Bundle => pb::Product::Bundle,
    }
}

fn terms(t: &TrialTerms) -> pb::TrialTerms {
    pb::TrialTerms {
        days: t.days,
        contact_cap: t.contact_cap,
        free_mails: t.free_mails,
    }
}

/// Trial terms from their message.
pub fn terms_from(t: &pb::TrialTerms) -> TrialTerms {
    TrialTerms {
        days: t.days,
        contact_cap: t.contact_cap,
        free_mails: t.free_mails,
    }
}

/// A plan spec as a validated plan (version 0 until published).
pub fn plan_from(spec: &pb::PlanSpec) -> Result<Plan, SubError> {
    let currency: Currency = spec.currency.parse().map_err(|_| {
        SubError::invalid(
            "plan.currency",
            format!(
                "{} is not a supported ISO-4217 code",
                shared::limits::quoted(&spec.currency)
            ),
        )
    })?;
    let tiers_msg = spec
        .contact_tiers
        .as_ref()
        .ok_or_else(|| SubError::invalid("plan.contact_tiers", "is required"))?;
    let mode = match pb::TierMode::try_from(tiers_msg.mode) {
        Ok(pb::TierMode::FlatPerBand) => TierMode::FlatPerBand,
        Ok(pb::TierMode::Volume) => TierMode::Volume,
        Ok(pb::TierMode::Graduated) => TierMode::Graduated,
        _ => {
            return Err(SubError::invalid(
                "plan.contact_tiers.mode",
                "must be TIER_MODE_FLAT_PER_BAND, _VOLUME or _GRADUATED",
            ));
        }
    };
    let tiers = tiers_msg
        .tiers
        .iter()
        .map(|t| {
            Ok(Tier {
                first: t.first,
                last: (t.last != 0).then_some(t.last),
                unit_price: decimal("plan.contact_tiers.tiers.unit_price", &t.unit_price)?,
                flat_price: decimal("plan.contact_tiers.tiers.flat_price", &t.flat_price)?,
            })
        })
        .collect::<Result<Vec<_>, SubError>>()?;
    let contact_tiers = TierTable::new(mode, currency, tiers)
        .map_err(|e| SubError::invalid("plan.contact_tiers", e.to_string()))?;
    let slider = spec
        .slider
        .as_ref()
        .ok_or_else(|| SubError::invalid("plan.slider", "is required"))?;
    let slider = ContactSlider::new(slider.min, slider.max, slider.step)
        .map_err(|e| SubError::invalid("plan.slider", e.to_string()))?;
    let level = spec
        .level
        .as_ref()
        .ok_or_else(|| SubError::invalid("plan.level", "is required"))?;
    let interval = match pb::Interval::try_from(spec.interval) {
        Ok(pb::Interval::Month) => BillingInterval::Month,
        Ok(pb::Interval::Year) => BillingInterval::Year,
        _ => {
            return Err(SubError::invalid(
                "plan.interval",
                "must be INTERVAL_MONTH or INTERVAL_YEAR",
            ));
        }
    };
    let proration = match pb::ProrationPolicy::try_from(spec.proration) {
        Ok(pb::ProrationPolicy::ProrateToCycleEnd) => ProrationPolicy::ProrateToCycleEnd,
        Ok(pb::ProrationPolicy::RestartPeriod) => ProrationPolicy::RestartPeriod,
        _ => {
            return Err(SubError::invalid(
                "plan.proration",
                "must be PRORATE_TO_CYCLE_END or RESTART_PERIOD",
            ));
        }
    };
    let add_ons = spec
        .add_ons
        .iter()
        .map(|a| {
            Ok(AddOn {
                code: a.code.clone(),
                name: if a.name.is_empty() {
                    a.code.clone()
                } else {
                    a.name.clone()
                },
                price: decimal("plan.add_ons.price", &a.price)?,
            })
        })
        .collect::<Result<Vec<_>, SubError>>()?;
    let self_serve = spec.self_serve.map_or(SelfServe::default(), |s| SelfServe {
        downgrade: s.downgrade,
        remove_add_on: s.remove_add_on,
        change_product: s.change_product,
        unbundle: s.unbundle,
    });
    let plan = Plan {
        plan_id: spec.plan_id.clone(),
        version: 0,
        name: spec.name.clone(),
        product: product_from(spec.product, "plan.product")?,
        level: Level {
            name: level.name.clone(),
            rank: level.rank,
        },
        interval,
        currency,
        contact_tiers,
        slider,
        included_seats: spec.included_seats,
        seat_price: decimal("plan.seat_price", &spec.seat_price)?,
        add_ons,
        proration,
        self_serve,
        trial: spec.trial.as_ref().map(terms_from),
        monthly_credits: i64::try_from(spec.monthly_credits)
            .map_err(|_| SubError::invalid("plan.monthly_credits", "too large"))?,
    };
    plan.validate()?;
    Ok(plan)
}

/// A plan as its message.
pub fn plan(p: &Plan, published_at: DateTime<Utc>) -> pb::Plan {
    let mode = match p.contact_tiers.mode() {
        TierMode::FlatPerBand => pb::TierMode::FlatPerBand,
        TierMode::Volume => pb::TierMode::Volume,
        TierMode::Graduated => pb::TierMode::Graduated,
    };
    pb::Plan {
        spec: Some(pb::PlanSpec {
            plan_id: p.plan_id.clone(),
            name: p.name.clone(),
            product: product(p.product) as i32,
            level: Some(pb::Level {
                name: p.level.name.clone(),
                rank: p.level.rank,
            }),
            interval: match p.interval {
                BillingInterval::Month => pb::Interval::Month,
                BillingInterval::Year => pb::Interval::Year,
            } as i32,
            currency: p.currency.code().to_string(),
            contact_tiers: Some(pb::ContactTiers {
                mode: mode as i32,
                tiers: p
                    .contact_tiers
                    .tiers()
                    .iter()
                    .map(|t| pb::PriceTier {
                        first: t.first,
                        last: t.last.unwrap_or(0),
                        unit_price: t.unit_price.to_string(),
                        flat_price: t.flat_price.to_string(),
                    })
                    .collect(),
            }),
            slider: Some(pb::Slider {
                min: p.slider.min(),
                max: p.slider.max(),
                step: p.slider.step(),
            }),
            included_seats: p.included_seats,
            seat_price: p.seat_price.to_string(),
            add_ons: p
                .add_ons
                .iter()
                .map(|a| pb::AddOn {
                    code: a.code.clone(),
                    name: a.name.clone(),
                    price: a.price.to_string(),
                })
                .collect(),
            proration: match p.proration {
                ProrationPolicy::ProrateToCycleEnd => pb::ProrationPolicy::ProrateToCycleEnd,
                ProrationPolicy::RestartPeriod => pb::ProrationPolicy::RestartPeriod,
            } as i32,
            self_serve: Some(pb::SelfServe {
                downgrade: p.self_serve.downgrade,
                remove_add_on: p.self_serve.remove_add_on,
                change_product: p.self_serve.change_product,
                unbundle: p.self_serve.unbundle,
            }),
            trial: p.trial.as_ref().map(terms),
            monthly_credits: u64::try_from(p.monthly_credits).unwrap_or(0),
        }),
        version: p.version,
        published_at: ts(published_at),
    }
}

/// A change as its message.
pub fn change(c: &Change) -> pb::Change {
    use pb::change::Kind;
    let kind = match c {
        Change::Contacts(n) => Kind::Contacts(*n),
        Change::Seats(n) => Kind::Seats(*n),
        Change::Level { plan_id, .. } => Kind::LevelPlanId(plan_id.clone()),
        Change::Product { plan_id, .. } => Kind::ProductPlanId(plan_id.clone()),
        Change::AddAddOn(c) => Kind::AddAddOn(c.clone()),
        Change::RemoveAddOn(c) => Kind::RemoveAddOn(c.clone()),
    };
    pb::Change { kind: Some(kind) }
}

/// What a change message asks for, before plan versions are resolved.
pub enum ChangeRequest {
    /// A change that names no other plan.
    Plain(Change),
    /// A level change to the latest version of a plan.
    Level(String),
    /// A product change to the latest version of a plan.
    Product(String),
}

/// Parses a change message.
pub fn change_from(c: Option<&pb::Change>) -> Result<ChangeRequest, SubError> {
    use pb::change::Kind;
    let kind = c
        .and_then(|c| c.kind.as_ref())
        .ok_or_else(|| SubError::invalid("change", "is required: one of its fields"))?;
    let code = |field: &'static str, s: &str| {
        if s.is_empty() {
            Err(SubError::invalid(field, "is required"))
        } else {
            Ok(s.to_string())
        }
    };
    Ok(match kind {
        Kind::Contacts(n) => ChangeRequest::Plain(Change::Contacts(*n)),
        Kind::Seats(n) => ChangeRequest::Plain(Change::Seats(*n)),
        Kind::LevelPlanId(p) => ChangeRequest::Level(code("change.level_plan_id", p)?),
        Kind::ProductPlanId(p) => ChangeRequest::Product(code("change.product_plan_id", p)?),
        Kind::AddAddOn(a) => ChangeRequest::Plain(Change::AddAddOn(code("change.add_add_on", a)?)),
        Kind::RemoveAddOn(a) => {
            ChangeRequest::Plain(Change::RemoveAddOn(code("change.remove_add_on", a)?))
        }
    })
}

/// A timing as its message.
pub fn timing(t: Timing) -> pb::ChangeTiming {
    match t {
        Timing::Immediate => pb::ChangeTiming::Immediate,
        Timing::NextCycle => pb::ChangeTiming::NextCycle,
        Timing::ChangeRequest => pb::ChangeTiming::ChangeRequest,
    }
}

/// Invoice lines as messages.
pub fn lines(lines: &[Line]) -> Vec<pb::InvoiceLine> {
    lines
        .iter()
        .map(|l| pb::InvoiceLine {
            description: l.description.clone(),
            amount: Some(money(&l.amount)),
        })
        .collect()
}

fn payment_kind(k: PaymentKind) -> pb::PaymentKind {
    match k {
        PaymentKind::None => pb::PaymentKind::Unspecified,
        PaymentKind::Card => pb::PaymentKind::Card,
        PaymentKind::BankTransfer => pb::PaymentKind::BankTransfer,
        PaymentKind::DirectDebit => pb::PaymentKind::DirectDebit,
    }
}

/// An invoice as its message.
pub fn invoice(i: &InvoiceRecord) -> pb::Invoice {
    pb::Invoice {
        invoice_id: i.invoice_id.clone(),
        number: u64::try_from(i.number).unwrap_or(0),
        account_id: i.account_id.clone(),
        subscription_id: i.subscription_id.clone(),
        kind: i.kind.clone(),
        lines: lines(&i.lines),
        subtotal: Some(money(&i.subtotal)),
        vat_rate: i.vat_rate.to_string(),
        vat: Some(money(&i.vat)),
        total: Some(money(&i.total)),
        status: match i.status {
            InvoiceStatus::Open => pb::InvoiceStatus::Open,
            InvoiceStatus::Paid => pb::InvoiceStatus::Paid,
            InvoiceStatus::Void => pb::InvoiceStatus::Void,
            InvoiceStatus::Pending => pb::InvoiceStatus::Pending,
            InvoiceStatus::Refunded => pb::InvoiceStatus::Refunded,
        } as i32,
        payment_kind: payment_kind(i.payment_kind) as i32,
        issued_at: ts(i.issued_at),
        paid_at: i.paid_at.map(timestamp),
        payment_attempts: i.payment_attempts,
        returned_at: i.returned_at.map(timestamp),
    }
}

fn status(s: Status) -> pb::SubscriptionStatus {
    match s {
        Status::Trialing => pb::SubscriptionStatus::Trialing,
        Status::Active => pb::SubscriptionStatus::Active,
        Status::PastDue => pb::SubscriptionStatus::PastDue,
        Status::Suspended => pb::SubscriptionStatus::Suspended,
        Status::Cancelled => pb::SubscriptionStatus::Cancelled,
        Status::TrialExpired => pb::SubscriptionStatus::TrialExpired,
        Status::Incomplete => pb::SubscriptionStatus::Incomplete,
    }
}

/// Contact usage of a subscription.
pub fn usage(s: &SubscriptionRecord) -> pb::ContactUsage {
    ContactUsage::of(s).to_message()
}

fn history(h: &HistoryRecord) -> pb::HistoryEntry {
    pb::HistoryEntry {
        seq: u64::try_from(h.seq).unwrap_or(0),
        at: ts(h.at),
        actor: h.actor.clone(),
        action: h.action.clone(),
        detail: h.detail.clone(),
    }
}

/// A subscription as its message.
pub fn subscription(
    s: &SubscriptionRecord,
    verified: bool,
    recurring: Option<Money>,
    hist: &[HistoryRecord],
) -> pb::Subscription {
    pb::Subscription {
        subscription_id: s.subscription_id.clone(),
        account_id: s.account_id.clone(),
        plan_id: s.plan_id.clone(),
        plan_version: s.plan_version,
        status: status(s.status) as i32,
        contacts: s.selection.contacts,
        seats: s.selection.seats,
        add_ons: s.selection.add_ons.clone(),
        payment: Some(pb::Payment {
            kind: payment_kind(s.payment_kind) as i32,
            payment_method: s.payment_method.clone(),
        }),
        vat_rate: s.vat_rate.to_string(),
        current_period_start: ts(s.period_start),
        current_period_end: ts(s.period_end),
        trial_ends_at: s.trial_ends_at.map(timestamp),
        verified,
        cancel_at_period_end: s.cancel_at_period_end,
        scheduled_changes: s.scheduled.iter().map(change).collect(),
        recurring_price: recurring.as_ref().map(money),
        usage: Some(usage(s)),
        trial_mails_sent: s.trial_mails_sent,
        trial: s.trial.as_ref().map(terms),
        history: hist.iter().map(history).collect(),
        revision: u64::try_from(s.revision).unwrap_or(0),
    }
}

/// A change request as its message.
pub fn request(r: &ChangeRequestRecord) -> pb::ChangeRequest {
    pb::ChangeRequest {
        request_id: r.request_id.clone(),
        account_id: r.account_id.clone(),
        change: Some(change(&r.change)),
        status: match r.status {
            RequestStatus::Open => pb::ChangeRequestStatus::Open,
            RequestStatus::Approved => pb::ChangeRequestStatus::Approved,
            RequestStatus::Rejected => pb::ChangeRequestStatus::Rejected,
        } as i32,
        filed_by: r.filed_by.clone(),
        filed_at: ts(r.filed_at),
        resolved_by: r.resolved_by.clone(),
        resolved_at: r.resolved_at.map(timestamp),
        note: r.note.clone(),
    }
}

impl Reply for PublishedPlan {
    type Message = pb::Plan;
    fn to_message(&self) -> pb::Plan {
        plan(&self.plan, self.published_at)
    }
}

/// ListPlans' answer.
pub fn plan_list(plans: &[PublishedPlan]) -> pb::ListPlansResponse {
    pb::ListPlansResponse {
        plans: plans.iter().map(Reply::to_message).collect(),
    }
}

impl Reply for SubscriptionView {
    type Message = pb::Subscription;
    fn to_message(&self) -> pb::Subscription {
        subscription(
            &self.sub,
            self.verified,
            Some(self.recurring_price),
            &self.history,
        )
    }
}

impl Reply for AccountRecord {
    type Message = pb::VerifyAccountResponse;
    fn to_message(&self) -> pb::VerifyAccountResponse {
        pb::VerifyAccountResponse {
            account_id: self.account_id.clone(),
            verified: self.verified,
            verified_at: self.verified_at.map(timestamp),
        }
    }
}

impl Reply for ContactUsage {
    type Message = pb::ContactUsage;
    fn to_message(&self) -> pb::ContactUsage {
        pb::ContactUsage {
            active: self.active,
            pending: self.pending,
            limit: self.limit,
        }
    }
}

impl Reply for ContactsAdmitted {
    type Message = pb::AdmitContactsResponse;
    fn to_message(&self) -> pb::AdmitContactsResponse {
        pb::AdmitContactsResponse {
            subscribed: self.subscribed,
            pending_upgrade: self.pending_upgrade,
            usage: Some(self.usage.to_message()),
        }
    }
}

impl Reply for ChangePreview {
    type Message = pb::ChangePreview;
    fn to_message(&self) -> pb::ChangePreview {
        let zero = Money::zero(self.amount_due_today.currency());
        let bill = self.bill.as_ref();
        pb::ChangePreview {
            preview_token: self.preview_token.clone(),
            change: Some(change(&self.change)),
            timing: timing(self.timing) as i32,
            effective_at: self.effective_at.map(timestamp),
            lines: bill.map(|b| lines(&b.lines)).unwrap_or_default(),
            subtotal: Some(money(&bill.map_or(zero, |b| b.subtotal))),
            vat: Some(money(&bill.map_or(zero, |b| b.vat))),
            amount_due_today: Some(money(&self.amount_due_today)),
            new_recurring_price: Some(money(&self.new_recurring_price)),
            expires_at: ts(self.expires_at),
        }
    }
}

impl Reply for ChangeApplied {
    type Message = pb::ApplyChangeResponse;
    fn to_message(&self) -> pb::ApplyChangeResponse {
        pb::ApplyChangeResponse {
            timing: timing(self.timing) as i32,
            effective_at: self.effective_at.map(timestamp),
            subscription: Some(self.subscription.to_message()),
            invoice: self.invoice.as_ref().map(invoice),
            change_request: self.change_request.as_ref().map(request),
            contacts_promoted: self.contacts_promoted,
        }
    }
}

impl Reply for AddOnCancelled {
    type Message = pb::CancelAddOnResponse;
    fn to_message(&self) -> pb::CancelAddOnResponse {
        pb::CancelAddOnResponse {
            effective_at: self.effective_at.map(timestamp),
            subscription: Some(self.subscription.to_message()),
            change_request: self.change_request.as_ref().map(request),
        }
    }
}

impl Reply for ChangeRequestRecord {
    type Message = pb::ChangeRequest;
    fn to_message(&self) -> pb::ChangeRequest {
        request(self)
    }
}

/// ListChangeRequests' answer.
pub fn request_list(requests: &[ChangeRequestRecord]) -> pb::ListChangeRequestsResponse {
    pb::ListChangeRequestsResponse {
        change_requests: requests.iter().map(request).collect(),
    }
}

impl Reply for InvoiceRecord {
    type Message = pb::Invoice;
    fn to_message(&self) -> pb::Invoice {
        invoice(self)
    }
}

/// ListInvoices' answer.
pub fn invoice_list(invoices: &[InvoiceRecord]) -> pb::ListInvoicesResponse {
    pb::ListInvoicesResponse {
        invoices: invoices.iter().map(invoice).collect(),
    }
}

impl Reply for PaymentMethodUpdated {
    type Message = pb::UpdatePaymentMethodResponse;
    fn to_message(&self) -> pb::UpdatePaymentMethodResponse {
        pb::UpdatePaymentMethodResponse {
            subscription: Some(self.subscription.to_message()),
            invoices: self.invoices.iter().map(invoice).collect(),
        }
    }
}

fn refusal(r: SendingRefusal) -> pb::SendingRefusal {
    match r {
        SendingRefusal::NoSubscription => pb::SendingRefusal::NoSubscription,
        SendingRefusal::TrialMailCap => pb::SendingRefusal::TrialMailCap,
        SendingRefusal::BankTransferUnpaid => pb::SendingRefusal::BankTransferUnpaid,
        SendingRefusal::TrialOverNotVerified => pb::SendingRefusal::TrialOverNotVerified,
        SendingRefusal::Cancelled => pb::SendingRefusal::Cancelled,
        SendingRefusal::PaymentPastDue => pb::SendingRefusal::PaymentPastDue,
        SendingRefusal::PaymentPending => pb::SendingRefusal::PaymentPending,
        SendingRefusal::PaymentReturned => pb::SendingRefusal::PaymentReturned,
    }
}

impl Reply for SendingDecision {
    type Message = pb::SendingDecision;
    fn to_message(&self) -> pb::SendingDecision {
        match self.refusal {
            None => pb::SendingDecision {
                allowed: true,
                refusal: pb::SendingRefusal::Unspecified as i32,
                message: String::new(),
                trial_mails_left: self.trial_mails_left,
            },
            Some(r) => pb::SendingDecision {
                allowed: false,
                refusal: refusal(r) as i32,
                message: r.message().to_string(),
                trial_mails_left: self.trial_mails_left,
            },
        }
    }
}
