//! The webhook sink: each event POSTed as JSON to a configured endpoint, signed like Stripe's
//! webhooks.
//!
//! `Billing-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`. A receiver
//! recomputes the HMAC over the timestamp, a `.` and the raw body it received, compares in
//! constant time, and refuses a timestamp too far from its clock (replays); [`verify`] does all
//! three. A 2xx answer acknowledges the event; anything else (or no answer within
//! [`TIMEOUT`]) is a failure, retried (see [`crate::relay`]). Redirects are not followed.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{DeliveryError, OutboundEvent, Sink};
use crate::config::WebhookConfig;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "Billing-Signature";
/// How long a receiver may take to answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Delivers to one endpoint.
pub struct WebhookSink {
    name: String,
    url: reqwest::Url,
    secret: String,
    event_types: Vec<String>,
    client: reqwest::Client,
}

impl WebhookSink {
    /// The sink of one configured endpoint, named `webhook:<name>`.
    pub fn new(config: &WebhookConfig) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(&config.url)
            .map_err(|e| anyhow::anyhow!("webhooks.{}.url: {e}", config.name))?;
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent("billing-suite-webhooks/1")
            .build()?;
        Ok(Self {
            name: format!("webhook:{}", config.name),
            url,
            secret: config.secret.clone(),
            event_types: config.event_types.clone(),
            client,
        })
    }
}

#[async_trait::async_trait]
impl Sink for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants(&self, event_type: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type)
    }

    async fn deliver(&self, event: &OutboundEvent) -> Result<(), DeliveryError> {
        let body = event.body();
        let t = chrono::Utc::now().timestamp();
        let answer = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sign(self.secret.as_bytes(), t, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| DeliveryError(format!("POST {}: {}", self.url, error_chain(&e))))?;
        let status = answer.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError(format!("POST {}: HTTP {status}", self.url)))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn mac(secret: &[u8], t: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `Billing-Signature` value of `body` sent at unix time `t`.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let digest = mac(secret, t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(digest))
}

/// Why a receiver refuses a signature.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// Not `t=<digits>,v1=<hex>`.
    #[error("malformed Billing-Signature header")]
    Malformed,
    /// The timestamp is further than the tolerance from now (a replay, or a clock far off).
    #[error("Billing-Signature timestamp outside the tolerance")]
    Stale,
    /// No `v1` signature matches the body under the secret.
    #[error("Billing-Signature does not match the body")]
    Mismatch,
}

/// What a receiver does with a delivery: checks `header` against the raw `body` under `secret`,
/// with the timestamp at most `tolerance` from `now` (unix seconds). Several `v1=` entries are
/// accepted (any may match), so a secret can be rolled over.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => {
                signatures.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?);
            }
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(t) > tolerance.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let expected = mac(secret, t, body).finalize().into_bytes();
    if signatures
        .iter()
        .any(|s| bool::from(s.as_slice().ct_eq(expected.as_slice())))
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn a_signature_verifies_under_its_secret_only() {
        let body = br#"{"id":"e1"}"#;
        let header = sign(b"whsec_0123456789abcdef", 1_700_000_000, body);
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(header.len(), "t=1700000000,v1=".len() + 64);
        assert_eq!(
            verify(
                b"whsec_0123456789abcdef",
                &header,
                body,
                1_700_000_010,
                FIVE_MIN
            ),
            Ok(())
        );
        assert_eq!(
            verify(
                b"whsec_wrong-secret-000",
                &header,
                body,
                1_700_000_010,
                FIVE_MIN
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                b"whsec_0123456789abcdef",
                &header,
                br#"{"id":"e2"}"#,
                1_700_000_010,
                FIVE_MIN
            ),
            Err(SignatureError::Mismatch),
            "a changed body"
        );
        assert_eq!(
            verify(
                b"whsec_0123456789abcdef",
                &header,
                body,
                1_700_001_000,
                FIVE_MIN
            ),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(b"k", "v1=00", body, 0, FIVE_MIN),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // The MAC computed here from the documented parts, `<t>.<body>`, matches the header.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        m.update(b"42.hello");
        let want = hex::encode(m.finalize().into_bytes());
        assert_eq!(sign(b"Jefe", 42, b"hello"), format!("t=42,v1={want}"));
        // The README's example, computed there with Python's hmac module.
        assert_eq!(
            sign(b"whsec_0123456789abcdef", 1_767_225_600, br#"{"id":"e1"}"#),
            "t=1767225600,v1=4e5bf45b885da6788d8b64e5b0f54b3663a862fb0904d333fd8ef0ec599fd8fa"
        );
    }
}
