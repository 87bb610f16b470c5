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
