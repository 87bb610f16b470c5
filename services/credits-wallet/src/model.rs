//! The wallet's stored records and their enumerations (plain data, no IO).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use shared::{Currency, Money, RatingRule, TierTable};

use crate::domain::{AutoTopUp, Lot, Reminder};

/// How a wallet pays for sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FundingMode {
    /// Credits bought in advance (C1).
    Prepaid,
    /// Each send buys exactly the credits it lacks through the method on file (C9).
    OnDemand,
}

/// What started a purchase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurchaseTrigger {
    /// `PurchaseCredits`.
    Manual,
    /// C4: the balance fell to the threshold.
    AutoFixed,
    /// C5: a send lacked credits.
    AutoShortfall,
    /// C9: an on-demand send.
    OnDemand,
}

impl PurchaseTrigger {
    /// Whether a purchase with this trigger, started by a request (`has_origin`), pays for a
    /// send now (C5, C9): its credits are granted as soon as the payment is accepted, even a
    /// direct debit that settles later (a return claws them back).
    pub fn funds_a_send(self, has_origin: bool) -> bool {
        has_origin && self != PurchaseTrigger::Manual
    }
}

/// Where a purchase stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurchaseStatus {
    /// Sent (or about to be sent) to the gateway; outcome not known for sure.
    Processing,
    /// A direct debit submitted and not settled yet.
    PendingSettlement,
    /// Paid.
    Succeeded,
    /// Declined; nothing granted.
    Failed,
    /// A direct debit returned; its credits were clawed back.
    Returned,
}

/// Where a hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    /// Holding credits.
    Active,
    /// Debited.
    Captured,
    /// Given back without a debit.
    Released,
    /// Lapsed at its expiry.
    Expired,
}

/// What a ledger entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Credits bought.
    Purchase,
    /// Credits granted (signup, promotional, subscription allowance).
    Grant,
    /// A mailing charged at once.
    Mailing,
    /// A hold captured.
    ReservationCapture,
    /// Credits that expired unused.
    Expiry,
    /// An operator's correction.
    Adjustment,
    /// Credits taken back after a returned direct debit.
    Clawback,
    /// Credits moved to or from another wallet.
    Transfer,
}

use runtime::text_enum;

text_enum!(FundingMode { Prepaid => "prepaid", OnDemand => "on_demand" });
text_enum!(PurchaseTrigger {
    Manual => "manual",
    AutoFixed => "auto_fixed",
    AutoShortfall => "auto_shortfall",
    OnDemand => "on_demand",
});
text_enum!(PurchaseStatus {
    Processing => "processing",
    PendingSettlement => "pending_settlement",
    Succeeded => "succeeded",
    Failed => "failed",
    Returned => "returned",
});
text_enum!(ReservationStatus {
    Active => "active",
    Captured => "captured",
    Released => "released",
    Expired => "expired",
});
text_enum!(EntryKind {
    Purchase => "purchase",
    Grant => "grant",
    Mailing => "mailing",
    ReservationCapture => "reservation_capture",
    Expiry => "expiry",
    Adjustment => "adjustment",
    Clawback => "clawback",
    Transfer => "transfer",
});

/// A wallet's stored header (lots, entries, purchases and holds are separate rows).
#[derive(Debug, Clone)]
pub struct WalletRecord {
    /// Caller-chosen id.
    pub wallet_id: String,
    /// Currency of its purchases.
    pub currency: Currency,
    /// Sum of the ledger.
    pub balance: i64,
    /// Credits held by active reservations.
    pub held: i64,
    /// Credits owed after a returned direct debit.
    pub debt: i64,
    /// Last ledger sequence number.
    pub ledger_seq: i64,
    /// Prepaid or on demand.
    pub funding: FundingMode,
    /// Payment-method token on file ("" = none).
    pub payment_method: String,
    /// C2 rating.
    pub rating: RatingRule,
    /// C1 price list.
    pub pricing: TierTable,
    /// C4/C5/C6.
    pub top_up: AutoTopUp,
    /// C3.
    pub reminder: Reminder,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
}

/// A purchase of credits.
#[derive(Debug, Clone)]
pub struct PurchaseRecord {
    /// Id, also the gateway idempotency key.
    pub purchase_id: String,
    /// Wallet credited.
    pub wallet_id: String,
    /// Idempotency key of the request that caused it.
    pub origin_key: Option<String>,
    /// What started it.
    pub trigger: PurchaseTrigger,
    /// Credits bought.
    pub credits: i64,
    /// Price, rounded to the minor unit.
    pub amount: Money,
    /// Token charged.
    pub payment_method: String,
    /// Where it stands.
    pub status: PurchaseStatus,
    /// Why it failed.
    pub failure_reason: String,
    /// The lot it granted, once granted.
    pub lot_id: Option<String>,
    /// Expiry of the credits it grants.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A hold.
#[derive(Debug, Clone)]
pub struct ReservationRecord {
    /// Id.
    pub reservation_id: String,
    /// Wallet.
    pub wallet_id: String,
    /// The platform's mailing.
    pub mailing_id: String,
    /// Credits held.
    pub credits: i64,
    /// Where it stands.
    pub status: ReservationStatus,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
    /// Credits debited at capture.
    pub captured_credits: i64,
}

/// One ledger entry as stored.
#[derive(Debug, Clone)]
pub struct EntryRecord {
    /// 1, 2, 3, ... per wallet.
    pub seq: i64,
    /// What it records.
    pub kind: EntryKind,
    /// Signed change.
    pub delta: i64,
    /// Balance after it.
    pub balance_after: i64,
    /// What caused it.
    pub reference: String,
    /// Free text.
    pub description: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// What a send or a capture did to its wallet: its answer, before it is encoded (by
/// `convert`, for the caller and for the idempotency key).
#[derive(Debug, Clone)]
pub enum SendDone {
    /// ChargeMailing debited the mailing.
    Charged(Box<MailingCharged>),
    /// ReserveCredits placed a hold, or CaptureReservation captured one.
    Hold(HoldChanged),
}

/// A mailing charged (C2), with what was bought for it (C5, C9).
#[derive(Debug, Clone)]
pub struct MailingCharged {
    /// `<wallet_id>:<ledger sequence>` of the debit.
    pub charge_id: String,
    /// The wallet.
    pub wallet_id: String,
    /// The mailing.
    pub mailing_id: String,
    /// Its recipients.
    pub recipients: u64,
    /// Credits debited.
    pub credits: i64,
    /// The purchase that bought credits for this send, if one did.
    pub purchase: Option<PurchaseRecord>,
    /// The wallet's balance after the debit.
    pub balance_after: i64,
    /// Its available credits after the debit.
    pub available_after: i64,
}

/// A hold as a send or a capture left it, with the wallet's balances after.
#[derive(Debug, Clone)]
pub struct HoldChanged {
    /// The hold.
    pub reservation: ReservationRecord,
    /// The wallet's balance after the change.
    pub balance_after: i64,
    /// Its available credits after the change.
    pub available_after: i64,
}

/// A send use case's answer: what it did, or the first answer to its idempotency key, replayed
/// as it was recorded (encoded).
#[derive(Debug, Clone)]
pub enum SendAnswer {
    /// Done by this call.
    Done(SendDone),
    /// The recorded answer of an earlier call with the same key.
    Replayed(Vec<u8>),
}

/// A wallet as a use case answers it: its header, with what is available and its live lots
/// (each with the credits it was granted) at the time of the answer.
#[derive(Debug, Clone)]
pub struct WalletView {
    /// The stored header.
    pub wallet: WalletRecord,
    /// Credits that can be spent now (C6: live lots, less holds).
    pub available: i64,
    /// The lots not yet expired, in consumption order.
    pub lots: Vec<(Lot, i64)>,
    /// Credits bought by auto top-up this calendar month (C6's monthly cap).
    pub auto_bought_this_month: i64,
}

/// A grant or an adjustment: its ledger entry and the wallet after it.
#[derive(Debug, Clone)]
pub struct WalletChanged {
    /// The entry written.
    pub entry: EntryRecord,
    /// The wallet after it.
    pub wallet: WalletView,
}

/// Credits moved between two wallets.
#[derive(Debug, Clone)]
pub struct Transferred {
    /// Credits moved.
    pub credits: i64,
    /// The wallet debited, after the move.
    pub from: WalletView,
    /// The wallet credited, after the move.
    pub to: WalletView,
}

/// A page of a wallet's ledger.
#[derive(Debug, Clone)]
pub struct LedgerPage {
    /// The entries, in sequence order.
    pub entries: Vec<EntryRecord>,
    /// Whether entries follow the last one.
    pub more: bool,
}

/// The price of credits (C1).
#[derive(Debug, Clone)]
pub struct CreditQuote {
    /// Credits priced.
    pub credits: i64,
    /// Their price, rounded to the minor unit.
    pub amount: Money,
    /// The unit price of the band they fall in.
    pub unit_price: Decimal,
}

/// What a mailing would cost (C2) and whether the wallet covers it now.
#[derive(Debug, Clone)]
pub struct MailingRated {
    /// Its recipients.
    pub recipients: u64,
    /// Credits it needs.
    pub credits: i64,
    /// Whether the available credits cover it and the wallet owes nothing.
    pub covered: bool,
    /// Credits available now.
    pub available: i64,
}
