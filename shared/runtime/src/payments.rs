//! Which payment provider a service pays through (`payment_provider`), and how it reads the
//! payment-method tokens clients send.
//!
//! | provider | tokens | set-up |
//! |---|---|---|
//! | `simulator` (default) | `pm_card_ok`, `pm_card_declined`, ... ([`shared::gateway`]) | none: in process, deterministic |
//! | `stripe` | `cus_<id>:pm_<id>`: a Stripe customer and a payment method saved on it | `stripe_secret_key` (or `_file`), `stripe_api_base` |

use std::sync::Arc;

use serde::Deserialize;
use shared::{PaymentGateway, SimulatedGateway};

use crate::{config::ServiceConfig, stripe::StripeGateway};

/// The provider payments go to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentProvider {
    /// [`SimulatedGateway`], in process: the embedded default, needs nothing.
    #[default]
    Simulator,
    /// [`StripeGateway`]: PaymentIntents over Stripe's API.
    Stripe,
}

impl std::str::FromStr for PaymentProvider {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "simulator" => Ok(PaymentProvider::Simulator),
            "stripe" => Ok(PaymentProvider::Stripe),
            _ => Err(()),
        }
    }
}

/// What a payment-method token stands for, as far as its form tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    /// A card: charged at once.
    Card,
    /// A direct-debit mandate: pending, settles later.
    DirectDebit,
    /// A saved Stripe payment method: a card or a SEPA mandate, which the token does not say.
    /// Stripe's answer does: `succeeded` at once, or `processing` (pending) for a debit.
    Saved,
}

impl PaymentProvider {
    /// The kind of `token` for this provider; `None` if the provider cannot charge it.
    pub fn method_kind(self, token: &str) -> Option<MethodKind> {
        match self {
            PaymentProvider::Simulator if shared::gateway::is_direct_debit(token) => {
                Some(MethodKind::DirectDebit)
            }
            PaymentProvider::Simulator => {
                shared::gateway::is_known_payment_method(token).then_some(MethodKind::Card)
            }
            PaymentProvider::Stripe => {
                crate::stripe::parse_method(token).map(|_| MethodKind::Saved)
            }
        }
    }

    /// The tokens this provider takes, for error messages.
    pub fn expected_tokens(self) -> &'static str {
        match self {
            PaymentProvider::Simulator => {
                "the simulator takes pm_card_ok, pm_card_declined, pm_card_insufficient_funds, pm_card_timeout, pm_sepa_ok, pm_sepa_returned"
            }
            PaymentProvider::Stripe => {
                "with Stripe, give the customer and its saved payment method as cus_<id>:pm_<id>"
            }
        }
    }
}

/// The gateway a service pays through, and the simulator when that is it (its bank settles
/// direct debits as the service clock moves, which the service's jobs drive).
#[derive(Clone)]
pub struct Gateways {
    /// Where charges go.
    pub gateway: Arc<dyn PaymentGateway>,
    /// `Some` when `gateway` is the simulator.
    pub simulator: Option<Arc<SimulatedGateway>>,
}

impl Gateways {
    /// The gateway `config` selects.
    pub fn from_config(config: &ServiceConfig) -> anyhow::Result<Gateways> {
        match (&config.payment_provider, &config.stripe) {
            (PaymentProvider::Stripe, Some(settings)) => {
                tracing::info!(api_base = %settings.api_base, "payments go to Stripe");
                Ok(Gateways {
                    gateway: Arc::new(StripeGateway::new(settings)?),
                    simulator: None,
                })
            }
            (PaymentProvider::Stripe, None) => anyhow::bail!(
                "payment_provider = \"stripe\" needs stripe_secret_key or stripe_secret_key_file"
            ),
            (PaymentProvider::Simulator, _) => {
                let simulator = Arc::new(SimulatedGateway::new());
                Ok(Gateways {
                    gateway: simulator.clone(),
                    simulator: Some(simulator),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_provider_reads_its_own_tokens() {
        let sim = PaymentProvider::Simulator;
        assert_eq!(sim.method_kind("pm_card_ok"), Some(MethodKind::Card));
        assert_eq!(sim.method_kind("pm_sepa_ok"), Some(MethodKind::DirectDebit));
        assert_eq!(sim.method_kind("cus_1:pm_1"), None);
        let stripe = PaymentProvider::Stripe;
        assert_eq!(stripe.method_kind("cus_1:pm_1"), Some(MethodKind::Saved));
        assert_eq!(stripe.method_kind("pm_card_ok"), None);
        assert_eq!("stripe".parse(), Ok(PaymentProvider::Stripe));
        assert_eq!("Stripe".parse::<PaymentProvider>(), Err(()));
    }
}
