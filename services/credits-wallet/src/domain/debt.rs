//! Debt (C9): the send gate while a wallet owes credits, repayment from new credits, and the
//! claw-back of a returned direct debit or a reversed payment.

use chrono::{DateTime, Utc};

use super::lots::{Lot, Take, live_in_order, take_in_order};

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::domain::{
        fixtures::*,
        lots::{LotKind, apply_takes, live_credits, total_taken},
    };
    use proptest::prelude::*;
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

    proptest! {
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
    }
}
