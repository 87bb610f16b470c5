//! The suite's input limits, in one place: every quantity, amount and string a client sends has
//! a documented maximum, checked by the domain before anything is priced, charged or stored.
//!
//! Why limits at all: a `uint32` seat count of 4,294,967,295 is a valid protobuf value, and
//! without a bound it is a valid subscription (a card charged EUR 25,984,552,165.00). Each
//! bound below is far above any real customer and far below where arithmetic, storage or a
//! payment provider would misbehave; a request beyond it is a client bug or an attack and is
//! answered `INVALID_ARGUMENT` naming the field (never `OUT_OF_RANGE`, so that clients have one
//! code to handle for bad input).
//!
//! The helpers here ([`check_id`], [`check_code`], [`check_text`], [`parse_price`],
//! [`parse_rate`], [`quoted`]) are the one implementation of those checks; services map a
//! [`LimitError`] to their own invalid-argument error.

use std::fmt;

use rust_decimal::Decimal;

use crate::currency::Currency;

/// Longest id (account, wallet, plan, invoice, mailing, reservation, partner, customer,
/// request, user): ids are keys in indexes and appear in every log line; 128 bytes holds a UUID
/// with a long prefix, or a URN.
pub const MAX_ID_LEN: usize = 128;

/// Longest code (an add-on code such as `"sms"`): a code is a short stable identifier that is
/// stored in every subscription that has it.
pub const MAX_CODE_LEN: usize = 64;

/// Longest display name (plan, level, add-on) in characters: it ends up on invoice lines,
/// which providers and PDF layouts cut far below this.
pub const MAX_NAME_LEN: usize = 200;

/// Longest free-text reason (credit adjustments and transfers) in characters: a sentence or
/// a ticket reference, kept in the ledger forever.
pub const MAX_REASON_LEN: usize = 500;

/// Longest staff note (resolving a change request) in characters.
pub const MAX_NOTE_LEN: usize = 1_000;

/// Longest reference on a credit grant (e.g. the subscription cycle it came from).
pub const MAX_REFERENCE_LEN: usize = 256;

/// Most contacts of a subscription, a slider position or a contact request (S1, S3): a
/// hundred million addresses is beyond the largest mailing lists of the seeds' platforms.
pub const MAX_CONTACTS: u64 = 100_000_000;

/// Most user seats of a subscription (S4): ten thousand users on one billing account is far
/// beyond self-serve; it also bounds the seat line to `MAX_SEATS * MAX_PRICE`.
pub const MAX_SEATS: u32 = 10_000;

/// Most add-ons a plan offers or a subscription selects (S4).
pub const MAX_ADD_ONS: usize = 50;

/// Most bands in a tier table (S3, C1): one band per position of a 100..=100,000 slider in
/// steps of 100, and still a request far below the size limit (`max_request_bytes`).
pub const MAX_TIERS: usize = 1_000;

/// Most recipients of one mailing (C2), and most mails counted by one call: far above any real
/// list, it keeps `recipients * rate` well inside `Decimal` range.
pub const MAX_RECIPIENTS: u64 = 100_000_000;

/// Most credits in one request (a purchase, grant, transfer, adjustment, signup gift, an auto
/// top-up's amount, maximum or monthly cap, a reminder threshold): a trillion credits, so that
/// a wallet's lots stay far from `i64::MAX` even after millions of such requests.
pub const MAX_CREDITS: i64 = 1_000_000_000_000;

/// Largest price in a price list, in the currency's major unit (a tier's unit or flat price,
/// a seat's or an add-on's price per period): one million, beyond any real price per contact,
/// seat or add-on (JPY included), so that a bill stays inside `i64` minor units.
pub const MAX_PRICE: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// Largest amount of money a client states (an expected purchase amount, a bank transfer
/// received), in the currency's major unit: 10^12, above any invoice the limits allow,
/// while its minor units stay far inside `i64`.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0);

/// Most decimals of a unit price (a price per contact or per credit, e.g. `0.000125`): prices
/// per period (flat band prices, seat and add-on prices) have at most the currency's minor
/// unit instead.
pub const MAX_UNIT_PRICE_DECIMALS: u32 = 6;

/// Most decimals of a VAT rate (`0.0825` is 8.25 %): a hundredth of a percent, the finest
/// rate any tax authority publishes.
pub const MAX_VAT_RATE_DECIMALS: u32 = 4;

/// Most characters of a client's value quoted in an error message (see [`quoted`]).
pub const MAX_QUOTED_CHARS: usize = 64;

/// A value broke a limit: the field, as the API names it, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct LimitError {
    /// The field, as named in the proto.
    pub field: &'static str,
    /// What is wrong and what is expected (client values quoted with [`quoted`]).
    pub message: String,
}

fn refuse(field: &'static str, message: impl Into<String>) -> LimitError {
    LimitError {
        field,
        message: message.into(),
    }
}

/// A client's value for an error message: in double quotes, control and bidi-override
/// characters escaped, cut to [`MAX_QUOTED_CHARS`] characters with an ellipsis and the full
/// length. An error never echoes an unbounded input back: the status message travels in the
/// `grpc-message` header, and an HTTP/2 peer resets a stream whose headers are too large (the
/// client would see `RESOURCE_EXHAUSTED` instead of the real answer).
pub fn quoted(value: &str) -> Quoted<'_> {
    Quoted(value)
}

/// See [`quoted`].
#[derive(Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self
            .0
            .char_indices()
            .nth(MAX_QUOTED_CHARS)
            .map_or(self.0.len(), |(i, _)| i);
        let cut = &self.0[..end];
        write!(f, "\"")?;
        for c in cut.chars() {
            if c == '"' || c == '\\' || c.is_control() || is_bidi_control(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        write!(f, "\"")?;
        if cut.len() < self.0.len() {
            write!(f, "... ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Bidirectional embedding, override and isolate controls (U+202A-U+202E, U+2066-U+2069), and
/// the invisible marks (U+200E, U+200F, U+061C): they reorder how the text around them is shown,
/// so an invoice line or a log could read differently from what it says.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// An id: 1 to [`MAX_ID_LEN`] printable ASCII characters, no spaces.
pub fn check_id(field: &'static str, value: &str) -> Result<(), LimitError> {
    if value.is_empty() {
        return Err(refuse(field, "is required"));
    }
    if value.len() > MAX_ID_LEN || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(refuse(
            field,
            format!("must be 1 to {MAX_ID_LEN} printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

/// A code (an add-on's): 1 to [`MAX_CODE_LEN`] printable ASCII characters, no spaces.
pub fn check_code(field: &'static str, value: &str) -> Result<(), LimitError> {
    if value.is_empty() {
        return Err(refuse(field, "is required"));
    }
    if value.len() > MAX_CODE_LEN || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(refuse(
            field,
            format!("must be 1 to {MAX_CODE_LEN} printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

/// Free text (a name, a reason, a note): at most `max` characters, no control characters and
/// no bidi controls ([`is_bidi_control`]); `required` refuses an empty or blank value.
pub fn check_text(
    field: &'static str,
    value: &str,
    max: usize,
    required: bool,
) -> Result<(), LimitError> {
    if required && value.trim().is_empty() {
        return Err(refuse(field, "is required"));
    }
    if value.chars().count() > max {
        return Err(refuse(field, format!("must be at most {max} characters")));
    }
    if value.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        return Err(refuse(
            field,
            "must not contain control characters or bidirectional overrides",
        ));
    }
    Ok(())
}

/// A count in `1..=max`.
pub fn check_count(field: &'static str, value: u64, max: u64) -> Result<u64, LimitError> {
    if value == 0 || value > max {
        return Err(refuse(field, format!("must be 1 to {max}, got {value}")));
    }
    Ok(value)
}

/// A decimal value: not negative (a `-0` counts as negative: it is not a price or a rate), at
/// most `max`, at most `decimals` decimals (trailing zeros do not count).
fn check_bounded(
    field: &'static str,
    value: Decimal,
    decimals: u32,
    max: Decimal,
    what: &str,
) -> Result<Decimal, LimitError> {
    if value.is_sign_negative() {
        return Err(refuse(field, format!("must not be negative, got {value}")));
    }
    if value.normalize().scale() > decimals {
        return Err(refuse(
            field,
            format!(
                "{value} has more than {decimals} decimals: the smallest {what} step is 10^-{decimals}"
            ),
        ));
    }
    if value > max {
        return Err(refuse(field, format!("must be at most {max}, got {value}")));
    }
    Ok(value)
}

/// A decimal text ("" is zero): digits with at most one `.`, no sign, exponent or separators,
/// then [`check_bounded`].
fn parse_bounded(
    field: &'static str,
    text: &str,
    decimals: u32,
    max: Decimal,
    what: &str,
) -> Result<Decimal, LimitError> {
    if text.is_empty() {
        return Ok(Decimal::ZERO);
    }
    if text.starts_with('-') {
        return Err(refuse(
            field,
            format!("must not be negative, got {}", quoted(text)),
        ));
    }
    let (int_part, frac_part) = match text.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (text, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    // Decimal holds 28 significant digits; anything longer is refused before parsing so that
    // nothing is rounded silently.
    let value = (text.len() <= 28 && digits(int_part) && frac_part.is_none_or(digits))
        .then(|| text.parse::<Decimal>().ok())
        .flatten()
        .ok_or_else(|| {
            refuse(
                field,
                format!(
                    "{} is not a plain decimal number such as 12.50 (no sign, exponent or separators)",
                    quoted(text)
                ),
            )
        })?;
    check_bounded(field, value, decimals, max, what)
}

/// A price per period (a band's flat price, a seat's or an add-on's price) in `currency`:
/// not negative, at most [`MAX_PRICE`], no finer than the currency's minor unit.
pub fn check_price(
    field: &'static str,
    value: Decimal,
    currency: Currency,
) -> Result<Decimal, LimitError> {
    check_bounded(field, value, currency.minor_units(), MAX_PRICE, "price")
}

/// A unit price (per contact, per credit): not negative, at most [`MAX_PRICE`], at most
/// [`MAX_UNIT_PRICE_DECIMALS`] decimals.
pub fn check_unit_price(field: &'static str, value: Decimal) -> Result<Decimal, LimitError> {
    check_bounded(
        field,
        value,
        MAX_UNIT_PRICE_DECIMALS,
        MAX_PRICE,
        "unit price",
    )
}

/// A VAT rate: in `[0, 1)`, at most [`MAX_VAT_RATE_DECIMALS`] decimals, not `-0`.
pub fn check_vat_rate(field: &'static str, value: Decimal) -> Result<Decimal, LimitError> {
    let rate = check_bounded(field, value, MAX_VAT_RATE_DECIMALS, Decimal::ONE, "rate")?;
    if rate >= Decimal::ONE {
        return Err(refuse(field, "must be in [0, 1), e.g. 0.21"));
    }
    Ok(rate)
}

/// A price per period as text ("" is zero): see [`check_price`].
pub fn parse_price(
    field: &'static str,
    text: &str,
    currency: Currency,
) -> Result<Decimal, LimitError> {
    parse_bounded(field, text, currency.minor_units(), MAX_PRICE, "price")
}

/// A unit price as text ("" is zero): see [`check_unit_price`].
pub fn parse_unit_price(field: &'static str, text: &str) -> Result<Decimal, LimitError> {
    parse_bounded(
        field,
        text,
        MAX_UNIT_PRICE_DECIMALS,
        MAX_PRICE,
        "unit price",
    )
}

/// A VAT rate as text ("" is zero): see [`check_vat_rate`].
pub fn parse_vat_rate(field: &'static str, text: &str) -> Result<Decimal, LimitError> {
    let rate = parse_bounded(field, text, MAX_VAT_RATE_DECIMALS, Decimal::ONE, "rate")?;
    check_vat_rate(field, rate)
}

/// An amount of money a client states: not negative, at most [`MAX_AMOUNT`], no finer than
/// the currency's minor unit.
pub fn check_amount(
    field: &'static str,
    amount: Decimal,
    currency: Currency,
) -> Result<(), LimitError> {
    if amount.is_sign_negative() {
        return Err(refuse(field, "must not be negative"));
    }
    if amount > MAX_AMOUNT {
        return Err(refuse(field, format!("must be at most {MAX_AMOUNT}")));
    }
    if amount.normalize().scale() > currency.minor_units() {
        return Err(refuse(
            field,
            format!(
                "has more decimals than {}'s minor unit ({})",
                currency.code(),
                currency.minor_units()
            ),
        ));
    }
    Ok(())
}

/// An amount of money a client states, as text and an ISO code: no sign at all (`-0` is not an
/// amount), then [`check_amount`].
pub fn parse_amount(
    field: &'static str,
    amount: &str,
    currency: &str,
) -> Result<crate::Money, LimitError> {
    if amount.starts_with(['-', '+']) {
        return Err(refuse(
            field,
            format!("must not carry a sign, got {}", quoted(amount)),
        ));
    }
    let money = crate::Money::parse(amount, currency).map_err(|e| match e {
        crate::MoneyError::UnknownCurrency(_) => refuse(
            field,
            format!("{} is not a supported ISO-4217 code", quoted(currency)),
        ),
        _ => refuse(
            field,
            format!(
                "{} is not a plain decimal amount such as 12.50",
                quoted(amount)
            ),
        ),
    })?;
    check_amount(field, money.amount(), money.currency())?;
    Ok(money)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_what_their_docs_say() {
        assert_eq!(MAX_PRICE, Decimal::from(1_000_000));
        assert_eq!(MAX_AMOUNT, Decimal::from(1_000_000_000_000_i64));
    }

    #[test]
    fn quoted_cuts_long_values_and_escapes_controls() {
        assert_eq!(quoted("sms").to_string(), "\"sms\"");
        let long = "x".repeat(10_000);
        let q = quoted(&long).to_string();
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with("... (10000 bytes)"), "{q}");
        let q = quoted("a\u{0}b\u{202E}c\nd\"").to_string();
        assert_eq!(q, "\"a\\u{0}b\\u{202e}c\\nd\\\"\"");
        // Cut on characters, never inside one.
        let wide = "é".repeat(100);
        assert!(
            quoted(&wide)
                .to_string()
                .starts_with(&format!("\"{}\"", "é".repeat(64)))
        );
    }

    #[test]
    fn prices_refuse_sign_excess_precision_and_size() {
        let eur = Currency::EUR;
        assert_eq!(parse_price("p", "12.50", eur), Ok(Decimal::new(1250, 2)));
        assert_eq!(parse_price("p", "12.500", eur), Ok(Decimal::new(12500, 3)));
        assert_eq!(parse_price("p", "", eur), Ok(Decimal::ZERO));
        for bad in [
            "-0",
            "-1",
            "+1",
            "0.001",
            "0.0000000001",
            "1e3",
            "1,5",
            ".5",
            "5.",
            "1000000.01",
        ] {
            assert!(parse_price("p", bad, eur).is_err(), "{bad}");
        }
        assert!(parse_price("p", "1", Currency::JPY).is_ok());
        assert!(parse_price("p", "1.5", Currency::JPY).is_err());
        assert!(parse_unit_price("p", "0.000125").is_ok());
        assert!(parse_unit_price("p", "0.0000001").is_err());
        assert!(check_price("p", Decimal::new(-1, 2), eur).is_err());
        assert!(check_unit_price("p", Decimal::new(1, 7)).is_err());
        assert!(check_vat_rate("v", Decimal::new(1, 10)).is_err());
        assert!(parse_price("p", &"9".repeat(100), eur).is_err());
    }

    #[test]
    fn vat_rates_refuse_sign_precision_and_one() {
        assert_eq!(parse_vat_rate("v", "0.21"), Ok(Decimal::new(21, 2)));
        assert_eq!(parse_vat_rate("v", "0.0825"), Ok(Decimal::new(825, 4)));
        for bad in ["-0", "-0.1", "1", "1.0", "0.00001", "0.0000000001"] {
            assert!(parse_vat_rate("v", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_refuses_controls_bidi_and_length() {
        assert!(check_text("name", "Pro plan", MAX_NAME_LEN, true).is_ok());
        assert!(check_text("name", "  ", MAX_NAME_LEN, true).is_err());
        assert!(check_text("name", "", MAX_NAME_LEN, false).is_ok());
        for bad in [
            "a\u{0}b",
            "a\nb",
            "evil\u{202E}gpj.exe",
            "x\u{2066}y",
            "x\u{7f}",
        ] {
            assert!(
                check_text("name", bad, MAX_NAME_LEN, false).is_err(),
                "{bad:?}"
            );
        }
        assert!(check_text("name", &"x".repeat(MAX_NAME_LEN + 1), MAX_NAME_LEN, false).is_err());
    }

    #[test]
    fn ids_and_codes() {
        assert!(check_id("id", "acct-1").is_ok());
        for bad in ["", " ", "a b", "a\u{0}", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(check_id("id", bad).is_err(), "{bad:?}");
        }
        assert!(check_code("code", &"x".repeat(MAX_CODE_LEN)).is_ok());
        assert!(check_code("code", &"x".repeat(MAX_CODE_LEN + 1)).is_err());
    }

    #[test]
    fn amounts() {
        let eur = Currency::EUR;
        assert!(check_amount("a", Decimal::new(1250, 2), eur).is_ok());
        assert!(check_amount("a", Decimal::new(-1, 0), eur).is_err());
        assert!(parse_amount("a", "-0", "EUR").is_err());
        assert!(parse_amount("a", "0.001", "EUR").is_err());
        assert!(parse_amount("a", "12.50", "EUR").is_ok());
        assert!(parse_amount("a", "12.50", "XXX").is_err());
        assert!(check_amount("a", Decimal::ZERO, eur).is_ok());
        assert!(check_amount("a", Decimal::new(1, 3), eur).is_err());
        assert!(check_amount("a", MAX_AMOUNT + Decimal::ONE, eur).is_err());
        assert_eq!(check_count("n", 1, 5), Ok(1));
        assert!(check_count("n", 0, 5).is_err());
        assert!(check_count("n", 6, 5).is_err());
    }
}
