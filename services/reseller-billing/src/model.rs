//! The reseller's stored records and their enumerations (plain data, no IO), with the text each
//! enumeration is stored as.

use chrono::{DateTime, Utc};
use shared::{Currency, TierTable};

use crate::domain::{BillingMode, Funding, Payer};

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

macro_rules! text_enum {
    ($ty:ty { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The stored text.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
            /// Parses the stored text.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}

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
