//! Plan changes: what a change leads to and when (S6-S10, S19), and the prorated quote of an
//! immediate upgrade (S7, S8).

use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use shared::{BillingPeriod, Money, limits::quoted, prorate_change, restart_period_change};

use super::{
    Bill, DomainError, Line, Plan, Product, ProrationPolicy, Selection, arith, bill, check_seats,
    invalid, recurring_lines, recurring_price, sum,
};

/// A change of a subscription (S4). Plan changes carry the resolved version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Another slider position.
    Contacts(u64),
    /// Another seat count.
    Seats(u32),
    /// Same product, another level.
    Level {
        /// Target plan.
        plan_id: String,
        /// Its version.
        version: u32,
    },
    /// Another product (to or from the bundle, or across).
    Product {
        /// Target plan.
        plan_id: String,
        /// Its version.
        version: u32,
    },
    /// Add an add-on.
    AddAddOn(String),
    /// Remove an add-on.
    RemoveAddOn(String),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Contacts(n) => write!(f, "contact tier to {n}"),
            Change::Seats(n) => write!(f, "seats to {n}"),
            Change::Level { plan_id, version } => write!(f, "level: plan {plan_id} v{version}"),
            Change::Product { plan_id, version } => {
                write!(f, "product: plan {plan_id} v{version}")
            }
            Change::AddAddOn(c) => write!(f, "add add-on {c}"),
            Change::RemoveAddOn(c) => write!(f, "remove add-on {c}"),
        }
    }
}

/// When a change takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// S7/S8: upgrades at once.
    Immediate,
    /// S9/S13: downgrades and removals at the next cycle.
    NextCycle,
    /// S10: staff decide.
    ChangeRequest,
}

/// Where a change leads and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The plan after the change (the same plan unless level or product changes).
    pub plan: Plan,
    /// The selection after the change.
    pub selection: Selection,
    /// When it applies.
    pub timing: Timing,
}

/// Applies `change` to (`plan`, `selection`) and classifies it (S7, S9, S10, S19).
/// `new_plan` is the target plan of a level or product change. `active` is the number of
/// active contacts now (S9 floor).
pub fn plan_change(
    plan: &Plan,
    selection: &Selection,
    new_plan: Option<&Plan>,
    change: &Change,
    active: u64,
) -> Result<Target, DomainError> {
    let gate = |allowed: bool| {
        if allowed {
            Timing::NextCycle
        } else {
            Timing::ChangeRequest
        }
    };
    let mut next = selection.clone();
    let (target_plan, timing) = match change {
        Change::Contacts(n) => {
            next.contacts = *n;
            next = next.checked(plan)?;
            match n.cmp(&selection.contacts) {
                std::cmp::Ordering::Equal => {
                    return Err(DomainError::Precondition(format!(
                        "the subscription already has the {n} contact tier"
                    )));
                }
                std::cmp::Ordering::Greater => (plan.clone(), Timing::Immediate),
                std::cmp::Ordering::Less => {
                    // S9: never below the active contacts held now.
                    let lowest = plan.slider.tier_for(active).map_err(|_| {
                        DomainError::Precondition(format!(
                            "{active} active contacts exceed the plan's largest tier"
                        ))
                    })?;
                    if *n < lowest {
                        return Err(DomainError::BelowActiveContacts { active, lowest });
                    }
                    (plan.clone(), gate(plan.self_serve.downgrade))
                }
            }
        }
        Change::Seats(n) => {
            if *n == selection.seats {
                return Err(DomainError::Precondition(format!(
                    "the subscription already has {n} seats"
                )));
            }
            check_seats("change.seats", *n)?;
            next.seats = *n;
            if *n > selection.seats {
                (plan.clone(), Timing::Immediate)
            } else {
                (plan.clone(), gate(plan.self_serve.downgrade))
            }
        }
        Change::AddAddOn(code) => {
            if plan.add_on(code).is_none() {
                return Err(invalid(
                    "change.add_add_on",
                    format!("plan {} has no add-on {}", plan.plan_id, quoted(code)),
                ));
            }
            if selection.add_ons.contains(code) {
                return Err(DomainError::Precondition(format!(
                    "add-on {} is already active",
                    quoted(code)
                )));
            }
            next.add_ons.push(code.clone());
            next.add_ons.sort();
            (plan.clone(), Timing::Immediate)
        }
        Change::RemoveAddOn(code) => {
            if !selection.add_ons.contains(code) {
                return Err(DomainError::Precondition(format!(
                    "add-on {} is not active",
                    quoted(code)
                )));
            }
            next.add_ons.retain(|c| c != code);
            (plan.clone(), gate(plan.self_serve.remove_add_on))
        }
        Change::Level { .. } | Change::Product { .. } => {
            let new_plan = new_plan.ok_or_else(|| DomainError::Precondition("no plan".into()))?;
            if new_plan.currency != plan.currency || new_plan.interval != plan.interval {
                return Err(DomainError::Precondition(format!(
                    "plan {} has another currency or interval",
                    new_plan.plan_id
                )));
            }
            // The tier carries over: the lowest position of the new slider that holds it.
            next.contacts = new_plan
                .slider
                .tier_for(selection.contacts)
                .map_err(|e| DomainError::Precondition(e.to_string()))?;
            if let Some(missing) = next.add_ons.iter().find(|c| new_plan.add_on(c).is_none()) {
                return Err(DomainError::Precondition(format!(
                    "plan {} has no add-on {}: remove it first",
                    new_plan.plan_id,
                    quoted(missing)
                )));
            }
            let timing = if let Change::Level { .. } = change {
                if new_plan.product != plan.product {
                    return Err(invalid(
                        "change.level_plan_id",
                        "a level change stays in the same product; use product_plan_id",
                    ));
                }
                match new_plan.level.rank.cmp(&plan.level.rank) {
                    std::cmp::Ordering::Equal => {
                        return Err(invalid(
                            "change.level_plan_id",
                            "the plan is at the same level",
                        ));
                    }
                    std::cmp::Ordering::Greater => Timing::Immediate,
                    std::cmp::Ordering::Less => gate(plan.self_serve.downgrade),
                }
            } else {
                match (plan.product, new_plan.product) {
                    (a, b) if a == b => {
                        return Err(invalid(
                            "change.product_plan_id",
                            "the plan is of the same product; use level_plan_id",
                        ));
                    }
                    (_, Product::Bundle) => Timing::Immediate,
                    (Product::Bundle, _) => gate(plan.self_serve.unbundle),
                    _ => gate(plan.self_serve.change_product),
                }
            };
            (new_plan.clone(), timing)
        }
    };
    Ok(Target {
        plan: target_plan,
        selection: next,
        timing,
    })
}

/// What an immediate change costs today (S6, S7, S8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeQuote {
    /// Proration lines with VAT and total; `total` is what is charged.
    pub bill: Bill,
    /// The full price per period from the next cycle.
    pub new_recurring: Money,
    /// S8: the period restarts at the change.
    pub restarts_period: bool,
}

/// S7 (`prorate_change`) or S8 (`restart_period_change`), by the policy of `old_plan` (the plan
/// the subscription is on). S19: `at` may be any instant of the period.
pub fn quote_upgrade(
    old_plan: &Plan,
    old: &Selection,
    new_plan: &Plan,
    new: &Selection,
    period: &BillingPeriod,
    at: DateTime<Utc>,
    vat_rate: Decimal,
) -> Result<UpgradeQuote, DomainError> {
    let old_price = recurring_price(old_plan, old)?;
    let new_lines = recurring_lines(new_plan, new)?;
    let new_price = sum(&new_lines, new_plan.currency)?;
    let mut lines = Vec::new();
    let restarts_period = old_plan.proration == ProrationPolicy::RestartPeriod;
    if restarts_period {
        let p = restart_period_change(&old_price, &new_price, period, at).map_err(arith)?;
        lines.push(Line {
            description: "Credit for the unused remainder of the period".into(),
            amount: p.credit.checked_neg().map_err(arith)?,
        });
        lines.extend(new_lines);
    } else {
        let p = prorate_change(&old_price, &new_price, period, at).map_err(arith)?;
        lines.push(Line {
            description: "Unused time on the previous subscription".into(),
            amount: p.credit.checked_neg().map_err(arith)?,
        });
        lines.push(Line {
            description: "Remaining time on the new subscription".into(),
            amount: p.charge,
        });
    }
    let bill = bill(lines, new_plan.currency, vat_rate)?;
    if bill.total.is_negative() {
        return Err(DomainError::Precondition(
            "this change would lower the price: it is not an upgrade".into(),
        ));
    }
    Ok(UpgradeQuote {
        bill,
        new_recurring: new_price,
        restarts_period,
    })
}
