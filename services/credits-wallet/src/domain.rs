//! Pure business rules of the credits wallet (rules C1-C9): credit lots and
//! their consumption order, rated debits (C2), expiry (C7), the low-balance
//! reminder (C3), automatic top-up (C4, C5, C6), debt repayment and the
//! claw-back of a returned direct debit (C9).
//!
//! Nothing here does IO: every function takes the wallet state it needs and
//! returns a plan (which lots to touch, how many credits to buy, whether to
//! emit an event). The service applies the plan inside one transaction and
//! writes the matching ledger entries, keeping the invariant
//! `balance (sum of ledger deltas) = sum of lot remaining - debt`.
//!
//! Credits are whole `i64` numbers (rating rounds up, C2), so there are no
//! floats and no rounding here. Arithmetic never panics: sums saturate or are
//! checked, and differences are only taken where the operands are known to be
//! ordered.

use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, Utc};

/// Largest credit amount accepted in one operation:
/// [`shared::limits::MAX_CREDITS`] (10^12), the suite's one list of limits.
pub use shared::limits::MAX_CREDITS;

/// Errors of the wallet's input validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A credit amount that must be in `1..=max` is not.
    #[error("{field} must be a positive number of credits (1 to {max})")]
    NotPositive {
        /// The name of the offending field, as the API spells it.
        field: &'static str,
        /// The upper bound, [`MAX_CREDITS`].
        max: i64,
    },
    /// Any other invalid input; the message is meant for the caller.
    #[error("{0}")]
    Invalid(String),
}

/// Validates a positive credit amount named `field` (`1..=MAX_CREDITS`) and
/// returns it, so callers can write `let n = positive_credits("credits", n)?;`.
pub fn positive_credits(field: &'static str, value: i64) -> Result<i64, DomainError> {
    if (1..=MAX_CREDITS).contains(&value) {
        Ok(value)
    } else {
        Err(DomainError::NotPositive {
            field,
            max: MAX_CREDITS,
        })
    }
}

// ---------------------------------------------------------------------------
// Lots
// ---------------------------------------------------------------------------

/// Where the credits of a lot came from. The kind decides nothing in the
/// consumption order (only expiry and age do); it is kept for reporting and
/// for rules that target one kind (C7 allowances expire at period end, C8
/// signup credits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LotKind {
    /// Bought by the customer (manually, by auto top-up C4/C5, or on demand C9).
    Purchased,
    /// Granted once when the account is created (C8).
    Signup,
    /// Granted by a promotion.
    Promotional,
    /// Monthly credits of a subscription; they expire at period end (C7).
    SubscriptionAllowance,
    /// A manual correction by support.
    Adjustment,
}

impl LotKind {
    /// Every kind, in declaration order.
    pub const ALL: [LotKind; 5] = [
        LotKind::Purchased,
        LotKind::Signup,
        LotKind::Promotional,
        LotKind::SubscriptionAllowance,
        LotKind::Adjustment,
    ];

    /// The stable name stored in the database and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            LotKind::Purchased => "purchased",
            LotKind::Signup => "signup",
            LotKind::Promotional => "promotional",
            LotKind::SubscriptionAllowance => "subscription_allowance",
            LotKind::Adjustment => "adjustment",
        }
    }

    /// The inverse of [`LotKind::as_str`]; `None` for an unknown name.
    pub fn parse(s: &str) -> Option<LotKind> {
        LotKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for LotKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lot of credits in a wallet: one grant or purchase, consumed over time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lot {
    /// Stable identifier; ledger entries point at it.
    pub lot_id: String,
    /// Where the credits came from.
    pub kind: LotKind,
    /// Credits not yet consumed or expired (never negative).
    pub remaining: i64,
    /// When the lot stops counting (`None` = never). The lot is dead *at*
    /// this instant, not after it.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the lot was granted; orders lots that never expire.
    pub created_at: DateTime<Utc>,
}

impl Lot {
    /// True when the lot can be spent at `now`: it has credits left and has
    /// not expired. Expiry is judged from `expires_at` alone, so credits
    /// whose expiry has passed never count even before the sweep wrote the
    /// expiry entry (C7).
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.remaining > 0 && self.expires_at.is_none_or(|at| at > now)
    }

    /// True when the expiry has passed (`expires_at <= now`), whatever is left.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// The consumption order (FEFO) of two lots: lots that expire first come
/// first, so credits that would otherwise be lost are used before credits
/// that keep (C7 allowances before purchases); lots without expiry follow,
/// oldest first; remaining ties are broken by creation time, then `lot_id`,
/// so the order is total and every replica plans the same debit.
pub fn consumption_cmp(a: &Lot, b: &Lot) -> Ordering {
    let expiry = match (a.expires_at, b.expires_at) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    expiry
        .then_with(|| a.created_at.cmp(&b.created_at))
        .then_with(|| a.lot_id.cmp(&b.lot_id))
}

/// Sorts lots in consumption order (FEFO, see [`consumption_cmp`]).
pub fn consumption_order(lots: &mut [Lot]) {
    lots.sort_by(consumption_cmp);
}

/// The live lots at `now`, in consumption order.
fn live_in_order(lots: &[Lot], now: DateTime<Utc>) -> Vec<&Lot> {
    let mut live: Vec<&Lot> = lots.iter().filter(|l| l.is_live(now)).collect();
    live.sort_by(|a, b| consumption_cmp(a, b));
    live
}

/// Sum of live remaining credits at `now`. Saturates instead of overflowing:
/// with lots bounded by [`MAX_CREDITS`] the cap is unreachable, and a
/// saturated sum still compares correctly against any needed amount.
pub fn live_credits(lots: &[Lot], now: DateTime<Utc>) -> i64 {
    lots.iter()
        .filter(|l| l.is_live(now))
        .fold(0_i64, |acc, l| acc.saturating_add(l.remaining))
}

/// Credits that can be spent now: `max(0, live_credits - held)`. Held credits
/// are reserved by active holds and must survive other debits. A negative
/// `held` (a bug upstream) is treated as 0 rather than inflating the balance.
/// Can be 0 while holds exceed live credits, e.g. after held credits expired.
pub fn available(lots: &[Lot], held: i64, now: DateTime<Utc>) -> i64 {
    live_credits(lots, now).saturating_sub(held.max(0)).max(0)
}

/// The book balance the ledger must show: `sum of lot remaining - debt`
/// (all lots, live or not, because an expiry only leaves the books when its
/// expiry entry is written). `None` on overflow. The service can assert its
/// invariant with it.
pub fn book_balance(lots: &[Lot], debt: i64) -> Option<i64> {
    lots.iter()
        .try_fold(0_i64, |acc, l| acc.checked_add(l.remaining))?
        .checked_sub(debt)
}

/// Credits taken from (or added to) one lot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    /// The lot touched.
    pub lot_id: String,
    /// How many credits (always > 0 in a plan).
    pub credits: i64,
}

/// Sum of the credits of `takes` (saturating; plans never come near the cap).
pub fn total_taken(takes: &[Take]) -> i64 {
    takes
        .iter()
        .fold(0_i64, |acc, t| acc.saturating_add(t.credits))
}

/// Applies a plan of takes to in-memory lots (subtracts each take from its
/// lot). All-or-nothing: on error `lots` is unchanged. Errors if a lot is
/// unknown, a take is not positive, or a take exceeds what the lot holds.
pub fn apply_takes(lots: &mut [Lot], takes: &[Take]) -> Result<(), DomainError> {
    let mut updated: Vec<i64> = lots.iter().map(|l| l.remaining).collect();
    for take in takes {
        if take.credits <= 0 {
            return Err(DomainError::Invalid(format!(
                "take from lot {} must be positive, got {}",
                take.lot_id, take.credits
            )));
        }
        let idx = lots
            .iter()
            .position(|l| l.lot_id == take.lot_id)
            .ok_or_else(|| DomainError::Invalid(format!("unknown lot {}", take.lot_id)))?;
        let slot = &mut updated[idx];
        if take.credits > *slot {
            return Err(DomainError::Invalid(format!(
                "lot {} holds {} credits, cannot take {}",
                take.lot_id, slot, take.credits
            )));
        }
        // take.credits <= *slot and both are non-negative: no underflow.
        *slot -= take.credits;
    }
    for (lot, remaining) in lots.iter_mut().zip(updated) {
        lot.remaining = remaining;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Debits (C2), holds, expiry (C7)
// ---------------------------------------------------------------------------

/// Not enough live credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("insufficient credits: {available} available, {needed} needed, short by {shortfall}")]
pub struct Shortfall {
    /// Credits that could be spent.
    pub available: i64,
    /// Credits the operation needs.
    pub needed: i64,
    /// `needed - available` (> 0).
    pub shortfall: i64,
}

/// Takes up to `credits` from `ordered` lots, first to last; returns the
/// takes and what could not be covered.
fn take_in_order<'a>(ordered: impl IntoIterator<Item = &'a Lot>, credits: i64) -> (Vec<Take>, i64) {
    let mut left = credits.max(0);
    let mut takes = Vec::new();
    for lot in ordered {
        if left == 0 {
            break;
        }
        let take = lot.remaining.min(left);
        if take <= 0 {
            continue;
        }
        // take <= left, both non-negative: no underflow.
        left -= take;
        takes.push(Take {
            lot_id: lot.lot_id.clone(),
            credits: take,
        });
    }
    (takes, left)
}

/// Which lots a debit of `credits` takes from (C2: a rated mailing's cost),
/// in consumption order, considering only live lots and leaving `held`
/// credits untouched: fails with the [`Shortfall`] when
/// `credits > available(lots, held, now)`, and nothing is taken then.
/// `credits <= 0` plans nothing (`Ok(vec![])`).
///
/// Holds reserve an amount, not particular lots, so the debit simply uses
/// the first lots and the held amount stays in the later ones.
pub fn plan_debit(
    lots: &[Lot],
    held: i64,
    credits: i64,
    now: DateTime<Utc>,
) -> Result<Vec<Take>, Shortfall> {
    if credits <= 0 {
        return Ok(Vec::new());
    }
    let avail = available(lots, held, now);
    if credits > avail {
        return Err(Shortfall {
            available: avail,
            needed: credits,
            // credits > avail >= 0: positive and no overflow.
            shortfall: credits - avail,
        });
    }
    let (takes, left) = take_in_order(live_in_order(lots, now), credits);
    debug_assert_eq!(left, 0, "available covered the debit");
    Ok(takes)
}

/// Debit for capturing a hold: the held credits themselves are consumed, so
/// the caller passes `other_holds`, the credits held by every *other* active
/// hold (the wallet's `held` minus this hold's amount), and only those stay
/// protected. Otherwise identical to [`plan_debit`].
pub fn plan_capture(
    lots: &[Lot],
    other_holds: i64,
    credits: i64,
    now: DateTime<Utc>,
) -> Result<Vec<Take>, Shortfall> {
    plan_debit(lots, other_holds, credits, now)
}

/// Lots whose expiry has passed (`expires_at <= now`) with credits left:
/// what an expiry entry must remove, the whole remainder of each lot, in
/// consumption order (C7: monthly subscription credits do not roll over).
pub fn due_expiries(lots: &[Lot], now: DateTime<Utc>) -> Vec<Take> {
    let mut due: Vec<&Lot> = lots
        .iter()
        .filter(|l| l.remaining > 0 && l.is_expired(now))
        .collect();
    due.sort_by(|a, b| consumption_cmp(a, b));
    due.into_iter()
        .map(|l| Take {
            lot_id: l.lot_id.clone(),
            credits: l.remaining,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Debt (C9 claw-back)
// ---------------------------------------------------------------------------

/// The wallet owes credits (a returned direct debit whose credits were
/// already spent): no send is allowed until the debt is repaid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the wallet owes {debt} credits from a returned payment; sending is blocked until it is repaid"
)]
pub struct OutstandingDebt {
    /// Credits owed.
    pub debt: i64,
}

/// True when sends are allowed, i.e. the wallet has no debt.
pub fn sends_allowed(debt: i64) -> bool {
    debt <= 0
}

/// The send gate for debt: `Err` while `debt > 0`.
pub fn check_no_debt(debt: i64) -> Result<(), OutstandingDebt> {
    if sends_allowed(debt) {
        Ok(())
    } else {
        Err(OutstandingDebt { debt })
    }
}

/// Pays back debt from newly granted credits: returns `(repaid, credits left
/// for the new lot)`. Debt is repaid first because credits the customer
/// already spent without paying come before new spending. Negative inputs
/// count as 0.
pub fn repay_debt(debt: i64, granted: i64) -> (i64, i64) {
    let debt = debt.max(0);
    let granted = granted.max(0);
    let repaid = debt.min(granted);
    // repaid <= granted, both non-negative: no underflow.
    (repaid, granted - repaid)
}

/// A returned direct debit claws back `credits` (C9). The purchase's own
/// lot (`own_lot_id`) is taken from first, whether it is still live or has
/// expired unswept: those are exactly the unpaid credits, and taking them
/// back first spares the customer's other credits. Then the other live lots
/// in consumption order, IGNORING holds (the payment failed; holds cannot
/// protect unpaid credits). Whatever cannot be taken becomes debt.
/// Returns `(takes, debt_added)`; `credits <= 0` plans nothing.
pub fn plan_clawback(
    lots: &[Lot],
    own_lot_id: Option<&str>,
    credits: i64,
    now: DateTime<Utc>,
) -> (Vec<Take>, i64) {
    if credits <= 0 {
        return (Vec::new(), 0);
    }
    let own = own_lot_id.and_then(|id| lots.iter().find(|l| l.lot_id == id));
    let others = live_in_order(lots, now)
        .into_iter()
        .filter(|l| own_lot_id != Some(l.lot_id.as_str()));
    take_in_order(own.into_iter().chain(others), credits)
}

/// Whether money taken back from a paid purchase (a refund, a dispute) takes back its
/// credits: all or nothing. Only when the whole price has come back (`reversed_minor`, all
/// refunds so far or the disputed amount, reaches `price_minor`, or the provider says the
/// charge is refunded in full) are all its credits clawed back as for a returned debit (C9).
/// Less than that moves no credits: how many credits a part of a volume-priced purchase (C1)
/// stands for is a business decision, left to an operator (an adjustment).
pub fn reversal_is_whole(price_minor: i64, reversed_minor: i64, complete: bool) -> bool {
    complete || reversed_minor >= price_minor
}

// ---------------------------------------------------------------------------
// Automatic top-up (C4, C5, C6)
// ---------------------------------------------------------------------------

/// Auto top-up settings (C4, C5, C6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoTopUpMode {
    /// C6: switched off.
    Off,
    /// C4: when the available balance falls to `threshold` or below
    /// (0 = used up), buy `amount` credits.
    Fixed {
        /// Balance at or below which a purchase is made (>= 0).
        threshold: i64,
        /// Credits bought each time (> 0).
        amount: i64,
    },
    /// C5: when a send would exceed the balance, buy exactly what is
    /// missing, up to `max_per_purchase`.
    Shortfall {
        /// Most credits bought for one send (> 0).
        max_per_purchase: i64,
    },
}

/// A wallet's automatic top-up configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoTopUp {
    /// What triggers a purchase and how much it buys.
    pub mode: AutoTopUpMode,
    /// Most credits bought automatically per calendar month (None = no
    /// cap), so a runaway sender cannot drain a card.
    pub monthly_cap: Option<i64>,
}

impl AutoTopUp {
    /// No automatic top-up (C6), the default of a new wallet.
    pub const OFF: AutoTopUp = AutoTopUp {
        mode: AutoTopUpMode::Off,
        monthly_cap: None,
    };

    /// Checks the settings: amounts in `1..=MAX_CREDITS`, threshold in
    /// `0..=MAX_CREDITS`, cap in `1..=MAX_CREDITS` when set.
    pub fn validate(&self) -> Result<(), DomainError> {
        match self.mode {
            AutoTopUpMode::Off => {}
            AutoTopUpMode::Fixed { threshold, amount } => {
                if !(0..=MAX_CREDITS).contains(&threshold) {
                    return Err(DomainError::Invalid(format!(
                        "threshold must be between 0 and {MAX_CREDITS} credits, got {threshold}"
                    )));
                }
                positive_credits("amount", amount)?;
            }
            AutoTopUpMode::Shortfall { max_per_purchase } => {
                positive_credits("max_per_purchase", max_per_purchase)?;
            }
        }
        if let Some(cap) = self.monthly_cap {
            positive_credits("monthly_cap", cap)?;
        }
        Ok(())
    }

    /// True unless the mode is [`AutoTopUpMode::Off`].
    pub fn is_on(&self) -> bool {
        !matches!(self.mode, AutoTopUpMode::Off)
    }
}

impl Default for AutoTopUp {
    fn default() -> Self {
        AutoTopUp::OFF
    }
}

/// Why an automatic purchase is not made for a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopUpRefusal {
    /// No auto top-up configured (C6).
    Off,
    /// The fixed amount (C4) does not cover this send.
    TooSmall {
        /// The configured amount.
        amount: i64,
        /// What the send is missing.
        shortfall: i64,
    },
    /// The shortfall is above the per-purchase maximum (C5).
    OverMaxPerPurchase {
        /// What the send is missing.
        shortfall: i64,
        /// The configured maximum.
        max: i64,
    },
    /// Buying would pass the monthly cap.
    MonthlyCapReached {
        /// The configured cap.
        cap: i64,
        /// Credits already bought automatically this calendar month.
        bought: i64,
        /// Credits this purchase would have bought.
        wanted: i64,
    },
}

impl fmt::Display for TopUpRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TopUpRefusal::Off => f.write_str("auto top-up is off"),
            TopUpRefusal::TooSmall { amount, shortfall } => write!(
                f,
                "the automatic top-up of {amount} credits does not cover the shortfall of {shortfall} credits"
            ),
            TopUpRefusal::OverMaxPerPurchase { shortfall, max } => write!(
                f,
                "the shortfall of {shortfall} credits is above the maximum of {max} per automatic purchase"
            ),
            TopUpRefusal::MonthlyCapReached { cap, bought, .. } => write!(
                f,
                "the monthly auto top-up cap of {cap} credits is reached ({bought} bought this month)"
            ),
        }
    }
}

impl std::error::Error for TopUpRefusal {}

/// What to do about the balance before a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopUpPlan {
    /// The available balance covers the send.
    NotNeeded,
    /// Buy this many credits automatically, then debit.
    Buy(i64),
    /// The send fails: nothing is bought and nothing is debited.
    Refused {
        /// How far the balance is from covering the send.
        shortfall: Shortfall,
        /// Why no purchase closes the gap.
        reason: TopUpRefusal,
    },
}

/// `Err(MonthlyCapReached)` when buying `wanted` would take this month's
/// automatic purchases past the cap (an overflowing sum is past any cap).
fn check_cap(cfg: &AutoTopUp, bought_this_month: i64, wanted: i64) -> Result<(), TopUpRefusal> {
    match cfg.monthly_cap {
        Some(cap) => {
            let bought = bought_this_month.max(0);
            match bought.checked_add(wanted) {
                Some(total) if total <= cap => Ok(()),
                _ => Err(TopUpRefusal::MonthlyCapReached {
                    cap,
                    bought,
                    wanted,
                }),
            }
        }
        None => Ok(()),
    }
}

/// Before a send of `needed` credits when `available` are available: buy
/// nothing, buy how many, or refuse (the send then fails and nothing is
/// bought or debited).
///
/// - Enough credits: [`TopUpPlan::NotNeeded`], whatever the mode.
/// - C6 `Off`: refused with [`TopUpRefusal::Off`].
/// - C4 `Fixed { amount }`: buys `amount` when it covers the shortfall,
///   else refuses `TooSmall` (buying would not let the send through).
/// - C5 `Shortfall { max_per_purchase }`: buys exactly the shortfall
///   (available 3000, needed 5000 -> `Buy(2000)`), refused above the max.
/// - Monthly cap: `bought_this_month + buy > cap` -> `MonthlyCapReached`.
pub fn plan_top_up_for_send(
    cfg: &AutoTopUp,
    available: i64,
    needed: i64,
    bought_this_month: i64,
) -> TopUpPlan {
    let available = available.max(0);
    if needed <= available {
        return TopUpPlan::NotNeeded;
    }
    // needed > available >= 0: positive and no overflow.
    let missing = needed - available;
    let shortfall = Shortfall {
        available,
        needed,
        shortfall: missing,
    };
    let buy = match cfg.mode {
        AutoTopUpMode::Off => Err(TopUpRefusal::Off),
        AutoTopUpMode::Fixed { amount, .. } => {
            if amount >= missing {
                Ok(amount)
            } else {
                Err(TopUpRefusal::TooSmall {
                    amount,
                    shortfall: missing,
                })
            }
        }
        AutoTopUpMode::Shortfall { max_per_purchase } => {
            if missing <= max_per_purchase {
                Ok(missing)
            } else {
                Err(TopUpRefusal::OverMaxPerPurchase {
                    shortfall: missing,
                    max: max_per_purchase,
                })
            }
        }
    }
    .and_then(|buy| check_cap(cfg, bought_this_month, buy).map(|()| buy));
    match buy {
        Ok(n) => TopUpPlan::Buy(n),
        Err(reason) => TopUpPlan::Refused { shortfall, reason },
    }
}

/// After a debit (C4): in `Fixed` mode with `available_after <= threshold`
/// (threshold 0 = "used up"), buy `amount`. `None` when the mode is not
/// `Fixed`, the balance is above the threshold, the purchase would pass the
/// monthly cap, or a purchase is already in flight (one automatic purchase
/// at a time, so a burst of debits does not buy the amount several times).
pub fn plan_top_up_after_debit(
    cfg: &AutoTopUp,
    available_after: i64,
    bought_this_month: i64,
    purchase_in_flight: bool,
) -> Option<i64> {
    if purchase_in_flight {
        return None;
    }
    match cfg.mode {
        AutoTopUpMode::Fixed { threshold, amount } if available_after <= threshold => {
            check_cap(cfg, bought_this_month, amount)
                .ok()
                .map(|()| amount)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Low-balance reminder (C3)
// ---------------------------------------------------------------------------

/// Low-balance reminder (C3): one event when the available balance crosses
/// below the threshold, not one per debit; re-armed once the balance is back
/// at or above it.
///
/// `armed` always equals "the last observed balance was >= threshold", so an
/// event fires exactly on each downward crossing. Configuring a reminder
/// while already below the threshold does not fire: it fires the next time
/// the balance goes from >= threshold to < threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reminder {
    /// Balance below which the reminder fires (`None` = no reminder).
    pub threshold: Option<i64>,
    /// True when the next drop below the threshold must fire.
    pub armed: bool,
}

impl Reminder {
    /// A reminder for `threshold` given the current available balance:
    /// armed iff a threshold is set and `available_now >= threshold`.
    pub fn new(threshold: Option<i64>, available_now: i64) -> Reminder {
        Reminder {
            threshold,
            armed: threshold.is_some_and(|t| available_now >= t),
        }
    }

    /// Observes the available balance after a change. Returns the new state
    /// and whether to emit a low-balance event: armed and now below ->
    /// (disarmed, true); disarmed and back at/above -> (armed, false).
    pub fn observe(self, available: i64) -> (Reminder, bool) {
        let Some(threshold) = self.threshold else {
            return (
                Reminder {
                    threshold: None,
                    armed: false,
                },
                false,
            );
        };
        let at_or_above = available >= threshold;
        let fire = self.armed && !at_or_above;
        (
            Reminder {
                threshold: Some(threshold),
                armed: at_or_above,
            },
            fire,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;

    fn t(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, day, 12, 0, 0).unwrap()
    }

    fn lot(
        id: &str,
        kind: LotKind,
        remaining: i64,
        expires: Option<DateTime<Utc>>,
        created: DateTime<Utc>,
    ) -> Lot {
        Lot {
            lot_id: id.to_string(),
            kind,
            remaining,
            expires_at: expires,
            created_at: created,
        }
    }

    fn take(id: &str, credits: i64) -> Take {
        Take {
            lot_id: id.to_string(),
            credits,
        }
    }

    // --- validation -------------------------------------------------------

    #[test]
    fn positive_credits_bounds() {
        assert_eq!(positive_credits("credits", 1), Ok(1));
        assert_eq!(positive_credits("credits", MAX_CREDITS), Ok(MAX_CREDITS));
        for bad in [0, -1, MAX_CREDITS + 1, i64::MIN, i64::MAX] {
            assert_eq!(
                positive_credits("credits", bad),
                Err(DomainError::NotPositive {
                    field: "credits",
                    max: MAX_CREDITS
                })
            );
        }
        assert_eq!(
            positive_credits("amount", 0).unwrap_err().to_string(),
            "amount must be a positive number of credits (1 to 1000000000000)"
        );
    }

    #[test]
    fn lot_kind_round_trips() {
        for k in LotKind::ALL {
            assert_eq!(LotKind::parse(k.as_str()), Some(k));
            assert_eq!(k.to_string(), k.as_str());
        }
        assert_eq!(
            LotKind::SubscriptionAllowance.as_str(),
            "subscription_allowance"
        );
        assert_eq!(LotKind::parse("Purchased"), None);
        assert_eq!(LotKind::parse(""), None);
    }

    // --- lots -------------------------------------------------------------

    #[test]
    fn liveness() {
        let now = t(10);
        assert!(lot("a", LotKind::Purchased, 1, None, t(1)).is_live(now));
        assert!(!lot("a", LotKind::Purchased, 0, None, t(1)).is_live(now));
        assert!(lot("a", LotKind::Signup, 5, Some(t(11)), t(1)).is_live(now));
        // Dead at the expiry instant itself.
        assert!(!lot("a", LotKind::Signup, 5, Some(now), t(1)).is_live(now));
        assert!(lot("a", LotKind::Signup, 5, Some(now), t(1)).is_expired(now));
        assert!(!lot("a", LotKind::Signup, 5, Some(t(9)), t(1)).is_live(now));
        assert!(!lot("a", LotKind::Signup, 5, None, t(1)).is_expired(now));
    }

    #[test]
    fn fefo_allowance_before_purchase() {
        // C7: an allowance expiring at month end goes before a purchase that keeps.
        let mut lots = vec![
            lot("p", LotKind::Purchased, 100, None, t(1)),
            lot(
                "allow",
                LotKind::SubscriptionAllowance,
                100,
                Some(t(31)),
                t(2),
            ),
        ];
        consumption_order(&mut lots);
        assert_eq!(lots[0].lot_id, "allow");
        assert_eq!(plan_debit(&lots, 0, 50, t(10)), Ok(vec![take("allow", 50)]));
    }

    #[test]
    fn fefo_earliest_expiry_then_oldest_then_id() {
        let mut lots = vec![
            lot("n2", LotKind::Purchased, 1, None, t(3)),
            lot("e2", LotKind::Promotional, 1, Some(t(20)), t(1)),
            lot("n1b", LotKind::Purchased, 1, None, t(2)),
            lot("e1", LotKind::Signup, 1, Some(t(15)), t(5)),
            lot("n1a", LotKind::Adjustment, 1, None, t(2)),
        ];
        consumption_order(&mut lots);
        let ids: Vec<&str> = lots.iter().map(|l| l.lot_id.as_str()).collect();
        assert_eq!(ids, ["e1", "e2", "n1a", "n1b", "n2"]);
    }

    #[test]
    fn expired_lots_never_used_even_unswept() {
        let now = t(10);
        let lots = vec![
            lot("old", LotKind::SubscriptionAllowance, 500, Some(t(5)), t(1)),
            lot("p", LotKind::Purchased, 100, None, t(2)),
        ];
        assert_eq!(live_credits(&lots, now), 100);
        assert_eq!(available(&lots, 0, now), 100);
        assert_eq!(plan_debit(&lots, 0, 100, now), Ok(vec![take("p", 100)]));
        assert_eq!(
            plan_debit(&lots, 0, 101, now),
            Err(Shortfall {
                available: 100,
                needed: 101,
                shortfall: 1
            })
        );
    }

    #[test]
    fn available_subtracts_holds_and_never_negative() {
        let now = t(10);
        let lots = vec![lot("p", LotKind::Purchased, 100, None, t(1))];
        assert_eq!(available(&lots, 30, now), 70);
        assert_eq!(available(&lots, 100, now), 0);
        assert_eq!(available(&lots, 500, now), 0);
        assert_eq!(available(&lots, -5, now), 100);
        assert_eq!(available(&[], 0, now), 0);
    }

    #[test]
    fn book_balance_counts_all_lots_minus_debt() {
        // Expired-but-unswept lots still count until their expiry entry is written.
        let lots = vec![
            lot("old", LotKind::Signup, 5, Some(t(1)), t(1)),
            lot("p", LotKind::Purchased, 10, None, t(1)),
        ];
        assert_eq!(book_balance(&lots, 3), Some(12));
        let huge = vec![
            lot("x", LotKind::Purchased, i64::MAX, None, t(1)),
            lot("y", LotKind::Purchased, 1, None, t(1)),
        ];
        assert_eq!(book_balance(&huge, 0), None);
    }

    // --- plan_debit / capture ---------------------------------------------

    #[test]
    fn plan_debit_splits_exactly_across_lots() {
        let now = t(10);
        let lots = vec![
            lot("p", LotKind::Purchased, 1000, None, t(1)),
            lot(
                "allow",
                LotKind::SubscriptionAllowance,
                300,
                Some(t(31)),
                t(1),
            ),
            lot("promo", LotKind::Promotional, 200, Some(t(15)), t(3)),
            lot("empty", LotKind::Signup, 0, Some(t(12)), t(1)),
        ];
        assert_eq!(
            plan_debit(&lots, 0, 700, now),
            Ok(vec![take("promo", 200), take("allow", 300), take("p", 200)])
        );
        assert_eq!(plan_debit(&lots, 0, 200, now), Ok(vec![take("promo", 200)]));
        assert_eq!(plan_debit(&lots, 0, 0, now), Ok(vec![]));
        assert_eq!(plan_debit(&lots, 0, -3, now), Ok(vec![]));
        assert_eq!(
            plan_debit(&lots, 0, 1500, now).map(|v| total_taken(&v)),
            Ok(1500)
        );
    }

    #[test]
    fn plan_debit_protects_held_credits() {
        let now = t(10);
        let lots = vec![
            lot("a", LotKind::SubscriptionAllowance, 300, Some(t(31)), t(1)),
            lot("p", LotKind::Purchased, 200, None, t(1)),
        ];
        // 500 live, 400 held -> 100 available.
        assert_eq!(plan_debit(&lots, 400, 100, now), Ok(vec![take("a", 100)]));
        let err = plan_debit(&lots, 400, 250, now).unwrap_err();
        assert_eq!(
            err,
            Shortfall {
                available: 100,
                needed: 250,
                shortfall: 150
            }
        );
        assert_eq!(
            err.to_string(),
            "insufficient credits: 100 available, 250 needed, short by 150"
        );
    }

    #[test]
    fn capture_consumes_its_own_hold() {
        let now = t(10);
        let lots = vec![lot("p", LotKind::Purchased, 500, None, t(1))];
        // Wallet holds 500 in total: this hold 300, others 200.
        assert!(plan_debit(&lots, 500, 300, now).is_err());
        assert_eq!(plan_capture(&lots, 200, 300, now), Ok(vec![take("p", 300)]));
        assert!(plan_capture(&lots, 200, 301, now).is_err());
    }

    #[test]
    fn apply_takes_is_all_or_nothing() {
        let mut lots = vec![
            lot("a", LotKind::Purchased, 10, None, t(1)),
            lot("b", LotKind::Purchased, 5, None, t(2)),
        ];
        apply_takes(&mut lots, &[take("a", 4), take("b", 5)]).unwrap();
        assert_eq!((lots[0].remaining, lots[1].remaining), (6, 0));
        let before = lots.clone();
        assert!(apply_takes(&mut lots, &[take("a", 6), take("b", 1)]).is_err());
        assert!(apply_takes(&mut lots, &[take("a", 3), take("a", 4)]).is_err());
        assert!(apply_takes(&mut lots, &[take("zzz", 1)]).is_err());
        assert!(apply_takes(&mut lots, &[take("a", 0)]).is_err());
        assert_eq!(lots, before);
    }

    // --- expiry (C7) --------------------------------------------------------

    #[test]
    fn due_expiries_c7_allowance_does_not_roll_over() {
        let period_end = t(31);
        let mut lots = vec![
            lot(
                "allow",
                LotKind::SubscriptionAllowance,
                1000,
                Some(period_end),
                t(1),
            ),
            lot("p", LotKind::Purchased, 50, None, t(1)),
            lot(
                "later",
                LotKind::Promotional,
                70,
                Some(t(31) + Duration::days(30)),
                t(1),
            ),
            lot("spent", LotKind::Signup, 0, Some(t(2)), t(1)),
        ];
        // 400 of the 1000 allowance credits are used during the month.
        let takes = plan_debit(&lots, 0, 400, t(20)).unwrap();
        assert_eq!(takes, vec![take("allow", 400)]);
        apply_takes(&mut lots, &takes).unwrap();
        assert_eq!(due_expiries(&lots, t(30)), vec![]);
        // At period end the other 600 expire; nothing else does.
        assert_eq!(due_expiries(&lots, period_end), vec![take("allow", 600)]);
        assert_eq!(available(&lots, 0, period_end), 120);
    }

    #[test]
    fn due_expiries_in_expiry_order() {
        let lots = vec![
            lot("b", LotKind::Promotional, 2, Some(t(5)), t(1)),
            lot("a", LotKind::Signup, 3, Some(t(3)), t(1)),
        ];
        assert_eq!(due_expiries(&lots, t(10)), vec![take("a", 3), take("b", 2)]);
        assert_eq!(due_expiries(&lots, t(4)), vec![take("a", 3)]);
    }

    // --- debt and claw-back (C9) ------------------------------------------------

    #[test]
    fn debt_blocks_sends() {
        assert!(sends_allowed(0));
        assert!(!sends_allowed(1));
        assert_eq!(check_no_debt(0), Ok(()));
        assert_eq!(check_no_debt(7), Err(OutstandingDebt { debt: 7 }));
    }

    #[test]
    fn repay_debt_cases() {
        assert_eq!(repay_debt(0, 500), (0, 500));
        assert_eq!(repay_debt(200, 500), (200, 300));
        assert_eq!(repay_debt(500, 500), (500, 0));
        assert_eq!(repay_debt(800, 500), (500, 0));
        assert_eq!(repay_debt(-1, 10), (0, 10));
        assert_eq!(repay_debt(10, -1), (0, 0));
    }

    #[test]
    fn only_the_whole_price_coming_back_claws_credits_back() {
        assert!(reversal_is_whole(42_000, 42_000, false));
        assert!(reversal_is_whole(42_000, 42_000, true));
        assert!(reversal_is_whole(42_000, 50_000, false));
        assert!(
            reversal_is_whole(42_000, 0, true),
            "Stripe's `refunded` decides"
        );
        assert!(!reversal_is_whole(42_000, 41_999, false));
        assert!(!reversal_is_whole(42_000, 0, false));
    }

    #[test]
    fn clawback_own_lot_first_then_others_then_debt() {
        let now = t(10);
        // Bought 1000, spent 700: own lot has 300 left.
        let lots = vec![
            lot("own", LotKind::Purchased, 300, None, t(5)),
            lot("p", LotKind::Purchased, 200, None, t(1)),
            lot(
                "allow",
                LotKind::SubscriptionAllowance,
                100,
                Some(t(31)),
                t(1),
            ),
            lot("gone", LotKind::Promotional, 999, Some(t(9)), t(1)),
        ];
        let (takes, debt) = plan_clawback(&lots, Some("own"), 1000, now);
        assert_eq!(
            takes,
            vec![take("own", 300), take("allow", 100), take("p", 200)]
        );
        assert_eq!(debt, 400);

        // Enough in the own lot: nothing else is touched.
        assert_eq!(
            plan_clawback(&lots, Some("own"), 250, now),
            (vec![take("own", 250)], 0)
        );
        // No own lot known: live lots in consumption order.
        assert_eq!(
            plan_clawback(&lots, None, 150, now),
            (vec![take("allow", 100), take("p", 50)], 0)
        );
        assert_eq!(plan_clawback(&lots, Some("own"), 0, now), (vec![], 0));
        assert_eq!(plan_clawback(&[], Some("own"), 50, now), (vec![], 50));
    }

    #[test]
    fn clawback_takes_expired_own_lot_and_ignores_holds() {
        let now = t(10);
        let lots = vec![
            lot("own", LotKind::Purchased, 100, Some(t(9)), t(1)),
            lot("p", LotKind::Purchased, 100, None, t(1)),
        ];
        let (takes, debt) = plan_clawback(&lots, Some("own"), 150, now);
        assert_eq!(takes, vec![take("own", 100), take("p", 50)]);
        assert_eq!(debt, 0);
    }

    // --- auto top-up (C4, C5, C6) -----------------------------------------------

    const SHORT_10K: AutoTopUp = AutoTopUp {
        mode: AutoTopUpMode::Shortfall {
            max_per_purchase: 10_000,
        },
        monthly_cap: None,
    };

    #[test]
    fn validate_settings() {
        assert_eq!(AutoTopUp::OFF.validate(), Ok(()));
        assert_eq!(AutoTopUp::default(), AutoTopUp::OFF);
        assert!(!AutoTopUp::OFF.is_on());
        assert!(SHORT_10K.is_on());
        assert_eq!(SHORT_10K.validate(), Ok(()));
        let fixed = |threshold, amount, cap| AutoTopUp {
            mode: AutoTopUpMode::Fixed { threshold, amount },
            monthly_cap: cap,
        };
        assert_eq!(fixed(0, 1000, Some(5000)).validate(), Ok(()));
        assert!(matches!(
            fixed(-1, 1000, None).validate(),
            Err(DomainError::Invalid(_))
        ));
        assert_eq!(
            fixed(0, 0, None).validate(),
            Err(DomainError::NotPositive {
                field: "amount",
                max: MAX_CREDITS
            })
        );
        assert!(fixed(0, MAX_CREDITS + 1, None).validate().is_err());
        assert_eq!(
            fixed(0, 10, Some(0)).validate(),
            Err(DomainError::NotPositive {
                field: "monthly_cap",
                max: MAX_CREDITS
            })
        );
        assert_eq!(
            AutoTopUp {
                mode: AutoTopUpMode::Shortfall {
                    max_per_purchase: 0
                },
                monthly_cap: None
            }
            .validate(),
            Err(DomainError::NotPositive {
                field: "max_per_purchase",
                max: MAX_CREDITS
            })
        );
    }

    #[test]
    fn top_up_for_send_c5_buys_exact_shortfall() {
        assert_eq!(
            plan_top_up_for_send(&SHORT_10K, 3000, 5000, 0),
            TopUpPlan::Buy(2000)
        );
    }

    #[test]
    fn top_up_for_send_not_needed_when_enough() {
        assert_eq!(
            plan_top_up_for_send(&SHORT_10K, 5000, 5000, 0),
            TopUpPlan::NotNeeded
        );
        assert_eq!(
            plan_top_up_for_send(&AutoTopUp::OFF, 5000, 100, 0),
            TopUpPlan::NotNeeded
        );
    }

    #[test]
    fn top_up_for_send_off_refuses_c6() {
        let plan = plan_top_up_for_send(&AutoTopUp::OFF, 3000, 5000, 0);
        assert_eq!(
            plan,
            TopUpPlan::Refused {
                shortfall: Shortfall {
                    available: 3000,
                    needed: 5000,
                    shortfall: 2000
                },
                reason: TopUpRefusal::Off
            }
        );
        assert_eq!(TopUpRefusal::Off.to_string(), "auto top-up is off");
    }

    #[test]
    fn top_up_for_send_max_per_purchase() {
        let cfg = AutoTopUp {
            mode: AutoTopUpMode::Shortfall {
                max_per_purchase: 2000,
            },
            monthly_cap: None,
        };
        assert_eq!(
            plan_top_up_for_send(&cfg, 3000, 5000, 0),
            TopUpPlan::Buy(2000)
        );
        let TopUpPlan::Refused { shortfall, reason } = plan_top_up_for_send(&cfg, 2500, 5000, 0)
        else {
            panic!("expected refusal");
        };
        assert_eq!(shortfall.shortfall, 2500);
        assert_eq!(
            reason,
            TopUpRefusal::OverMaxPerPurchase {
                shortfall: 2500,
                max: 2000
            }
        );
        assert_eq!(
            reason.to_string(),
            "the shortfall of 2500 credits is above the maximum of 2000 per automatic purchase"
        );
    }

    #[test]
    fn top_up_for_send_monthly_cap() {
        let cfg = AutoTopUp {
            monthly_cap: Some(10_000),
            ..SHORT_10K
        };
        assert_eq!(
            plan_top_up_for_send(&cfg, 3000, 5000, 8000),
            TopUpPlan::Buy(2000)
        );
        let plan = plan_top_up_for_send(&cfg, 3000, 5001, 8000);
        let TopUpPlan::Refused { reason, .. } = plan else {
            panic!("expected refusal");
        };
        assert_eq!(
            reason,
            TopUpRefusal::MonthlyCapReached {
                cap: 10_000,
                bought: 8000,
                wanted: 2001
            }
        );
        assert_eq!(
            reason.to_string(),
            "the monthly auto top-up cap of 10000 credits is reached (8000 bought this month)"
        );
        // An absurd bought_this_month cannot overflow into a purchase.
        assert!(matches!(
            plan_top_up_for_send(&cfg, 0, 1, i64::MAX),
            TopUpPlan::Refused { .. }
        ));
    }

    #[test]
    fn top_up_for_send_fixed_covering_and_not() {
        let cfg = AutoTopUp {
            mode: AutoTopUpMode::Fixed {
                threshold: 500,
                amount: 5000,
            },
            monthly_cap: None,
        };
        // Buys the whole fixed amount, not just the shortfall.
        assert_eq!(
            plan_top_up_for_send(&cfg, 1000, 3000, 0),
            TopUpPlan::Buy(5000)
        );
        assert_eq!(
            plan_top_up_for_send(&cfg, 1000, 6000, 0),
            TopUpPlan::Buy(5000)
        );
        let plan = plan_top_up_for_send(&cfg, 1000, 6001, 0);
        assert_eq!(
            plan,
            TopUpPlan::Refused {
                shortfall: Shortfall {
                    available: 1000,
                    needed: 6001,
                    shortfall: 5001
                },
                reason: TopUpRefusal::TooSmall {
                    amount: 5000,
                    shortfall: 5001
                }
            }
        );
        let capped = AutoTopUp {
            monthly_cap: Some(9000),
            ..cfg
        };
        assert!(matches!(
            plan_top_up_for_send(&capped, 1000, 3000, 4001),
            TopUpPlan::Refused {
                reason: TopUpRefusal::MonthlyCapReached { wanted: 5000, .. },
                ..
            }
        ));
        assert_eq!(
            TopUpRefusal::TooSmall {
                amount: 5000,
                shortfall: 5001
            }
            .to_string(),
            "the automatic top-up of 5000 credits does not cover the shortfall of 5001 credits"
        );
    }

    #[test]
    fn top_up_after_debit_c4() {
        let used_up = AutoTopUp {
            mode: AutoTopUpMode::Fixed {
                threshold: 0,
                amount: 1000,
            },
            monthly_cap: None,
        };
        // C4 "used up": threshold 0 and nothing left.
        assert_eq!(plan_top_up_after_debit(&used_up, 0, 0, false), Some(1000));
        assert_eq!(plan_top_up_after_debit(&used_up, 1, 0, false), None);
        let low = AutoTopUp {
            mode: AutoTopUpMode::Fixed {
                threshold: 500,
                amount: 2000,
            },
            monthly_cap: Some(5000),
        };
        assert_eq!(plan_top_up_after_debit(&low, 500, 0, false), Some(2000));
        assert_eq!(plan_top_up_after_debit(&low, 501, 0, false), None);
        // One automatic purchase at a time.
        assert_eq!(plan_top_up_after_debit(&low, 100, 0, true), None);
        // Cap: 3000 + 2000 fits, 3001 + 2000 does not.
        assert_eq!(plan_top_up_after_debit(&low, 100, 3000, false), Some(2000));
        assert_eq!(plan_top_up_after_debit(&low, 100, 3001, false), None);
        // Other modes never buy after a debit.
        assert_eq!(plan_top_up_after_debit(&SHORT_10K, 0, 0, false), None);
        assert_eq!(plan_top_up_after_debit(&AutoTopUp::OFF, 0, 0, false), None);
    }

    // --- reminder (C3) ----------------------------------------------------------

    #[test]
    fn reminder_new() {
        assert!(Reminder::new(Some(100), 100).armed);
        assert!(!Reminder::new(Some(100), 99).armed);
        assert!(!Reminder::new(None, 1_000).armed);
    }

    #[test]
    fn reminder_fires_once_per_crossing_c3() {
        let r = Reminder::new(Some(1000), 5000);
        let (r, fired) = r.observe(1500);
        assert!(!fired);
        let (r, fired) = r.observe(900);
        assert!(fired, "crossing below fires");
        let (r, fired) = r.observe(400);
        assert!(!fired, "further debits do not fire again");
        let (r, fired) = r.observe(1000);
        assert!(!fired);
        assert!(r.armed, "back at the threshold re-arms");
        let (r, fired) = r.observe(999);
        assert!(fired, "the next crossing fires again");
        assert!(!r.armed);
    }

    #[test]
    fn reminder_configured_below_does_not_fire_immediately() {
        let r = Reminder::new(Some(1000), 500);
        let (r, fired) = r.observe(400);
        assert!(!fired);
        let (r, _) = r.observe(2000);
        let (_, fired) = r.observe(10);
        assert!(fired);
    }

    #[test]
    fn reminder_without_threshold_never_fires() {
        let r = Reminder {
            threshold: None,
            armed: true,
        };
        let (r, fired) = r.observe(-5);
        assert!(!fired);
        assert!(!r.armed);
    }

    // --- property tests -----------------------------------------------------------

    fn base() -> DateTime<Utc> {
        t(15)
    }

    prop_compose! {
        fn arb_lot(idx: usize)(
            kind in prop::sample::select(LotKind::ALL.to_vec()),
            remaining in prop_oneof![Just(0_i64), 0_i64..1_000],
            expires in prop::option::of(-5_i64..5),
            created in -10_i64..0,
        ) -> Lot {
            Lot {
                lot_id: format!("lot{idx:02}"),
                kind,
                remaining,
                expires_at: expires.map(|d| base() + Duration::hours(d)),
                created_at: base() + Duration::hours(created),
            }
        }
    }

    fn arb_lots() -> impl Strategy<Value = Vec<Lot>> {
        (0_usize..8).prop_flat_map(|n| (0..n).map(arb_lot).collect::<Vec<_>>())
    }

    /// Checks the structural properties of a plan against the live lots in
    /// consumption order: positive takes, within remaining, only live lots,
    /// each lot at most once, in order, every lot before the last one drained.
    fn assert_fefo_plan(
        lots: &[Lot],
        takes: &[Take],
        now: DateTime<Utc>,
    ) -> Result<(), TestCaseError> {
        let order = live_in_order(lots, now);
        let mut last_pos: Option<usize> = None;
        for tk in takes {
            prop_assert!(tk.credits > 0);
            let pos = order.iter().position(|l| l.lot_id == tk.lot_id);
            prop_assert!(pos.is_some(), "took from a non-live lot {}", tk.lot_id);
            let pos = pos.unwrap_or_default();
            prop_assert!(tk.credits <= order[pos].remaining);
            prop_assert!(last_pos.is_none_or(|p| pos > p), "out of order");
            last_pos = Some(pos);
        }
        if let Some(last) = last_pos {
            for (i, l) in order.iter().enumerate().take(last) {
                let taken = takes
                    .iter()
                    .find(|tk| tk.lot_id == l.lot_id)
                    .map(|tk| tk.credits);
                prop_assert_eq!(
                    taken,
                    Some(l.remaining),
                    "lot {} before the last taken one not drained",
                    i
                );
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn prop_plan_debit(lots in arb_lots(), held in 0_i64..3_000, credits in -10_i64..6_000) {
            let now = base();
            let avail = available(&lots, held, now);
            prop_assert!(avail >= 0);
            prop_assert!(avail <= live_credits(&lots, now));
            match plan_debit(&lots, held, credits, now) {
                Ok(takes) => {
                    prop_assert!(credits <= avail);
                    prop_assert_eq!(total_taken(&takes), credits.max(0));
                    assert_fefo_plan(&lots, &takes, now)?;
                    // Held credits survive the debit.
                    let mut after = lots.clone();
                    prop_assert!(apply_takes(&mut after, &takes).is_ok());
                    prop_assert!(live_credits(&after, now) >= held.min(live_credits(&lots, now)));
                    prop_assert_eq!(available(&after, held, now), avail - credits.max(0));
                }
                Err(s) => {
                    prop_assert!(credits > avail);
                    prop_assert_eq!(s.available, avail);
                    prop_assert_eq!(s.needed, credits);
                    prop_assert_eq!(s.shortfall, credits - avail);
                    prop_assert!(s.shortfall > 0);
                }
            }
        }

        #[test]
        fn prop_consumption_order_is_total(mut lots in arb_lots()) {
            let mut reversed: Vec<Lot> = lots.iter().rev().cloned().collect();
            consumption_order(&mut lots);
            consumption_order(&mut reversed);
            prop_assert_eq!(&lots, &reversed);
            for w in lots.windows(2) {
                prop_assert!(consumption_cmp(&w[0], &w[1]) != Ordering::Greater);
                // Expiring lots come before never-expiring ones.
                prop_assert!(!(w[0].expires_at.is_none() && w[1].expires_at.is_some()));
            }
        }

        #[test]
        fn prop_due_expiries_complement_live(lots in arb_lots()) {
            let now = base();
            let due = due_expiries(&lots, now);
            for tk in &due {
                let l = lots.iter().find(|l| l.lot_id == tk.lot_id);
                prop_assert!(l.is_some_and(|l| l.is_expired(now) && l.remaining == tk.credits && tk.credits > 0));
            }
            let total: i64 = lots.iter().map(|l| l.remaining).sum();
            prop_assert_eq!(live_credits(&lots, now) + total_taken(&due), total);
            // After the expiry entries nothing is due and nothing live changed.
            let mut after = lots.clone();
            prop_assert!(apply_takes(&mut after, &due).is_ok());
            prop_assert!(due_expiries(&after, now).is_empty());
            prop_assert_eq!(live_credits(&after, now), live_credits(&lots, now));
        }

        #[test]
        fn prop_clawback(lots in arb_lots(), own in prop::option::of(0_usize..8), credits in 0_i64..5_000) {
            let now = base();
            let own_id = own.map(|i| format!("lot{i:02}"));
            let (takes, debt) = plan_clawback(&lots, own_id.as_deref(), credits, now);
            prop_assert!(debt >= 0);
            prop_assert_eq!(total_taken(&takes) + debt, credits);
            let mut after = lots.clone();
            prop_assert!(apply_takes(&mut after, &takes).is_ok());
            for (i, tk) in takes.iter().enumerate() {
                let is_own = own_id.as_deref() == Some(tk.lot_id.as_str());
                prop_assert!(!is_own || i == 0, "own lot must come first");
                let l = lots.iter().find(|l| l.lot_id == tk.lot_id);
                prop_assert!(is_own || l.is_some_and(|l| l.is_live(now)));
            }
            if debt > 0 {
                // Everything reachable was taken.
                prop_assert_eq!(live_credits(&after, now), 0);
            }
        }

        #[test]
        fn prop_top_up_for_send(
            max in 1_i64..5_000,
            threshold in 0_i64..1_000,
            amount in 1_i64..5_000,
            fixed in any::<bool>(),
            cap in prop::option::of(1_i64..20_000),
            avail in 0_i64..5_000,
            needed in 0_i64..10_000,
            bought in 0_i64..20_000,
        ) {
            let mode = if fixed {
                AutoTopUpMode::Fixed { threshold, amount }
            } else {
                AutoTopUpMode::Shortfall { max_per_purchase: max }
            };
            let cfg = AutoTopUp { mode, monthly_cap: cap };
            prop_assert!(cfg.validate().is_ok());
            match plan_top_up_for_send(&cfg, avail, needed, bought) {
                TopUpPlan::NotNeeded => prop_assert!(needed <= avail),
                TopUpPlan::Buy(n) => {
                    prop_assert!(n > 0);
                    prop_assert!(avail + n >= needed);
                    prop_assert!(cap.is_none_or(|c| bought + n <= c));
                    if !fixed { prop_assert_eq!(avail + n, needed); }
                }
                TopUpPlan::Refused { shortfall, .. } => {
                    prop_assert!(needed > avail);
                    prop_assert_eq!(shortfall.shortfall, needed - avail);
                }
            }
        }

        #[test]
        fn prop_reminder_fires_at_each_downward_crossing(
            threshold in 0_i64..100,
            initial in 0_i64..200,
            seq in prop::collection::vec(0_i64..200, 0..40),
        ) {
            let mut r = Reminder::new(Some(threshold), initial);
            let mut prev = initial;
            let mut events = 0;
            let mut crossings = 0;
            for &a in &seq {
                let (next, fired) = r.observe(a);
                let crossing = prev >= threshold && a < threshold;
                prop_assert_eq!(fired, crossing, "prev {} now {}", prev, a);
                prop_assert_eq!(next.armed, a >= threshold);
                events += i32::from(fired);
                crossings += i32::from(crossing);
                r = next;
                prev = a;
            }
            prop_assert_eq!(events, crossings);
        }
    }
}
