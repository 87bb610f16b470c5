//! Pure domain code shared by every service of the billing suite: no IO, no
//! database, no RPC.
//!
//! * [`currency`]: supported ISO 4217 currencies and their minor units.
//! * [`money`]: exact amounts; the suite's single rounding function.
//! * [`credits`]: whole, non-negative credit balances and signed ledger deltas.
//! * [`tiers`]: tier tables for contact plans (S3) and credit volume prices
//!   (C1), and the contact slider (S9).
//! * [`period`]: billing intervals and anchor-based periods.
//! * [`proration`]: per-second proration of plan changes (S7, S8, S19).
//! * [`rating`]: credits consumed by a mailing (C2).
//! * [`gateway`]: the payment-provider port and a deterministic simulator.
//! * [`limits`]: the maximum of every quantity, amount and string a client sends, the checks
//!   that enforce them, and [`limits::quoted`] for client values in error messages.
//!
//! # Invariants
//!
//! * No floats: money is [`rust_decimal::Decimal`], credits are `i64`.
//! * Money is rounded in exactly one place, [`Money::round_to_minor_unit`]
//!   (half away from zero, to the currency's minor unit, once per invoice
//!   line / charge). Everything else stays exact or calls it.
//! * Credits are whole numbers and balances are never negative.
//! * All arithmetic is checked; failures are typed errors, never panics.

pub mod credits;
pub mod currency;
pub mod gateway;
pub mod limits;
pub mod money;
pub mod period;
pub mod proration;
pub mod rating;
pub mod tiers;

pub use credits::{CreditDelta, Credits, CreditsError};
pub use currency::{Currency, UnknownCurrency};
pub use gateway::{
    ChargeOutcome, ChargeRecord, ChargeRequest, ChargeStatus, DeclineReason, GatewayError,
    PaymentGateway, SimulatedGateway,
};
pub use limits::{LimitError, quoted};
pub use money::{Money, MoneyError};
pub use period::{BillingInterval, BillingPeriod, PeriodError, period_containing, period_start};
pub use proration::{
    Proration, ProrationError, fraction_remaining, prorate, prorate_change, restart_period_change,
};
pub use rating::{MAX_RECIPIENTS, RatingError, RatingRule};
pub use tiers::{ContactSlider, Tier, TierError, TierMode, TierTable};
