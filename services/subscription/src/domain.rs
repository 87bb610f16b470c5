//! The subscription rules (S1-S19) as plain types and pure functions: no IO, no tonic, prost or
//! sqlx. Prices come from `shared` (tier tables, proration); every invoice line is rounded once
//! with `Money::round_to_minor_unit`, the suite's only rounding place.

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use shared::limits::{self, LimitError, quoted};
use shared::{
    BillingInterval, BillingPeriod, ContactSlider, Currency, Money, TierTable, prorate_change,
    restart_period_change,
};

/// A rule refused the request; the service maps these to status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A field of the request is wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as named in the proto.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// S9: a contact tier below the active contacts held now.
    #[error(
        "{active} contacts are active: the lowest tier on offer is {lowest}; archive contacts first to go lower"
    )]
    BelowActiveContacts {
        /// Active contacts now.
        active: u64,
        /// The lowest slider position that holds them.
        lowest: u64,
    },
    /// The state does not allow the change.
    #[error("{0}")]
    Precondition(String),
    /// Money arithmetic failed (overflow, currency).
    #[error("price computation failed: {0}")]
    Arithmetic(String),
}

fn invalid(field: &'static str, message: impl Into<String>) -> DomainError {
    DomainError::Invalid {
        field,
        message: message.into(),
    }
}

impl From<LimitError> for DomainError {
    fn from(e: LimitError) -> Self {
        invalid(e.field, e.message)
    }
}

/// A seat count of a request (S4): `1..=MAX_SEATS` (`shared::limits`).
pub fn check_seats(field: &'static str, seats: u32) -> Result<u32, DomainError> {
    limits::check_count(field, u64::from(seats), u64::from(limits::MAX_SEATS))?;
    Ok(seats)
}

/// A contact count of a request (S1, S3): `1..=MAX_CONTACTS` (`shared::limits`).
pub fn check_contacts(field: &'static str, contacts: u64) -> Result<u64, DomainError> {
    Ok(limits::check_count(field, contacts, limits::MAX_CONTACTS)?)
}

fn arith(e: impl fmt::Display) -> DomainError {
    DomainError::Arithmetic(e.to_string())
}

/// What the plan sells (S4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Product {
    /// Email marketing.
    Marketing,
    /// Sales (CRM).
    Sales,
    /// Both.
    Bundle,
}

impl Product {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Product::Marketing => "marketing",
            Product::Sales => "sales",
            Product::Bundle => "bundle",
        }
    }
}

/// A plan level, ordered by rank (S4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level {
    /// e.g. "professional".
    pub name: String,
    /// Higher is more.
    pub rank: u32,
}

/// How an upgrade is charged: S7 or S8, a property of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProrationPolicy {
    /// S7: prorated to the end of the current cycle.
    ProrateToCycleEnd,
    /// S8: credit the unused remainder, start a new full period today.
    RestartPeriod,
}

/// A paid add-on (S4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddOn {
    /// Stable code, e.g. "sms".
    pub code: String,
    /// Display name.
    pub name: String,
    /// Price per period (exact).
    pub price: Decimal,
}

/// Which changes the customer may make alone (S10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SelfServe {
    /// Lower tier, fewer seats, lower level.
    pub downgrade: bool,
    /// Removing an add-on.
    pub remove_add_on: bool,
    /// Marketing <-> sales.
    pub change_product: bool,
    /// Bundle -> one product.
    pub unbundle: bool,
}

/// Free-trial terms (S14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialTerms {
    /// Length.
    pub days: u32,
    /// Most subscribed contacts during the trial (0 = the chosen tier).
    pub contact_cap: u64,
    /// Free mails during the trial (0 = no cap).
    pub free_mails: u64,
}

/// Longest trial accepted.
pub const MAX_TRIAL_DAYS: u32 = 366;

impl TrialTerms {
    /// S14: 1 to [`MAX_TRIAL_DAYS`] days, a contact cap and free mails within the limits of
    /// `shared::limits`. `field` is the terms' field name (`plan.trial`, `terms_override`).
    pub fn validate(&self, field: &'static str) -> Result<(), DomainError> {
        let (days, cap, mails) = match field {
            "plan.trial" => (
                "plan.trial.days",
                "plan.trial.contact_cap",
                "plan.trial.free_mails",
            ),
            _ => (
                "terms_override.days",
                "terms_override.contact_cap",
                "terms_override.free_mails",
            ),
        };
        if self.days == 0 || self.days > MAX_TRIAL_DAYS {
            return Err(invalid(days, format!("must be 1..={MAX_TRIAL_DAYS}")));
        }
        if self.contact_cap > limits::MAX_CONTACTS {
            return Err(invalid(
                cap,
                format!("must be at most {}", limits::MAX_CONTACTS),
            ));
        }
        if self.free_mails > limits::MAX_RECIPIENTS {
            return Err(invalid(
                mails,
                format!("must be at most {}", limits::MAX_RECIPIENTS),
            ));
        }
        Ok(())
    }
}

/// A published plan version (S3, S4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Caller-chosen id, shared by all versions.
    pub plan_id: String,
    /// 1, 2, ...
    pub version: u32,
    /// Display name.
    pub name: String,
    /// Product.
    pub product: Product,
    /// Level.
    pub level: Level,
    /// Renewal interval.
    pub interval: BillingInterval,
    /// Currency of every price.
    pub currency: Currency,
    /// Price by contact tier (S3): flat per band, volume or graduated.
    pub contact_tiers: TierTable,
    /// Tier positions offered (S3, S9).
    pub slider: ContactSlider,
    /// Seats included in the price.
    pub included_seats: u32,
    /// Price per extra seat per period.
    pub seat_price: Decimal,
    /// Add-ons on offer.
    pub add_ons: Vec<AddOn>,
    /// S7 or S8.
    pub proration: ProrationPolicy,
    /// S10.
    pub self_serve: SelfServe,
    /// S14; `None` = no trial.
    pub trial: Option<TrialTerms>,
    /// C7 credits per period (0 = none).
    pub monthly_credits: i64,
}

impl Plan {
    /// Checks what the types cannot: the tier table prices every slider position in the plan's
    /// currency, prices are not negative, add-on codes are unique, trial terms are sane; and the
    /// limits of `shared::limits` (ids, codes, names, prices, seats, add-ons, credits).
    pub fn validate(&self) -> Result<(), DomainError> {
        limits::check_id("plan.plan_id", &self.plan_id)?;
        limits::check_text("plan.name", &self.name, limits::MAX_NAME_LEN, false)?;
        limits::check_text(
            "plan.level.name",
            &self.level.name,
            limits::MAX_NAME_LEN,
            true,
        )?;
        limits::check_price("plan.seat_price", self.seat_price, self.currency)?;
        if self.included_seats > limits::MAX_SEATS {
            return Err(invalid(
                "plan.included_seats",
                format!("must be at most {}", limits::MAX_SEATS),
            ));
        }
        if self.add_ons.len() > limits::MAX_ADD_ONS {
            return Err(invalid(
                "plan.add_ons",
                format!("at most {} add-ons", limits::MAX_ADD_ONS),
            ));
        }
        for a in &self.add_ons {
            limits::check_code("plan.add_ons.code", &a.code)?;
            limits::check_text("plan.add_ons.name", &a.name, limits::MAX_NAME_LEN, true)?;
            limits::check_price("plan.add_ons.price", a.price, self.currency)?;
        }
        if self.monthly_credits > limits::MAX_CREDITS {
            return Err(invalid(
                "plan.monthly_credits",
                format!("must be at most {}", limits::MAX_CREDITS),
            ));
        }
        if self.contact_tiers.currency() != self.currency {
            return Err(invalid(
                "plan.contact_tiers",
                "must be priced in the plan's currency",
            ));
        }
        if let Some(max) = self.contact_tiers.max_quantity()
            && max < self.slider.max()
        {
            return Err(invalid(
                "plan.contact_tiers",
                format!(
                    "must price every slider position up to {}, ends at {max}",
                    self.slider.max()
                ),
            ));
        }
        if self.seat_price < Decimal::ZERO {
            return Err(invalid("plan.seat_price", "must not be negative"));
        }
        if self.level.name.is_empty() {
            return Err(invalid("plan.level.name", "is required"));
        }
        for (i, a) in self.add_ons.iter().enumerate() {
            if a.code.is_empty() || a.price < Decimal::ZERO {
                return Err(invalid(
                    "plan.add_ons",
                    "every add-on needs a code and a non-negative price",
                ));
            }
            if self.add_ons[..i].iter().any(|b| b.code == a.code) {
                return Err(invalid(
                    "plan.add_ons",
                    format!("add-on {} is listed twice", quoted(&a.code)),
                ));
            }
        }
        if let Some(t) = self.trial {
            t.validate("plan.trial")?;
        }
        if self.monthly_credits < 0 {
            return Err(invalid("plan.monthly_credits", "must not be negative"));
        }
        Ok(())
    }

    fn add_on(&self, code: &str) -> Option<&AddOn> {
        self.add_ons.iter().find(|a| a.code == code)
    }
}

/// What a subscription buys from its plan: a contact tier, seats and add-ons (S4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// A slider position.
    pub contacts: u64,
    /// Seats (at least the included ones are free).
    pub seats: u32,
    /// Add-on codes, sorted, unique.
    pub add_ons: Vec<String>,
}

impl Selection {
    /// A selection as a request states it, within the limits (`shared::limits`): at most
    /// [`limits::MAX_CONTACTS`] contacts, 1 to [`limits::MAX_SEATS`] seats, at most
    /// [`limits::MAX_ADD_ONS`] add-on codes, each well-formed and listed once (a duplicate is
    /// refused, not merged: the caller asked for something the subscription cannot hold).
    pub fn new(contacts: u64, seats: u32, add_ons: Vec<String>) -> Result<Selection, DomainError> {
        if contacts > limits::MAX_CONTACTS {
            return Err(invalid(
                "contacts",
                format!("must be at most {}", limits::MAX_CONTACTS),
            ));
        }
        check_seats("seats", seats)?;
        if add_ons.len() > limits::MAX_ADD_ONS {
            return Err(invalid(
                "add_ons",
                format!("at most {} add-ons", limits::MAX_ADD_ONS),
            ));
        }
        for (i, code) in add_ons.iter().enumerate() {
            limits::check_code("add_ons", code)?;
            if add_ons[..i].contains(code) {
                return Err(invalid(
                    "add_ons",
                    format!("add-on {} is listed twice", quoted(code)),
                ));
            }
        }
        Ok(Selection {
            contacts,
            seats,
            add_ons,
        })
    }

    /// Validates against `plan`: a slider position, known add-ons (sorted and deduplicated).
    pub fn checked(mut self, plan: &Plan) -> Result<Selection, DomainError> {
        if !plan.slider.contains(self.contacts) {
            return Err(invalid(
                "contacts",
                format!(
                    "{} is not a tier of plan {}: choose {}..={} in steps of {}",
                    self.contacts,
                    plan.plan_id,
                    plan.slider.min(),
                    plan.slider.max(),
                    plan.slider.step()
                ),
            ));
        }
        self.add_ons.sort();
        self.add_ons.dedup();
        if let Some(unknown) = self.add_ons.iter().find(|c| plan.add_on(c).is_none()) {
            return Err(invalid(
                "add_ons",
                format!("plan {} has no add-on {}", plan.plan_id, quoted(unknown)),
            ));
        }
        Ok(self)
    }
}

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

/// S12: of `n` new contacts, how many become subscribed (up to `limit`) and how many wait as
/// pending upgrade. S11: nothing here changes the plan.
pub fn admit(limit: u64, active: u64, n: u64) -> (u64, u64) {
    let free = limit.saturating_sub(active);
    let subscribed = n.min(free);
    (subscribed, n - subscribed)
}

/// S12: pending contacts promoted after an upgrade, as many as the new limit allows.
pub fn promote(limit: u64, active: u64, pending: u64) -> u64 {
    pending.min(limit.saturating_sub(active))
}

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// In its free trial.
    Trialing,
    /// Paid and running.
    Active,
    /// A renewal payment failed; retries follow.
    PastDue,
    /// Retries exhausted: sending suspended.
    Suspended,
    /// Cancelled and past its period.
    Cancelled,
    /// S16: trial over without verification or payment.
    TrialExpired,
    /// First card payment in flight.
    Incomplete,
}

impl Status {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Trialing => "trialing",
            Status::Active => "active",
            Status::PastDue => "past_due",
            Status::Suspended => "suspended",
            Status::Cancelled => "cancelled",
            Status::TrialExpired => "trial_expired",
            Status::Incomplete => "incomplete",
        }
    }

    /// Parses the stored text.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "trialing" => Status::Trialing,
            "active" => Status::Active,
            "past_due" => Status::PastDue,
            "suspended" => Status::Suspended,
            "cancelled" => Status::Cancelled,
            "trial_expired" => Status::TrialExpired,
            "incomplete" => Status::Incomplete,
            _ => return None,
        })
    }

    /// Whether the subscription renews and may be changed.
    pub fn is_live(self) -> bool {
        matches!(self, Status::Active | Status::PastDue | Status::Suspended)
    }
}

/// Why sending is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendingRefusal {
    /// No subscription.
    NoSubscription,
    /// S14: the trial's free mails are used up.
    TrialMailCap,
    /// S18: a bank-transfer invoice is unpaid.
    BankTransferUnpaid,
    /// S16: the trial ended without verification.
    TrialOverNotVerified,
    /// S13: cancelled and past the paid period.
    Cancelled,
    /// Renewal payment retries exhausted.
    PaymentPastDue,
    /// The first card payment is not through yet.
    PaymentPending,
    /// A direct debit came back and its invoice is unpaid (S18: sending waits for the money).
    PaymentReturned,
}

impl SendingRefusal {
    /// The message shown.
    pub fn message(self) -> &'static str {
        match self {
            SendingRefusal::NoSubscription => "the account has no subscription",
            SendingRefusal::TrialMailCap => "the trial's free mails are used up",
            SendingRefusal::BankTransferUnpaid => {
                "sending starts once the bank transfer for the open invoice is received"
            }
            SendingRefusal::TrialOverNotVerified => {
                "the trial is over and the account was not verified"
            }
            SendingRefusal::Cancelled => "the subscription was cancelled and its period is over",
            SendingRefusal::PaymentPastDue => "the renewal payment failed; sending is suspended",
            SendingRefusal::PaymentPending => "the first payment is not through yet",
            SendingRefusal::PaymentReturned => {
                "a direct debit was returned; sending resumes once the invoice is paid (e.g. after updating the payment method)"
            }
        }
    }
}

/// What the sending decision needs to know.
#[derive(Debug, Clone, Copy)]
pub struct SendingState {
    /// Status.
    pub status: Status,
    /// Mails sent in the trial.
    pub trial_mails_sent: u64,
    /// The trial's free mails (0 = no cap).
    pub trial_free_mails: u64,
    /// A bank-transfer invoice is open.
    pub unpaid_bank_transfer: bool,
    /// An invoice whose direct debit was returned is open.
    pub returned_debit: bool,
}

/// May the account send `mails` now (S2: a paid subscription sends without limit; S14, S16,
/// S18 and payment problems refuse).
pub fn may_send(state: &SendingState, mails: u64) -> Result<(), SendingRefusal> {
    match state.status {
        Status::TrialExpired => return Err(SendingRefusal::TrialOverNotVerified),
        Status::Cancelled => return Err(SendingRefusal::Cancelled),
        Status::Suspended => return Err(SendingRefusal::PaymentPastDue),
        Status::Incomplete => return Err(SendingRefusal::PaymentPending),
        Status::Trialing => {
            if state.trial_free_mails > 0
                && state.trial_mails_sent.saturating_add(mails) > state.trial_free_mails
            {
                return Err(SendingRefusal::TrialMailCap);
            }
        }
        Status::Active | Status::PastDue => {}
    }
    // S18 for debits: a pending debit sends at once like a card (as the wallet's on-demand
    // debits do, C9); one that came back is money not received, like an unpaid transfer.
    if state.returned_debit {
        return Err(SendingRefusal::PaymentReturned);
    }
    if state.unpaid_bank_transfer {
        return Err(SendingRefusal::BankTransferUnpaid);
    }
    Ok(())
}

/// Renewal payment retries: after a failure, the next attempt comes this many days later;
/// when they are used up the subscription is suspended.
pub const RETRY_AFTER_DAYS: [i64; 2] = [1, 2];

/// After `attempts` failed attempts: when to retry, or `None` to suspend.
pub fn next_retry(attempts: u32, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let i = usize::try_from(attempts).ok()?.checked_sub(1)?;
    RETRY_AFTER_DAYS.get(i).map(|d| now + Duration::days(*d))
}

/// One calendar month of a period, for the monthly credit allowance (C7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowanceMonth {
    /// 0-based month within the period (always 0 on monthly plans).
    pub index: u32,
    /// First instant.
    pub start: DateTime<Utc>,
    /// First instant after it: the grant expires here.
    pub end: DateTime<Utc>,
    /// Whether it is the period's last month.
    pub last: bool,
}

/// Months in one period of `interval`.
pub fn months_per_period(interval: BillingInterval) -> u32 {
    match interval {
        BillingInterval::Month => 1,
        BillingInterval::Year => 12,
    }
}

/// C7: credits that come with a subscription each month do not roll over, also on yearly
/// plans. The month of period `period_index` that holds `at`, counted from the period anchor
/// (`period_start(anchor, Month, n)`, with its end-of-month clamping); `None` when `at` is
/// outside the period.
pub fn allowance_month(
    anchor: DateTime<Utc>,
    interval: BillingInterval,
    period_index: u32,
    at: DateTime<Utc>,
) -> Result<Option<AllowanceMonth>, DomainError> {
    let per = months_per_period(interval);
    let nth = |n: u32| {
        shared::period_start(anchor, BillingInterval::Month, n)
            .map_err(|e| DomainError::Arithmetic(e.to_string()))
    };
    let base = period_index
        .checked_mul(per)
        .ok_or_else(|| DomainError::Arithmetic("period index out of range".into()))?;
    for index in 0..per {
        let start = nth(base + index)?;
        let end = nth(base + index + 1)?;
        if start <= at && at < end {
            return Ok(Some(AllowanceMonth {
                index,
                start,
                end,
                last: index + 1 == per,
            }));
        }
    }
    Ok(None)
}

/// Days before a trial's end when "trial ending" is announced.
pub const TRIAL_ENDING_NOTICE_DAYS: i64 = 3;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rust_decimal_macros::dec;
    use shared::{Tier, TierMode};

    fn plan(id: &str, product: Product, rank: u32) -> Plan {
        Plan {
            plan_id: id.into(),
            version: 1,
            name: "Email".into(),
            product,
            level: Level {
                name: format!("level{rank}"),
                rank,
            },
            interval: BillingInterval::Month,
            currency: Currency::EUR,
            contact_tiers: TierTable::new(
                TierMode::Graduated,
                Currency::EUR,
                vec![
                    Tier {
                        first: 1,
                        last: Some(10_000),
                        unit_price: dec!(0.006) * Decimal::from(rank),
                        flat_price: dec!(0),
                    },
                    Tier {
                        first: 10_001,
                        last: None,
                        unit_price: dec!(0.005) * Decimal::from(rank),
                        flat_price: dec!(0),
                    },
                ],
            )
            .unwrap(),
            slider: ContactSlider::new(1_000, 50_000, 1_000).unwrap(),
            included_seats: 1,
            seat_price: dec!(5),
            add_ons: vec![AddOn {
                code: "sms".into(),
                name: "SMS".into(),
                price: dec!(9.99),
            }],
            proration: ProrationPolicy::ProrateToCycleEnd,
            self_serve: SelfServe {
                downgrade: true,
                ..SelfServe::default()
            },
            trial: None,
            monthly_credits: 0,
        }
    }

    // Issue 16: the limits of `shared::limits`, enforced where a selection or plan is made.
    #[test]
    fn selections_are_bounded_and_refuse_duplicates() {
        let ok = Selection::new(5_000, 1, vec!["sms".into()]).unwrap();
        assert_eq!(ok.seats, 1);
        let field = |r: Result<Selection, DomainError>| match r {
            Err(DomainError::Invalid { field, .. }) => field,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(field(Selection::new(5_000, 0, vec![])), "seats");
        assert_eq!(field(Selection::new(5_000, u32::MAX, vec![])), "seats");
        assert_eq!(
            field(Selection::new(5_000, limits::MAX_SEATS + 1, vec![])),
            "seats"
        );
        assert!(Selection::new(5_000, limits::MAX_SEATS, vec![]).is_ok());
        assert_eq!(field(Selection::new(u64::MAX, 1, vec![])), "contacts");
        assert_eq!(
            field(Selection::new(5_000, 1, vec!["sms".into(), "sms".into()])),
            "add_ons"
        );
        assert_eq!(
            field(Selection::new(5_000, 1, vec!["x".repeat(10_000)])),
            "add_ons"
        );
        let DomainError::Invalid { message, .. } = Selection::new(5_000, 1, vec!["fax".into()])
            .unwrap()
            .checked(&plan("p", Product::Marketing, 1))
            .unwrap_err()
        else {
            panic!("not invalid")
        };
        assert!(message.ends_with("no add-on \"fax\""), "{message}");
    }

    #[test]
    fn plans_refuse_absurd_prices_counts_and_text() {
        let base = plan("p", Product::Marketing, 1);
        base.validate().unwrap();
        let refused = |change: &dyn Fn(&mut Plan), field: &str| {
            let mut p = base.clone();
            change(&mut p);
            match p.validate() {
                Err(DomainError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: not refused: {other:?}"),
            }
        };
        refused(&|p| p.seat_price = dec!(0.001), "plan.seat_price");
        refused(&|p| p.seat_price = dec!(1000000.01), "plan.seat_price");
        refused(&|p| p.included_seats = u32::MAX, "plan.included_seats");
        refused(&|p| p.name = "Pro\u{202E}".into(), "plan.name");
        refused(&|p| p.level.name = "a\u{0}".into(), "plan.level.name");
        refused(&|p| p.monthly_credits = i64::MAX, "plan.monthly_credits");
        refused(
            &|p| {
                p.add_ons = vec![AddOn {
                    code: "sms".into(),
                    name: "SMS\n".into(),
                    price: dec!(1),
                }]
            },
            "plan.add_ons.name",
        );
        refused(
            &|p| {
                p.add_ons = vec![AddOn {
                    code: "sms".into(),
                    name: "SMS".into(),
                    price: dec!(0.0000000001),
                }]
            },
            "plan.add_ons.price",
        );
        refused(
            &|p| {
                p.trial = Some(TrialTerms {
                    days: 30,
                    contact_cap: u64::MAX,
                    free_mails: 0,
                })
            },
            "plan.trial.contact_cap",
        );
    }

    fn sel(contacts: u64) -> Selection {
        Selection {
            contacts,
            seats: 1,
            add_ons: vec![],
        }
    }

    // rule S3
    #[test]
    fn s3_more_contacts_cost_less_per_contact_and_every_line_is_rounded() {
        let p = plan("m", Product::Marketing, 1);
        assert_eq!(recurring_price(&p, &sel(5_000)).unwrap().amount(), dec!(30));
        assert_eq!(
            recurring_price(&p, &sel(20_000)).unwrap().amount(),
            dec!(110)
        );
        let s = Selection {
            contacts: 1_000,
            seats: 3,
            add_ons: vec!["sms".into()],
        };
        let lines = recurring_lines(&p, &s).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(recurring_price(&p, &s).unwrap().amount(), dec!(25.99));
    }

    // rule S9
    #[test]
    fn s9_downgrade_floor_is_the_lowest_tier_holding_the_active_contacts() {
        let p = plan("m", Product::Marketing, 1);
        let err = plan_change(&p, &sel(30_000), None, &Change::Contacts(27_000), 27_001);
        assert_eq!(
            err.unwrap_err(),
            DomainError::BelowActiveContacts {
                active: 27_001,
                lowest: 28_000
            }
        );
        let ok = plan_change(&p, &sel(30_000), None, &Change::Contacts(28_000), 27_001).unwrap();
        assert_eq!(ok.timing, Timing::NextCycle);
    }

    // rule S10
    #[test]
    fn s10_changes_that_are_not_self_serve_become_change_requests() {
        let mut p = plan("m", Product::Bundle, 1);
        p.self_serve = SelfServe::default();
        let s = Selection {
            add_ons: vec!["sms".into()],
            ..sel(5_000)
        };
        let t = plan_change(&p, &s, None, &Change::RemoveAddOn("sms".into()), 0).unwrap();
        assert_eq!(t.timing, Timing::ChangeRequest);
        let t = plan_change(&p, &s, None, &Change::Contacts(4_000), 0).unwrap();
        assert_eq!(t.timing, Timing::ChangeRequest);
        let single = plan("s", Product::Sales, 1);
        let mut s2 = s.clone();
        s2.add_ons.clear();
        let change = Change::Product {
            plan_id: "s".into(),
            version: 1,
        };
        let t = plan_change(&p, &s2, Some(&single), &change, 0).unwrap();
        assert_eq!(t.timing, Timing::ChangeRequest, "unbundling");
        let t = plan_change(&p, &s, None, &Change::AddAddOn("sms".into()), 0);
        assert!(t.is_err(), "already active");
    }

    // rule S7
    #[test]
    fn s7_upgrade_on_day_10_of_30_charges_two_thirds_of_the_difference() {
        let p = plan("m", Product::Marketing, 1);
        let start = Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap();
        let period = BillingPeriod {
            start,
            end: Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap(),
        };
        let at = start + Duration::days(10);
        let q = quote_upgrade(&p, &sel(5_000), &p, &sel(10_000), &period, at, dec!(0.21)).unwrap();
        // 30 -> 60 EUR: credit 20.00, charge 40.00, net 20.00, VAT 4.20.
        assert_eq!(q.bill.subtotal.amount(), dec!(20.00));
        assert_eq!(q.bill.vat.amount(), dec!(4.20));
        assert_eq!(q.bill.total.amount(), dec!(24.20));
        assert_eq!(q.new_recurring.amount(), dec!(60));
    }

    // rule S8
    #[test]
    fn s8_restart_credits_the_remainder_and_charges_a_full_new_period() {
        let mut p = plan("m", Product::Marketing, 1);
        p.proration = ProrationPolicy::RestartPeriod;
        let start = Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap();
        let period = BillingPeriod {
            start,
            end: Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap(),
        };
        let q = quote_upgrade(
            &p,
            &sel(5_000),
            &p,
            &sel(10_000),
            &period,
            start + Duration::days(10),
            dec!(0),
        )
        .unwrap();
        assert!(q.restarts_period);
        assert_eq!(q.bill.total.amount(), dec!(40.00)); // 60 - 20 credit
    }

    // rule S12
    #[test]
    fn s12_contacts_beyond_the_limit_wait_and_an_upgrade_promotes_them() {
        assert_eq!(admit(1_000, 900, 250), (100, 150));
        assert_eq!(admit(1_000, 1_000, 5), (0, 5));
        assert_eq!(promote(2_000, 1_000, 150), 150);
        assert_eq!(promote(1_100, 1_000, 150), 100);
    }

    // rule S2 / S14 / S16 / S18
    #[test]
    fn sending_rules() {
        let mut s = SendingState {
            status: Status::Active,
            trial_mails_sent: 0,
            trial_free_mails: 0,
            unpaid_bank_transfer: false,
            returned_debit: false,
        };
        assert_eq!(may_send(&s, 10_000_000), Ok(()), "S2: unlimited");
        s.unpaid_bank_transfer = true;
        assert_eq!(may_send(&s, 1), Err(SendingRefusal::BankTransferUnpaid));
        // S18 for debits: a returned debit refuses sending, even while past due.
        s.unpaid_bank_transfer = false;
        s.returned_debit = true;
        s.status = Status::PastDue;
        assert_eq!(may_send(&s, 1), Err(SendingRefusal::PaymentReturned));
        s = SendingState {
            status: Status::Trialing,
            trial_mails_sent: 150,
            trial_free_mails: 200,
            unpaid_bank_transfer: false,
            returned_debit: false,
        };
        assert_eq!(may_send(&s, 50), Ok(()));
        assert_eq!(may_send(&s, 51), Err(SendingRefusal::TrialMailCap));
        s.status = Status::TrialExpired;
        assert_eq!(may_send(&s, 1), Err(SendingRefusal::TrialOverNotVerified));
    }

    // rule C7
    #[test]
    fn c7_a_yearly_period_has_twelve_allowance_months_counted_from_the_anchor() {
        let anchor = Utc.with_ymd_and_hms(2026, 1, 31, 0, 0, 0).unwrap();
        let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap();
        let jan = allowance_month(anchor, BillingInterval::Year, 0, at(2026, 2, 1))
            .unwrap()
            .unwrap();
        assert_eq!((jan.index, jan.start, jan.last), (0, anchor, false));
        // 31 Jan + 1 month clamps to 28 Feb; the next month starts on 31 Mar again.
        let feb = allowance_month(anchor, BillingInterval::Year, 0, at(2026, 3, 1))
            .unwrap()
            .unwrap();
        assert_eq!(feb.index, 1);
        assert_eq!(
            feb.start,
            Utc.with_ymd_and_hms(2026, 2, 28, 0, 0, 0).unwrap()
        );
        assert_eq!(feb.end, Utc.with_ymd_and_hms(2026, 3, 31, 0, 0, 0).unwrap());
        let dec = allowance_month(anchor, BillingInterval::Year, 0, at(2027, 1, 15))
            .unwrap()
            .unwrap();
        assert_eq!((dec.index, dec.last), (11, true));
        // The second year, and a monthly plan's single month.
        let next = allowance_month(anchor, BillingInterval::Year, 1, at(2027, 2, 1))
            .unwrap()
            .unwrap();
        assert_eq!(next.index, 0);
        assert!(
            allowance_month(anchor, BillingInterval::Year, 1, at(2026, 6, 1))
                .unwrap()
                .is_none()
        );
        let m = allowance_month(anchor, BillingInterval::Month, 3, at(2026, 5, 1))
            .unwrap()
            .unwrap();
        assert_eq!((m.index, m.last), (0, true));
        assert_eq!(m.start, Utc.with_ymd_and_hms(2026, 4, 30, 0, 0, 0).unwrap());
    }

    #[test]
    fn retries_then_suspension() {
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(next_retry(1, now), Some(now + Duration::days(1)));
        assert_eq!(next_retry(2, now), Some(now + Duration::days(2)));
        assert_eq!(next_retry(3, now), None);
    }

    #[test]
    fn a_plan_must_price_every_slider_position() {
        let mut p = plan("m", Product::Marketing, 1);
        assert!(p.validate().is_ok());
        p.contact_tiers = TierTable::new(
            TierMode::FlatPerBand,
            Currency::EUR,
            vec![Tier {
                first: 1,
                last: Some(10_000),
                unit_price: dec!(0),
                flat_price: dec!(10),
            }],
        )
        .unwrap();
        assert!(p.validate().is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            // rule S12: admitted contacts never exceed the limit and none are lost.
            #[test]
            fn admit_never_exceeds_the_limit(limit in 0u64..100_000, active in 0u64..100_000, n in 0u64..100_000) {
                let active = active.min(limit);
                let (sub, pending) = admit(limit, active, n);
                prop_assert_eq!(sub + pending, n);
                prop_assert!(active + sub <= limit);
            }

            // rule S9: the floor holds the active contacts and is a slider position.
            #[test]
            fn downgrade_floor_holds_active(active in 0u64..50_000, target in 1u64..50) {
                let p = plan("m", Product::Marketing, 1);
                let target = target * 1_000;
                match plan_change(&p, &sel(50_000), None, &Change::Contacts(target), active) {
                    Ok(t) => prop_assert!(t.selection.contacts >= active),
                    Err(DomainError::BelowActiveContacts { lowest, .. }) => {
                        prop_assert!(lowest >= active && target < lowest && p.slider.contains(lowest));
                    }
                    Err(DomainError::Precondition(_)) => prop_assert_eq!(target, 50_000),
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }
        }
    }
}
