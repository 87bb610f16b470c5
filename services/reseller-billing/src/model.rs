//! The reseller's stored records and their enumerations (plain data, no IO), with the text each
//! enumeration is stored as.

use chrono::{DateTime, Utc};
use proto::wallet::v1 as wpb;
use shared::{Currency, Money, TierTable};

use crate::domain::{BillingMode, Funding, Payer, Usage};

/// Which routed operation a send is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendKind {
    /// ChargeMailing: debited at once.
    Charge,
    /// ReserveMailing: held, captured or released later.
    Hold,
}

/// Where a routed send stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStatus {
    /// Routed; the wallet's outcome not recorded yet (a retry with the same key completes it).
    Pending,
    /// The wallet debited or held.
    Done,
    /// The wallet refused.
    Failed,
}

/// Where a routed hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldStatus {
    /// Holding credits.
    Active,
    /// Debited (CaptureMailing).
    Captured,
    /// Given back (ReleaseMailing).
    Released,
}

use runtime::text_enum;

text_enum!(BillingMode { PartnerPays => "partner_pays", CustomerPays => "customer_pays" });
text_enum!(Funding { Prepaid => "prepaid", OnDemand => "on_demand" });
text_enum!(Payer { Partner => "partner", Customer => "customer" });
text_enum!(SendKind { Charge => "charge", Hold => "hold" });
text_enum!(SendStatus { Pending => "pending", Done => "done", Failed => "failed" });
text_enum!(HoldStatus { Active => "active", Captured => "captured", Released => "released" });

/// A partner as stored.
#[derive(Debug, Clone)]
pub struct PartnerRecord {
    /// Id.
    pub partner_id: String,
    /// Currency of its wallet.
    pub currency: Currency,
    /// Prepaid or on demand.
    pub funding: Funding,
    /// Card or direct-debit token.
    pub payment_method: String,
    /// Its main wallet.
    pub wallet_id: String,
    /// Hex-encoded `CreditPricing`.
    pub pricing: String,
    /// Hex-encoded `RatingRule`.
    pub rating: String,
    /// `shared::TierTable` JSON, or "".
    pub resale_prices: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A customer as stored.
#[derive(Debug, Clone)]
pub struct CustomerRecord {
    /// Id (the partner's own: two partners may use the same).
    pub customer_id: String,
    /// Its partner.
    pub partner_id: String,
    /// Who pays.
    pub billing_mode: BillingMode,
    /// Sends refused.
    pub suspended: bool,
    /// Monthly cap of partner credits (0 = none).
    pub monthly_limit: i64,
    /// Its own wallet ("" = none yet).
    pub wallet_id: String,
}

/// A routed send or hold as stored.
#[derive(Debug, Clone)]
pub struct RoutedRecord {
    /// The caller's idempotency key.
    pub idempotency_key: String,
    /// Charge or hold.
    pub kind: SendKind,
    /// Partner.
    pub partner_id: String,
    /// Customer.
    pub customer_id: String,
    /// Who pays.
    pub payer: Payer,
    /// The wallet debited.
    pub payer_wallet_id: String,
    /// Mailing.
    pub mailing_id: String,
    /// Recipients.
    pub recipients: i64,
    /// Credits.
    pub credits: i64,
    /// Where the send stands.
    pub status: SendStatus,
    /// The wallet's hold id.
    pub reservation_id: Option<String>,
    /// Where the hold stands (a hold the wallet made).
    pub reservation_status: Option<HoldStatus>,
    /// The wallet key of a send routed before keys were scoped by partner and still pending at
    /// that upgrade (`rs:<key>:send`): its retry asks the wallet under the key of its first
    /// try, never a new one. `None` for every later send (its wallet key derives from its key).
    pub former_wallet_key: Option<String>,
}

impl PartnerRecord {
    /// Its resale price list, if it set one.
    pub fn resale_table(&self) -> Result<Option<TierTable>, runtime::db::DbError> {
        if self.resale_prices.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&self.resale_prices)
            .map(Some)
            .map_err(|_| runtime::db::DbError::Corrupt("resale prices".into()))
    }
}

// What the use cases answer (`convert` turns each into its response message). The wallet
// service's own answers are passed through as its messages.

/// A partner with its main wallet.
#[derive(Debug, Clone)]
pub struct PartnerView {
    /// The partner.
    pub partner: PartnerRecord,
    /// Its main wallet, as the wallet service shows it now.
    pub wallet: wpb::Wallet,
    /// Its resale price list, if it set one.
    pub resale_prices: Option<TierTable>,
}

/// A customer with the partner credits it used this month.
#[derive(Debug, Clone)]
pub struct CustomerView {
    /// The customer.
    pub customer: CustomerRecord,
    /// Partner credits used (or routed, pending or held) this month: what its cap counts.
    pub used_this_month: i64,
}

/// One page of a partner's customers.
#[derive(Debug, Clone)]
pub struct CustomerPage {
    /// The customers, by id.
    pub customers: Vec<CustomerView>,
    /// The last id of this page when there are more ("" = the last page).
    pub next_page_token: String,
}

/// Partner credits moved into a customer's own wallet.
#[derive(Debug, Clone)]
pub struct Allocation {
    /// The customer.
    pub customer_id: String,
    /// The wallet service's transfer.
    pub transfer: wpb::CreditTransfer,
}

/// What the wallet did for a routed send (step 2).
pub enum Outcome {
    /// ChargeMailing went through.
    Charged(wpb::MailingCharge),
    /// ReserveCredits went through.
    Held(wpb::Reservation),
}

/// A routed hold after CaptureMailing or ReleaseMailing.
#[derive(Debug, Clone)]
pub struct RoutedHold {
    /// The routing, as saved.
    pub routed: RoutedRecord,
    /// The wallet service's hold.
    pub reservation: wpb::Reservation,
}

/// One customer's line of a usage statement.
#[derive(Debug, Clone)]
pub struct StatementLine {
    /// The customer.
    pub customer_id: String,
    /// What it sent and who paid.
    pub usage: Usage,
    /// What the partner bills it (none without resale prices).
    pub amount: Option<Money>,
}

/// What a partner bills its customers for a month (W1).
#[derive(Debug, Clone)]
pub struct Statement {
    /// The partner.
    pub partner_id: String,
    /// The year.
    pub year: i32,
    /// The month, 1 to 12.
    pub month: u32,
    /// Per customer that sent.
    pub customers: Vec<StatementLine>,
    /// The sum of the amounts (none without resale prices).
    pub total: Option<Money>,
}
