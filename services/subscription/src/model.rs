//! The service's stored records and their enumerations, and the answers of its use cases
//! (plain data, no IO; `convert` turns the answers into messages).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use shared::{BillingPeriod, Currency, Money, PeriodError};

use crate::domain::{
    Bill, Change, Line, Plan, Selection, SendingRefusal, Status, Timing, TrialTerms,
};

/// How a subscription pays (S18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentKind {
    /// Nothing on file yet (a trial).
    None,
    /// A card token: charged at once, sending at once.
    Card,
    /// Bank transfer: invoices stay open until the money arrives; sending waits for it.
    BankTransfer,
    /// A direct-debit mandate: charged like a card, access and sending at once, but the invoice
    /// is only pending until the debit settles; a returned debit reopens it and refuses sending
    /// until it is paid (S18 applied to a payment that came back).
    DirectDebit,
}

impl PaymentKind {
    /// Whether the gateway charges this kind (card or direct debit), as opposed to waiting for
    /// a transfer.
    pub fn charged_by_gateway(self) -> bool {
        matches!(self, PaymentKind::Card | PaymentKind::DirectDebit)
    }
}

/// Where an invoice stands. Its lines and amounts never change once issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvoiceStatus {
    /// Awaiting payment.
    Open,
    /// Paid.
    Paid,
    /// Cancelled (its number stays used).
    Void,
    /// A direct debit was submitted and has not settled: not paid yet.
    Pending,
    /// Paid, then refunded in full through the payment provider (Stripe's `charge.refunded`):
    /// the money went back by the platform's own decision; the subscription is not touched.
    Refunded,
}

/// Where a change request stands (S10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    /// Waiting for staff.
    Open,
    /// Approved: scheduled for the next cycle.
    Approved,
    /// Rejected.
    Rejected,
}

use runtime::text_enum;

text_enum!(PaymentKind { None => "none", Card => "card", BankTransfer => "bank_transfer", DirectDebit => "direct_debit" });
text_enum!(InvoiceStatus { Open => "open", Paid => "paid", Void => "void", Pending => "pending", Refunded => "refunded" });
text_enum!(RequestStatus { Open => "open", Approved => "approved", Rejected => "rejected" });

/// An account's review state (S16).
#[derive(Debug, Clone)]
pub struct AccountRecord {
    /// Id.
    pub account_id: String,
    /// Reviewed.
    pub verified: bool,
    /// When.
    pub verified_at: Option<DateTime<Utc>>,
}

/// A subscription as stored (one per account).
#[derive(Debug, Clone)]
pub struct SubscriptionRecord {
    /// Id.
    pub subscription_id: String,
    /// The account.
    pub account_id: String,
    /// Plan.
    pub plan_id: String,
    /// The plan version bought (kept across republishing).
    pub plan_version: u32,
    /// Status.
    pub status: Status,
    /// Tier, seats, add-ons.
    pub selection: Selection,
    /// Card, bank transfer, or none yet.
    pub payment_kind: PaymentKind,
    /// Card token.
    pub payment_method: String,
    /// The account's VAT rate.
    pub vat_rate: Decimal,
    /// Periods are computed from here.
    pub anchor: DateTime<Utc>,
    /// Index of the current period from the anchor.
    pub period_index: u32,
    /// Count of periods billed so far (survives an S8 restart of the anchor).
    pub cycle: i64,
    /// Current period (the trial window during a trial).
    pub period_start: DateTime<Utc>,
    /// Its end.
    pub period_end: DateTime<Utc>,
    /// When the trial ends.
    pub trial_ends_at: Option<DateTime<Utc>>,
    /// The trial's terms (S14).
    pub trial: Option<TrialTerms>,
    /// Mails sent in the trial.
    pub trial_mails_sent: u64,
    /// "Trial ending" announced.
    pub trial_ending_notified: bool,
    /// S13.
    pub cancel_at_period_end: bool,
    /// Changes for the next cycle.
    pub scheduled: Vec<Change>,
    /// S1: active (subscribed) contacts.
    pub active_contacts: u64,
    /// S12: pending-upgrade contacts.
    pub pending_contacts: u64,
    /// Bumped by every change of price, plan or period (preview tokens name it).
    pub revision: i64,
    /// A payment in flight for this subscription (the change it pays for).
    pub pending_op: Option<String>,
    /// The idempotency key of the Subscribe that created it.
    pub origin_key: Option<String>,
    /// Last cycle whose credit allowance was granted (-1 = none).
    pub allowance_cycle: i64,
    /// The month of that cycle granted last (0-based; yearly plans grant every month, C7).
    pub allowance_month: i64,
    /// When the next month of the current period is due for its grant (yearly plans).
    pub allowance_next: Option<DateTime<Utc>>,
    /// The last gateway payment of a Subscribe or an immediate change.
    pub payment_op: Option<PaymentOp>,
    /// Set while `payment_op`'s outcome is unknown (the jobs reconcile it after a grace time).
    pub payment_since: Option<DateTime<Utc>>,
    /// Set while the month's credits wait for the account's wallet to be opened (C7): the
    /// jobs ask the wallet again from then on. Cleared when a month is recorded or a new
    /// period starts.
    pub allowance_wait: Option<DateTime<Utc>>,
    /// Last history sequence number.
    pub history_seq: i64,
    /// Created.
    pub created_at: DateTime<Utc>,
}

/// Where the billing period [`SubscriptionRecord::begin_period`] begins starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeriodStart {
    /// A new run of periods anchored at this instant: Subscribe, a trial's conversion (S15),
    /// an upgrade that restarts the period (S8).
    Anchor(DateTime<Utc>),
    /// The period after the current one, from the same anchor: a renewal.
    Next,
}

impl SubscriptionRecord {
    /// Begins a billing period on `plan` (the plan it is billed on): the period's bounds, a new
    /// cycle (one invoice per cycle), and the cycle's months of credits due in the wallet
    /// unless the plan grants none (C7). The one place the period and cycle move; the caller
    /// bumps the revision with whatever else it changes. Returns the new period.
    pub fn begin_period(
        &mut self,
        start: PeriodStart,
        plan: &Plan,
    ) -> Result<BillingPeriod, PeriodError> {
        let (anchor, index) = match start {
            PeriodStart::Anchor(at) => (at, 0),
            PeriodStart::Next => (
                self.anchor,
                self.period_index
                    .checked_add(1)
                    .ok_or(PeriodError::OutOfRange)?,
            ),
        };
        let period = BillingPeriod::nth(anchor, plan.interval, index)?;
        self.anchor = anchor;
        self.period_index = index;
        self.period_start = period.start;
        self.period_end = period.end;
        self.cycle += 1;
        // The last cycle granted: the one before (its months are due) or, with no credits to
        // grant, this one.
        self.allowance_cycle = if plan.monthly_credits > 0 {
            self.allowance_cycle.min(self.cycle - 1)
        } else {
            self.cycle
        };
        self.allowance_next = None;
        self.allowance_wait = None;
        Ok(period)
    }
}

impl SubscriptionRecord {
    /// How many contacts may be subscribed now: the tier, or the trial's cap (S12, S14).
    pub fn contact_limit(&self) -> u64 {
        match (self.status, self.trial) {
            (Status::Trialing, Some(t)) if t.contact_cap > 0 => t.contact_cap,
            _ => self.selection.contacts,
        }
    }
}

/// One history entry.
#[derive(Debug, Clone)]
pub struct HistoryRecord {
    /// 1, 2, ...
    pub seq: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// Details.
    pub detail: String,
}

/// An issued invoice.
#[derive(Debug, Clone)]
pub struct InvoiceRecord {
    /// Id (also the gateway key stem).
    pub invoice_id: String,
    /// Consecutive number.
    pub number: i64,
    /// Account.
    pub account_id: String,
    /// Subscription.
    pub subscription_id: String,
    /// subscribe, renewal, conversion, change.
    pub kind: String,
    /// The cycle a subscribe/renewal/conversion invoice bills.
    pub cycle: Option<i64>,
    /// Currency.
    pub currency: Currency,
    /// Rounded lines.
    pub lines: Vec<Line>,
    /// Sum of lines.
    pub subtotal: Money,
    /// VAT rate.
    pub vat_rate: Decimal,
    /// VAT.
    pub vat: Money,
    /// Total.
    pub total: Money,
    /// Status.
    pub status: InvoiceStatus,
    /// How it is paid.
    pub payment_kind: PaymentKind,
    /// Card token.
    pub payment_method: String,
    /// Card attempts so far.
    pub payment_attempts: u32,
    /// Next card attempt.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Issued.
    pub issued_at: DateTime<Utc>,
    /// Paid.
    pub paid_at: Option<DateTime<Utc>>,
    /// The gateway key of the charge that paid it or is settling (empty before any).
    pub gateway_key: String,
    /// When a direct debit for it was returned (it is open again, sending refused).
    pub returned_at: Option<DateTime<Utc>>,
}

/// A gateway payment made by a request (Subscribe, an immediate change), kept with the
/// subscription so that a retry of the request, or the jobs when the client never retries,
/// finish it with the same gateway key and apply its outcome exactly once.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PaymentOp {
    /// The request's mark (`pending_op`) while in flight.
    pub op: String,
    /// The gateway's idempotency key.
    pub gateway_key: String,
    /// Card or mandate token.
    pub payment_method: String,
    /// Amount in minor units of `currency`.
    pub amount_minor: i64,
    /// ISO-4217.
    pub currency: String,
    /// Statement description.
    pub description: String,
    /// Who asked for it (the history names them when the jobs finish it).
    pub actor: String,
    /// What it pays for.
    pub purpose: PaymentPurpose,
    /// `None` while unknown; then "paid", "pending" (direct debit) or "declined: <reason>".
    pub outcome: Option<String>,
}

/// What a [`PaymentOp`] pays for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PaymentPurpose {
    /// The first invoice of a Subscribe (already issued, open).
    Subscribe {
        /// The invoice.
        invoice_id: String,
    },
    /// An immediate change (S7/S8), applied only once paid (S6: nothing changes before).
    Change {
        /// The change, resolved to plan versions.
        change: Change,
        /// The revision the preview was made on.
        revision: i64,
        /// The preview's instant (micros): the quote is computed there.
        at_us: i64,
    },
}

/// A change request (S10).
#[derive(Debug, Clone)]
pub struct ChangeRequestRecord {
    /// Id.
    pub request_id: String,
    /// Subscription.
    pub subscription_id: String,
    /// Account.
    pub account_id: String,
    /// The change asked for.
    pub change: Change,
    /// Status.
    pub status: RequestStatus,
    /// Who filed it.
    pub filed_by: String,
    /// When.
    pub filed_at: DateTime<Utc>,
    /// Who resolved it.
    pub resolved_by: String,
    /// When.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Staff note.
    pub note: String,
}

// ---- answers of the use cases (as messages: `convert::Reply`) ----------------------------

/// A published plan version.
#[derive(Debug, Clone)]
pub struct PublishedPlan {
    /// The plan.
    pub plan: Plan,
    /// When this version was published.
    pub published_at: DateTime<Utc>,
}

/// A subscription as it is shown: the record, the account's review, its price and history.
#[derive(Debug, Clone)]
pub struct SubscriptionView {
    /// The record.
    pub sub: SubscriptionRecord,
    /// The account passed its review (S16).
    pub verified: bool,
    /// The price of a period of its plan and selection.
    pub recurring_price: Money,
    /// Its history, oldest first (S5).
    pub history: Vec<HistoryRecord>,
}

/// Contact slots in use (S1, S12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContactUsage {
    /// Subscribed contacts.
    pub active: u64,
    /// Contacts pending upgrade.
    pub pending: u64,
    /// The limit of the subscription's tier (or trial cap).
    pub limit: u64,
}

impl ContactUsage {
    /// The usage of `sub`.
    pub fn of(sub: &SubscriptionRecord) -> ContactUsage {
        ContactUsage {
            active: sub.active_contacts,
            pending: sub.pending_contacts,
            limit: sub.contact_limit(),
        }
    }
}

/// What AdmitContacts did.
#[derive(Debug, Clone, Copy)]
pub struct ContactsAdmitted {
    /// Admitted as subscribed.
    pub subscribed: u64,
    /// Left pending upgrade.
    pub pending_upgrade: u64,
    /// The usage after.
    pub usage: ContactUsage,
}

/// What a change would do and cost now (S6), with the token that applies it.
#[derive(Debug, Clone)]
pub struct ChangePreview {
    /// Signed token naming the revision, the instant and the amount.
    pub preview_token: String,
    /// The change, resolved (a level or product names its plan version).
    pub change: Change,
    /// When it would apply.
    pub timing: Timing,
    /// From when (none for a change request).
    pub effective_at: Option<DateTime<Utc>>,
    /// The invoice an immediate change issues.
    pub bill: Option<Bill>,
    /// What is charged today (zero unless immediate).
    pub amount_due_today: Money,
    /// The price of a period afterwards.
    pub new_recurring_price: Money,
    /// Until when the token is accepted.
    pub expires_at: DateTime<Utc>,
}

/// What ApplyChange did.
#[derive(Debug, Clone)]
pub struct ChangeApplied {
    /// Applied now, scheduled, or filed as a request.
    pub timing: Timing,
    /// From when (none for a change request).
    pub effective_at: Option<DateTime<Utc>>,
    /// The subscription after.
    pub subscription: SubscriptionView,
    /// The invoice of an immediate change.
    pub invoice: Option<InvoiceRecord>,
    /// The request filed for staff (S10).
    pub change_request: Option<ChangeRequestRecord>,
    /// Pending contacts promoted by an upgrade (S12).
    pub contacts_promoted: u64,
}

/// What CancelAddOn did (S13, S10).
#[derive(Debug, Clone)]
pub struct AddOnCancelled {
    /// When the add-on ends (none when a request was filed).
    pub effective_at: Option<DateTime<Utc>>,
    /// The subscription after.
    pub subscription: SubscriptionView,
    /// The request filed for staff.
    pub change_request: Option<ChangeRequestRecord>,
}

/// What UpdatePaymentMethod did.
#[derive(Debug, Clone)]
pub struct PaymentMethodUpdated {
    /// The subscription after.
    pub subscription: SubscriptionView,
    /// The invoices moved to the new method, as they are after collecting them.
    pub invoices: Vec<InvoiceRecord>,
}

/// Whether an account may send (S2, S13, S14, S16, S18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendingDecision {
    /// Why not, if not.
    pub refusal: Option<SendingRefusal>,
    /// Free trial mails left (S14).
    pub trial_mails_left: u64,
}
