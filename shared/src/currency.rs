//! ISO 4217 currencies supported by the suite.
//!
//! A currency knows its minor unit (the number of decimal places a payment
//! provider accepts), which is what [`crate::Money::round_to_minor_unit`]
//! rounds to.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A supported currency, serialized as its ISO 4217 code (`"EUR"`).
// The variants are spelled exactly like the ISO codes so that the derived
// serde representation *is* the ISO code.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Currency {
    /// Euro.
    EUR,
    /// US dollar.
    USD,
    /// Pound sterling.
    GBP,
    /// Swiss franc.
    CHF,
    /// Swedish krona.
    SEK,
    /// Danish krone.
    DKK,
    /// Norwegian krone.
    NOK,
    /// Polish złoty.
    PLN,
    /// Japanese yen (no minor unit).
    JPY,
}

/// The input was not one of the supported ISO 4217 codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown currency code `{0}` (expected an upper-case ISO 4217 code such as `EUR`)")]
pub struct UnknownCurrency(pub String);

impl Currency {
    /// Every supported currency, in declaration order.
    pub const ALL: [Currency; 9] = [
        Currency::EUR,
        Currency::USD,
        Currency::GBP,
        Currency::CHF,
        Currency::SEK,
        Currency::DKK,
        Currency::NOK,
        Currency::PLN,
        Currency::JPY,
    ];

    /// The ISO 4217 code, e.g. `"EUR"`.
    pub fn code(&self) -> &'static str {
        match self {
            Currency::EUR => "EUR",
            Currency::USD => "USD",
            Currency::GBP => "GBP",
            Currency::CHF => "CHF",
            Currency::SEK => "SEK",
            Currency::DKK => "DKK",
            Currency::NOK => "NOK",
            Currency::PLN => "PLN",
            Currency::JPY => "JPY",
        }
    }

    /// Number of decimal places of the currency's minor unit (JPY 0, all others 2).
    pub fn minor_units(&self) -> u32 {
        match self {
            Currency::JPY => 0,
            _ => 2,
        }
    }
}

impl FromStr for Currency {
    type Err = UnknownCurrency;

    /// Parses an ISO code. Case-sensitive on purpose: codes are always stored
    /// upper-case, so `"eur"` is more likely a bug upstream than an intent.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::ALL
            .into_iter()
            .find(|c| c.code() == s)
            .ok_or_else(|| UnknownCurrency(s.to_owned()))
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_from_str_and_display() {
        for c in Currency::ALL {
            assert_eq!(c.code().parse::<Currency>().unwrap(), c);
            assert_eq!(c.to_string(), c.code());
        }
    }

    #[test]
    fn parsing_is_case_sensitive() {
        assert_eq!(
            "eur".parse::<Currency>(),
            Err(UnknownCurrency("eur".into()))
        );
        assert!("XXX".parse::<Currency>().is_err());
    }

    #[test]
    fn minor_units() {
        assert_eq!(Currency::JPY.minor_units(), 0);
        assert_eq!(Currency::EUR.minor_units(), 2);
        assert_eq!(Currency::SEK.minor_units(), 2);
    }
}
