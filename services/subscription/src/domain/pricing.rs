//! Prices: the recurring lines of a selection on a plan, and a bill with its VAT (S3, S4).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use shared::{Currency, Money, limits::quoted};

use super::{DomainError, Plan, Selection, arith, invalid};

/// One invoice line, rounded to the minor unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// What it is for.
    pub description: String,
    /// Rounded amount (negative for credits).
    pub amount: Money,
}

fn line(description: String, exact: Money) -> Line {
    Line {
        description,
        amount: exact.round_to_minor_unit(),
    }
}

/// The recurring price of `selection` on `plan`, one rounded line per component: the contact
/// tier (S1, S3), extra seats, each add-on (S4).
pub fn recurring_lines(plan: &Plan, selection: &Selection) -> Result<Vec<Line>, DomainError> {
    let tier = plan
        .contact_tiers
        .price(selection.contacts)
        .map_err(|e| invalid("contacts", e.to_string()))?;
    let mut lines = vec![line(
        format!(
            "{} {} ({}), up to {} contacts",
            plan.name,
            plan.level.name,
            plan.product.as_str(),
            selection.contacts
        ),
        tier,
    )];
    let extra = selection.seats.saturating_sub(plan.included_seats);
    if extra > 0 {
        let price = plan
            .seat_price
            .checked_mul(Decimal::from(extra))
            .ok_or_else(|| arith("seat price overflow"))?;
        lines.push(line(
            format!("{extra} extra seats at {} each", plan.seat_price),
            Money::new(price, plan.currency),
        ));
    }
    for code in &selection.add_ons {
        let a = plan
            .add_on(code)
            .ok_or_else(|| invalid("add_ons", format!("no add-on {}", quoted(code))))?;
        lines.push(line(
            format!("Add-on {}", a.name),
            Money::new(a.price, plan.currency),
        ));
    }
    Ok(lines)
}

/// Sum of rounded lines.
pub fn sum(lines: &[Line], currency: Currency) -> Result<Money, DomainError> {
    lines.iter().try_fold(Money::zero(currency), |acc, l| {
        acc.checked_add(&l.amount).map_err(arith)
    })
}

/// The recurring price of a selection.
pub fn recurring_price(plan: &Plan, selection: &Selection) -> Result<Money, DomainError> {
    sum(&recurring_lines(plan, selection)?, plan.currency)
}

/// Lines with their subtotal, VAT (its own rounded line) and total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    /// Net lines.
    pub lines: Vec<Line>,
    /// Sum of the lines.
    pub subtotal: Money,
    /// The account's rate.
    pub vat_rate: Decimal,
    /// `round(subtotal * rate)`.
    pub vat: Money,
    /// `subtotal + vat`.
    pub total: Money,
}

/// Totals `lines` with the account's VAT rate.
pub fn bill(lines: Vec<Line>, currency: Currency, vat_rate: Decimal) -> Result<Bill, DomainError> {
    let subtotal = sum(&lines, currency)?;
    let vat = subtotal.checked_mul(vat_rate).map_err(arith)?;
    let vat = vat.round_to_minor_unit();
    let total = subtotal.checked_add(&vat).map_err(arith)?;
    Ok(Bill {
        lines,
        subtotal,
        vat_rate,
        vat,
        total,
    })
}
