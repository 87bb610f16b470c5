//! Credit lots and their consumption order (FEFO), live and available credits, and the plans
//! of a debit (C2), a capture and the expiry of lots (C7).

use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, Utc};

use super::validation::DomainError;

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
pub(super) fn live_in_order(lots: &[Lot], now: DateTime<Utc>) -> Vec<&Lot> {
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
pub(super) fn take_in_order<'a>(
    ordered: impl IntoIterator<Item = &'a Lot>,
    credits: i64,
) -> (Vec<Take>, i64) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::domain::fixtures::*;
    use chrono::{DateTime, Duration, Utc};
    use proptest::prelude::*;

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
    }
}
