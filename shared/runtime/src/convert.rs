//! Conversions between protobuf well-known types and domain types, shared by every `grpc` layer.

use chrono::{DateTime, Utc};
use shared::limits::LimitError;
use tonic::Status;

/// An instant as a protobuf timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// An amount as its message: every `Money` a service answers or puts in an event is rendered
/// by [`shared::Money::amount_text`] (the currency's minor-unit digits always, e.g. "0.00").
pub fn money(m: &shared::Money) -> proto::common::v1::Money {
    proto::common::v1::Money {
        amount: m.amount_text(),
        currency: m.currency().code().to_string(),
    }
}

/// A required timestamp field as an instant, or `INVALID_ARGUMENT` naming the field.
pub fn required_instant(
    t: Option<&prost_types::Timestamp>,
    field: &str,
) -> Result<DateTime<Utc>, Status> {
    let t = t.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))?;
    instant(t, field)
}

/// A timestamp as an instant, or `INVALID_ARGUMENT` when out of range.
pub fn instant(t: &prost_types::Timestamp, field: &str) -> Result<DateTime<Utc>, Status> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .filter(|d| d.timestamp() >= 0 && d.timestamp() < 253_402_300_800)
        .ok_or_else(|| {
            Status::invalid_argument(format!("{field} is not a timestamp between 1970 and 9999"))
        })
}

/// A price-list message as a validated tier table in `currency`, or the field and the problem.
pub fn tier_table(
    p: &proto::wallet::v1::CreditPricing,
    currency: shared::Currency,
) -> Result<shared::TierTable, (&'static str, String)> {
    use proto::wallet::v1::TierMode as Pb;
    let mode = match Pb::try_from(p.mode) {
        Ok(Pb::Volume) => shared::TierMode::Volume,
        Ok(Pb::Graduated) => shared::TierMode::Graduated,
        Ok(Pb::FlatPerBand) => shared::TierMode::FlatPerBand,
        _ => {
            return Err((
                "pricing.mode",
                "must be TIER_MODE_VOLUME, _GRADUATED or _FLAT_PER_BAND".into(),
            ));
        }
    };
    let tiers = p
        .tiers
        .iter()
        .map(|t| {
            Ok(shared::Tier {
                first: t.first,
                last: (t.last != 0).then_some(t.last),
                unit_price: decimal("pricing.tiers.unit_price", &t.unit_price)?,
                flat_price: decimal("pricing.tiers.flat_price", &t.flat_price)?,
            })
        })
        .collect::<Result<Vec<_>, (&'static str, String)>>()?;
    shared::TierTable::new(mode, currency, tiers).map_err(|e| ("pricing", e.to_string()))
}

/// A tier table as its price-list message.
pub fn tier_table_message(t: &shared::TierTable) -> proto::wallet::v1::CreditPricing {
    use proto::wallet::v1::TierMode as Pb;
    let mode = match t.mode() {
        shared::TierMode::Volume => Pb::Volume,
        shared::TierMode::Graduated => Pb::Graduated,
        shared::TierMode::FlatPerBand => Pb::FlatPerBand,
    };
    proto::wallet::v1::CreditPricing {
        mode: mode as i32,
        tiers: t
            .tiers()
            .iter()
            .map(|tier| proto::wallet::v1::PriceTier {
                first: tier.first,
                last: tier.last.unwrap_or(0),
                unit_price: tier.unit_price.to_string(),
                flat_price: tier.flat_price.to_string(),
            })
            .collect(),
    }
}

/// A client's value quoted for an error message: [`shared::limits::quoted`] (cut to 64
/// characters, control and bidi characters escaped). A message says what was wrong without
/// echoing an unbounded input back: the status message travels in the `grpc-message` header,
/// and an HTTP/2 peer resets a stream whose headers are too large (the client then sees
/// `RESOURCE_EXHAUSTED` instead of the real answer).
pub fn shown(s: &str) -> String {
    shared::limits::quoted(s).to_string()
}

/// A decimal field ("" is zero): a plain non-negative number such as `0.0125` (no sign, so no
/// `-0`; no exponent), at most 12 decimals. The field's own precision and maximum (a price's
/// minor unit, a rate's decimals) are the domain's checks, `shared::limits`.
pub fn decimal(
    field: &'static str,
    s: &str,
) -> Result<rust_decimal::Decimal, (&'static str, String)> {
    if s.is_empty() {
        return Ok(rust_decimal::Decimal::ZERO);
    }
    let plain = s.len() <= 40 && s.chars().all(|c| c.is_ascii_digit() || c == '.');
    let parsed = plain
        .then(|| s.parse::<rust_decimal::Decimal>().ok())
        .flatten()
        .filter(|d| d.scale() <= 12);
    parsed.ok_or_else(|| {
        let why = if s.starts_with('-') {
            "must not be negative"
        } else {
            "is not a plain decimal number with at most 12 decimals"
        };
        (field, format!("{} {why}", shown(s)))
    })
}

/// A request field a check refused. `?` turns it into `INVALID_ARGUMENT` with the field's
/// `BadRequest` violation ([`crate::status::invalid_argument`]) in a handler answering
/// `Status`, and into the service's own invalid-argument error (each has
/// `From<InvalidField>`) in code answering that error: the same answer either way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// The field, as named in the proto.
    pub field: &'static str,
    /// What is wrong and what is expected.
    pub message: String,
}

impl From<LimitError> for InvalidField {
    fn from(e: LimitError) -> Self {
        Self {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<InvalidField> for Status {
    fn from(e: InvalidField) -> Self {
        crate::status::invalid_argument(e.field, &e.message)
    }
}

/// A request's id field (a wallet, account, plan or reservation id), as it is: 1 to
/// [`shared::limits::MAX_ID_LEN`] printable ASCII characters without spaces
/// ([`shared::limits::check_id`]), or the field refused ([`InvalidField`]).
pub fn id<'a>(field: &'static str, value: &'a str) -> Result<&'a str, InvalidField> {
    shared::limits::check_id(field, value)?;
    Ok(value)
}

/// An id that becomes part of a composite id joined with `:` (reseller-billing's wallet ids
/// `partner:customer`): 1 to `max` printable ASCII characters, without spaces or `:`.
pub fn id_part<'a>(
    field: &'static str,
    value: &'a str,
    max: usize,
) -> Result<&'a str, InvalidField> {
    if value.is_empty() {
        return Err(InvalidField {
            field,
            message: "is required".into(),
        });
    }
    if value.len() > max || !value.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        return Err(InvalidField {
            field,
            message: format!(
                "must be 1 to {max} printable ASCII characters, without spaces or ':'"
            ),
        });
    }
    Ok(value)
}

/// Free text (a reason, a reference): at most `max` characters, no control characters
/// ([`shared::limits::check_text`]); `required` refuses an empty or blank one.
pub fn text<'a>(
    field: &'static str,
    value: &'a str,
    max: usize,
    required: bool,
) -> Result<&'a str, InvalidField> {
    shared::limits::check_text(field, value, max, required)?;
    Ok(value)
}

/// A count in `1..=max` ([`shared::limits::check_count`]).
pub fn count(field: &'static str, value: u64, max: u64) -> Result<u64, InvalidField> {
    Ok(shared::limits::check_count(field, value, max)?)
}

/// A mailing's recipients: at least 1 (or 0 where `allow_zero`), at most
/// [`shared::limits::MAX_RECIPIENTS`].
pub fn recipients(field: &'static str, n: u64, allow_zero: bool) -> Result<u64, InvalidField> {
    if n == 0 && !allow_zero {
        return Err(InvalidField {
            field,
            message: "must be at least 1".into(),
        });
    }
    if n > shared::limits::MAX_RECIPIENTS {
        return Err(InvalidField {
            field,
            message: format!("at most {} per mailing", shared::limits::MAX_RECIPIENTS),
        });
    }
    Ok(n)
}

/// A use case's answer as its message: what is sent, and what a mutating request records
/// under its idempotency key (a retry is answered with the recorded message). Each service
/// implements it for its model types in its `convert.rs`.
pub trait Reply {
    /// The response message.
    type Message: prost::Message + Default;
    /// The answer as its message.
    fn to_message(&self) -> Self::Message;
}

/// A mutating use case's answer: computed by this request, or the message the first request
/// with its idempotency key recorded, replayed as recorded.
#[derive(Debug)]
pub enum Answer<T: Reply> {
    /// Computed by this request.
    Fresh(T),
    /// Recorded by an earlier request with the same key.
    Replayed(T::Message),
}

impl<T: Reply> Answer<T> {
    /// The answer as its message.
    pub fn into_message(self) -> T::Message {
        match self {
            Answer::Fresh(answer) => answer.to_message(),
            Answer::Replayed(message) => message,
        }
    }

    /// A recorded answer, from its encoding.
    pub fn decode(recorded: &[u8]) -> Result<Self, crate::db::DbError> {
        <T::Message as prost::Message>::decode(recorded)
            .map(Answer::Replayed)
            .map_err(|_| crate::db::DbError::Corrupt("a recorded answer does not decode".into()))
    }
}

/// A mutating use case's answer as its gRPC response.
pub fn answer<T: Reply, E: Into<tonic::Status>>(
    r: Result<Answer<T>, E>,
) -> Result<tonic::Response<T::Message>, tonic::Status> {
    r.map(|a| tonic::Response::new(a.into_message()))
        .map_err(Into::into)
}

/// A read's result as its gRPC response.
pub fn view<T: Reply, E: Into<tonic::Status>>(
    r: Result<T, E>,
) -> Result<tonic::Response<T::Message>, tonic::Status> {
    r.map(|v| tonic::Response::new(v.to_message()))
        .map_err(Into::into)
}

/// A use case's result as a gRPC answer, its error mapped by the service's `From<Error> for
/// Status`.
pub fn reply<T, E: Into<tonic::Status>>(
    r: Result<T, E>,
) -> Result<tonic::Response<T>, tonic::Status> {
    r.map(tonic::Response::new).map_err(Into::into)
}

/// Like [`reply`] for a response kept as encoded bytes (one code path answering different
/// messages, replayed from an idempotency key).
pub fn reply_decoded<T: prost::Message + Default, E: Into<tonic::Status>>(
    r: Result<Vec<u8>, E>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let bytes = r.map_err(Into::into)?;
    T::decode(bytes.as_slice())
        .map(tonic::Response::new)
        .map_err(|_| tonic::Status::internal("internal error"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn refusal<T: std::fmt::Debug>(r: Result<T, InvalidField>) -> (&'static str, String) {
        let e = r.expect_err("refused");
        (e.field, e.message)
    }

    #[test]
    fn ids_are_printable_ascii_without_spaces() {
        assert_eq!(id("wallet_id", "w-1"), Ok("w-1"));
        assert_eq!(
            refusal(id("wallet_id", "")),
            ("wallet_id", "is required".to_string())
        );
        let (field, message) = refusal(id("wallet_id", "a b"));
        assert_eq!(field, "wallet_id");
        assert!(message.contains("printable ASCII"), "{message}");
        assert!(id("x", &"x".repeat(shared::limits::MAX_ID_LEN)).is_ok());
        assert!(id("x", &"x".repeat(shared::limits::MAX_ID_LEN + 1)).is_err());
        assert!(id("x", "caf\u{e9}").is_err());
    }

    #[test]
    fn a_refused_field_answers_invalid_argument_with_its_violation() {
        let status = Status::from(id("wallet_id", "").unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "wallet_id: is required");
    }

    #[test]
    fn id_parts_refuse_colons_and_respect_their_bound() {
        assert_eq!(id_part("customer_id", "c-1", 8), Ok("c-1"));
        assert_eq!(
            refusal(id_part("customer_id", "", 8)),
            ("customer_id", "is required".to_string())
        );
        for bad in ["a:b", "a b", "123456789"] {
            assert_eq!(
                refusal(id_part("customer_id", bad, 8)),
                (
                    "customer_id",
                    "must be 1 to 8 printable ASCII characters, without spaces or ':'".to_string()
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn texts_counts_and_recipients_are_bounded() {
        assert_eq!(text("reason", "", 10, false), Ok(""));
        assert!(text("reason", " ", 10, true).is_err());
        assert!(text("reason", "12345678901", 10, false).is_err());
        assert!(text("reason", "a\u{202e}b", 10, false).is_err());
        assert_eq!(count("seats", 3, 3), Ok(3));
        assert!(count("seats", 0, 3).is_err());
        assert!(count("seats", 4, 3).is_err());
        assert_eq!(recipients("recipients", 0, true), Ok(0));
        assert_eq!(
            refusal(recipients("recipients", 0, false)),
            ("recipients", "must be at least 1".to_string())
        );
        assert_eq!(
            refusal(recipients(
                "recipients",
                shared::limits::MAX_RECIPIENTS + 1,
                true
            )),
            (
                "recipients",
                format!("at most {} per mailing", shared::limits::MAX_RECIPIENTS)
            )
        );
    }

    #[test]
    fn shown_quotes_short_values_and_cuts_long_ones() {
        assert_eq!(shown("EUR"), "\"EUR\"");
        let long = "x".repeat(100_000);
        let s = shown(&long);
        assert!(s.len() < 100, "{s}");
        assert!(s.ends_with("... (100000 bytes)"), "{s}");
    }

    #[test]
    fn decimals_are_plain_and_unsigned() {
        assert_eq!(
            decimal("f", "0.0125").map(|d| d.to_string()),
            Ok("0.0125".to_string())
        );
        assert_eq!(decimal("f", ""), Ok(rust_decimal::Decimal::ZERO));
        for bad in ["-0", "-1", "+1", "1e3", "1,5", "0.0000000000001", "."] {
            assert!(decimal("f", bad).is_err(), "{bad}");
        }
    }
}
