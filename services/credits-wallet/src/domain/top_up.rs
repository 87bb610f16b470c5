//! Automatic top-up (C4, C5, C6): its settings and what to buy before a send or after a debit.

use std::fmt;

use super::{
    lots::Shortfall,
    validation::{DomainError, MAX_CREDITS, positive_credits},
};

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
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

    proptest! {
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
    }
}
