//! Plans and what a subscription buys of one: products, levels, add-ons, trial terms, the
//! selection (contacts, seats, add-ons) and its bounds.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use shared::{
    BillingInterval, ContactSlider, Currency, TierTable,
    limits::{self, quoted},
};

use super::{DomainError, check_seats, invalid};

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

    pub(super) fn add_on(&self, code: &str) -> Option<&AddOn> {
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
