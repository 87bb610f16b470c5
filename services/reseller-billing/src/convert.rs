//! Conversions between the reseller's records and protobuf messages, by hand.

use prost::Message;

use crate::error::ResellerError;

/// A message as stored in a text column: its protobuf encoding in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// A message stored by [`hex`] (a partner's pricing and rating).
pub fn decode_stored<M: Message + Default>(hex_text: &str) -> Result<M, ResellerError> {
    unhex(hex_text)
        .and_then(|b| M::decode(b.as_slice()).ok())
        .ok_or_else(|| runtime::db::DbError::Corrupt("stored protobuf".into()).into())
}
