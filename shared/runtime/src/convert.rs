//! Conversions between protobuf well-known types and domain types, shared by every `grpc` layer.

use chrono::{DateTime, Utc};
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
mod tests {
    use super::*;

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
