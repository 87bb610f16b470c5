//! Stripe's webhooks: `POST /webhooks/stripe` on the metrics listener of a service that pays
//! through Stripe with `stripe_webhook_secret` set.
//!
//! 1. The `Stripe-Signature` header (`t=<unix seconds>,v1=<hex>[,v1=...]`) must carry an
//!    HMAC-SHA256, keyed with the endpoint's signing secret, of `<t>.<raw body>`, and `t` must
//!    be within [`TOLERANCE`] (5 minutes, Stripe's default) of the system clock (Stripe signs
//!    with real time, so never the service's test clock). Otherwise: `400`, nothing read further.
//! 2. The event is handed to the service's [`WebhookHandler`], which records the event id and
//!    applies it in one transaction: a delivery seen before changes nothing.
//! 3. `200` only after that commit; a failure answers `500` and Stripe delivers again.
//!
//! [`parse`] reads `payment_intent.succeeded` / `.payment_failed` into a [`PaymentUpdate`]
//! (the PaymentIntent carries our `billing_key`), and `charge.refunded` /
//! `charge.dispute.created` into a [`Reversal`] (a Charge or a Dispute: they name the
//! PaymentIntent but carry none of its metadata, so a service asks the gateway for the key,
//! [`shared::PaymentGateway::key_of_charge`]).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use shared::{ChargeStatus, DeclineReason};
use subtle::ConstantTimeEq;

use crate::stripe::{METADATA_KEY, Secret};

/// Where the endpoint answers.
pub const PATH: &str = "/webhooks/stripe";
/// Largest age (or advance) of a signature's timestamp.
pub const TOLERANCE: Duration = Duration::from_secs(300);

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header, or not `t=...,v1=...`.
    #[error("missing or malformed Stripe-Signature header")]
    Malformed,
    /// The timestamp is outside the tolerance.
    #[error("signature timestamp outside the {}-second tolerance", TOLERANCE.as_secs())]
    Stale,
    /// No `v1` signature matches.
    #[error("no signature matches the payload")]
    Mismatch,
}

/// The `v1` signature Stripe computes for `payload` signed at `timestamp`.
pub fn sign(secret: &Secret, timestamp: i64, payload: &[u8]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!("{:x}", mac.finalize().into_bytes())
}

/// Checks `header` (`Stripe-Signature`) for `payload` at `now` (unix seconds).
pub fn verify(
    secret: &Secret,
    header: &str,
    payload: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.push(v),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let tolerance = i64::try_from(TOLERANCE.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(timestamp) > tolerance.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let expected = sign(secret, timestamp, payload);
    if signatures
        .iter()
        .any(|s| bool::from(s.as_bytes().ct_eq(expected.as_bytes())))
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// One verified event, as far as the services read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// `evt_...`: deliveries of one event share it.
    pub id: String,
    /// e.g. `payment_intent.succeeded`.
    pub kind: String,
    /// For `payment_intent.*` events: the PaymentIntent's id, our key and what it says.
    pub payment: Option<PaymentUpdate>,
    /// For `charge.refunded` and `charge.dispute.created`: money taken back from a charge.
    pub reversal: Option<Reversal>,
    /// For `charge.dispute.closed` in our favour: the disputed money came back.
    pub reinstatement: Option<Reinstatement>,
}

impl WebhookEvent {
    /// A final payment outcome for a PaymentIntent of ours: its `billing_key`, and `None` if it
    /// was paid or `Some(reason)` if it failed. `None` for anything else (an event without a
    /// payment, one the suite did not create, one still in progress).
    pub fn final_payment(&self) -> Option<(&str, Option<String>)> {
        let update = self.payment.as_ref()?;
        let declined = match update.status {
            ChargeStatus::Succeeded => None,
            ChargeStatus::Declined(reason) => Some(reason.to_string()),
            _ => return None,
        };
        Some((update.billing_key.as_deref()?, declined))
    }
}

/// How money paid came back out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReversalKind {
    /// `charge.refunded`: refunded (in the dashboard or through the API).
    Refunded,
    /// `charge.dispute.created`: the customer disputed the charge with their bank.
    Disputed,
}

impl ReversalKind {
    /// `refunded` or `disputed`: the reason the services record.
    pub fn as_str(self) -> &'static str {
        match self {
            ReversalKind::Refunded => "refunded",
            ReversalKind::Disputed => "disputed",
        }
    }
}

/// What a `charge.refunded` (its object a Charge) or `charge.dispute.created` (a Dispute) event
/// tells. Neither carries the PaymentIntent's metadata: the PaymentIntent's id is how a service
/// finds what was paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reversal {
    /// Refund or dispute.
    pub kind: ReversalKind,
    /// `pi_...` of the charge; `None` for a charge not made through a PaymentIntent.
    pub payment_intent: Option<String>,
    /// Minor units taken back: the Charge's `amount_refunded` (all refunds so far, cumulative),
    /// or the Dispute's `amount`.
    pub amount: i64,
    /// The Charge's `refunded`: refunded in full (`false` for a dispute).
    pub complete: bool,
}

impl Reversal {
    /// Whether this takes back the whole of a payment of `price_minor`: all refunds so far (or
    /// the disputed amount) reach the price, or Stripe says the charge is refunded in full.
    /// The services take back what a payment bought only then (all or nothing): how much of a
    /// volume-priced purchase or of an invoice's period a part stands for is a business
    /// decision, left to an operator.
    pub fn is_whole(&self, price_minor: i64) -> bool {
        self.complete || self.amount >= price_minor
    }
}

/// What a `charge.dispute.closed` event tells when the dispute ended in our favour: `won`, or
/// `warning_closed` (an inquiry closed without becoming a dispute). A dispute `lost` keeps the
/// money with the customer: nothing comes back, and no `Reinstatement` is read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reinstatement {
    /// `pi_...` of the disputed charge; `None` for a charge not made through a PaymentIntent.
    pub payment_intent: Option<String>,
    /// The Dispute's `amount`: the minor units that had been disputed.
    pub amount: i64,
}

impl Reinstatement {
    /// Whether the dispute was of the whole of a payment of `price_minor` (only such a dispute
    /// took back what the payment bought, [`Reversal::is_whole`], so only its end gives it back).
    pub fn is_whole(&self, price_minor: i64) -> bool {
        self.amount >= price_minor
    }
}

/// What a `payment_intent.succeeded` or `payment_intent.payment_failed` event tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentUpdate {
    /// `pi_...`.
    pub payment_intent: String,
    /// Our idempotency key (the PaymentIntent's metadata `billing_key`); `None` for a
    /// PaymentIntent the suite did not create.
    pub billing_key: Option<String>,
    /// `Succeeded`, or `Declined` with the reason of its last error.
    pub status: ChargeStatus,
}

#[derive(Deserialize)]
struct RawEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    object: serde_json::Value,
}

/// Reads a verified payload; `None` if it is not a Stripe event.
pub fn parse(payload: &[u8]) -> Option<WebhookEvent> {
    let raw: RawEvent = serde_json::from_slice(payload).ok()?;
    let object = &raw.data.object;
    let status = match raw.kind.as_str() {
        "payment_intent.succeeded" => Some(ChargeStatus::Succeeded),
        "payment_intent.payment_failed" => {
            let error = &object["last_payment_error"];
            let codes = [error["code"].as_str(), error["decline_code"].as_str()];
            Some(ChargeStatus::Declined(
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        Some("authentication_required" | "payment_intent_authentication_failure")
                    )
                }) {
                    DeclineReason::AuthenticationRequired
                } else if codes.contains(&Some("insufficient_funds")) {
                    DeclineReason::InsufficientFunds
                } else {
                    DeclineReason::Declined
                },
            ))
        }
        _ => None,
    };
    let payment = match (status, object["id"].as_str()) {
        (Some(status), Some(id)) => Some(PaymentUpdate {
            payment_intent: id.to_string(),
            billing_key: object["metadata"][METADATA_KEY]
                .as_str()
                .map(str::to_string),
            status,
        }),
        _ => None,
    };
    let kind = match raw.kind.as_str() {
        "charge.refunded" => Some(ReversalKind::Refunded),
        "charge.dispute.created" => Some(ReversalKind::Disputed),
        _ => None,
    };
    let reversal = kind.map(|kind| Reversal {
        kind,
        payment_intent: object["payment_intent"].as_str().map(str::to_string),
        amount: match kind {
            ReversalKind::Refunded => object["amount_refunded"].as_i64(),
            ReversalKind::Disputed => object["amount"].as_i64(),
        }
        .unwrap_or(0),
        complete: kind == ReversalKind::Refunded && object["refunded"].as_bool() == Some(true),
    });
    let in_our_favour = matches!(object["status"].as_str(), Some("won" | "warning_closed"));
    let reinstatement =
        (raw.kind == "charge.dispute.closed" && in_our_favour).then(|| Reinstatement {
            payment_intent: object["payment_intent"].as_str().map(str::to_string),
            amount: object["amount"].as_i64().unwrap_or(0),
        });
    Some(WebhookEvent {
        id: raw.id,
        kind: raw.kind,
        payment,
        reversal,
        reinstatement,
    })
}

/// A service's side of the webhooks.
#[async_trait]
pub trait WebhookHandler: Send + Sync + 'static {
    /// Records `event.id` and applies the event in one transaction; `Ok(false)` when the id was
    /// recorded before (a repeated delivery: nothing changes). An event the service has nothing
    /// to do for is recorded all the same.
    async fn apply(&self, event: &WebhookEvent) -> anyhow::Result<bool>;
}

/// Records a webhook event as applied in the service's `stripe_events` table (event id,
/// type, when it came, in microseconds); `false` if it was recorded before (a repeated
/// delivery). Runs in the transaction that applies the event, so the id and the change commit
/// together; each service owns the table (its migrations), the runtime only this statement.
pub async fn record_event(
    conn: &mut sqlx::AnyConnection,
    event_id: &str,
    event_type: &str,
    received_at: chrono::DateTime<chrono::Utc>,
) -> Result<bool, crate::db::DbError> {
    let done = sqlx::query(
        "INSERT INTO stripe_events (event_id, event_type, received_at_us) VALUES ($1, $2, $3) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event_id)
    .bind(event_type)
    .bind(received_at.timestamp_micros())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The start of applying a charge-level event (a refund, a dispute or its closing), which
/// names only a PaymentIntent: its `billing_key` is read from `gateway` first, outside any
/// transaction (the write lock is never held across a call to Stripe; a failure is an error,
/// and Stripe delivers again), then a write transaction records the event. `None`: the event
/// was applied before, nothing to do. Otherwise the transaction, to be committed with what the
/// event changes, and the key (`None` for a PaymentIntent that is not ours).
pub async fn begin_charge_event(
    db: &crate::db::Db,
    gateway: &dyn shared::PaymentGateway,
    event: &WebhookEvent,
    payment_intent: Option<&str>,
) -> anyhow::Result<Option<(sqlx::Transaction<'static, sqlx::Any>, Option<String>)>> {
    let key = match payment_intent {
        Some(pi) => gateway
            .key_of_charge(pi)
            .await
            .map_err(|e| anyhow::anyhow!("retrieving PaymentIntent {pi} for {}: {e}", event.id))?,
        None => None,
    };
    let mut tx = db.begin_write().await?;
    if !record_event(&mut tx, &event.id, &event.kind, chrono::Utc::now()).await? {
        tx.rollback().await?;
        return Ok(None);
    }
    Ok(Some((tx, key)))
}

#[derive(Clone)]
struct Endpoint {
    secret: Secret,
    handler: Arc<dyn WebhookHandler>,
}

async fn receive(
    State(endpoint): State<Endpoint>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let header = headers
        .get("stripe-signature")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let now = chrono::Utc::now().timestamp();
    if let Err(e) = verify(&endpoint.secret, header, &body, now) {
        tracing::warn!(error = %e, "refused a Stripe webhook delivery");
        return (StatusCode::BAD_REQUEST, "invalid signature");
    }
    let Some(event) = parse(&body) else {
        tracing::warn!("a signed Stripe webhook is not an event");
        return (StatusCode::BAD_REQUEST, "not a Stripe event");
    };
    match endpoint.handler.apply(&event).await {
        Ok(true) => {
            tracing::info!(event = %event.id, kind = %event.kind, "Stripe event applied");
            (StatusCode::OK, "applied")
        }
        Ok(false) => (StatusCode::OK, "already applied"),
        Err(e) => {
            tracing::error!(event = %event.id, error = ?e, "applying a Stripe event failed; Stripe will deliver it again");
            (StatusCode::INTERNAL_SERVER_ERROR, "not applied")
        }
    }
}

/// The endpoint's route, verifying with `secret` and applying through `handler`.
pub fn router(secret: Secret, handler: Arc<dyn WebhookHandler>) -> Router {
    Router::new()
        .route(PATH, post(receive))
        .with_state(Endpoint { secret, handler })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn only_the_whole_price_coming_back_is_a_whole_reversal() {
        let r = |amount, complete| Reversal {
            kind: ReversalKind::Refunded,
            payment_intent: None,
            amount,
            complete,
        };
        assert!(r(42_000, false).is_whole(42_000));
        assert!(r(42_000, true).is_whole(42_000));
        assert!(r(50_000, false).is_whole(42_000));
        assert!(r(0, true).is_whole(42_000), "Stripe's `refunded` decides");
        assert!(!r(41_999, false).is_whole(42_000));
        assert!(!r(0, false).is_whole(42_000));
    }

    #[test]
    fn a_signature_is_checked_against_payload_secret_and_time() {
        let secret = Secret::new("whsec_test");
        let payload = br#"{"id":"evt_1"}"#;
        let t = 1_767_225_600;
        let header = format!("t={t},v1={}", sign(&secret, t, payload));
        assert_eq!(verify(&secret, &header, payload, t + 299), Ok(()));
        assert_eq!(verify(&secret, &header, payload, t - 299), Ok(()));
        assert_eq!(
            verify(&secret, &header, payload, t + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&secret, &header, br#"{"id":"evt_2"}"#, t),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&Secret::new("whsec_other"), &header, payload, t),
            Err(SignatureError::Mismatch)
        );
        // Several v1 signatures (a secret being rolled): one match suffices.
        let rolled = format!("t={t},v1=00ff,v1={}", sign(&secret, t, payload));
        assert_eq!(verify(&secret, &rolled, payload, t), Ok(()));
        for bad in ["", "t=1", "v1=abc", "t=x,v1=abc"] {
            assert_eq!(
                verify(&secret, bad, payload, t),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
        // Stripe's documented scheme: HMAC-SHA256 of "<t>.<payload>", hex.
        assert_eq!(
            sign(&Secret::new("key"), 1, b"x"),
            format!(
                "{:x}",
                Hmac::<Sha256>::new_from_slice(b"key")
                    .unwrap()
                    .chain_update(b"1.x")
                    .finalize()
                    .into_bytes()
            )
        );
    }

    #[test]
    fn payment_intent_events_carry_our_key_and_outcome() {
        let ok = parse(br#"{"id":"evt_1","type":"payment_intent.succeeded","data":{"object":{"id":"pi_1","metadata":{"billing_key":"pur_1"}}}}"#).unwrap();
        assert_eq!(
            ok.payment,
            Some(PaymentUpdate {
                payment_intent: "pi_1".into(),
                billing_key: Some("pur_1".into()),
                status: ChargeStatus::Succeeded
            })
        );
        let failed = parse(br#"{"id":"evt_2","type":"payment_intent.payment_failed","data":{"object":{"id":"pi_1","metadata":{},"last_payment_error":{"code":"card_declined","decline_code":"insufficient_funds"}}}}"#).unwrap();
        let update = failed.payment.unwrap();
        assert_eq!(update.billing_key, None);
        assert_eq!(
            update.status,
            ChargeStatus::Declined(DeclineReason::InsufficientFunds)
        );
        let other =
            parse(br#"{"id":"evt_3","type":"customer.created","data":{"object":{"id":"cus_1"}}}"#)
                .unwrap();
        assert_eq!(
            (other.kind.as_str(), other.payment),
            ("customer.created", None)
        );
        assert_eq!(parse(b"not json"), None);
    }

    #[test]
    fn a_dispute_closed_in_our_favour_reinstates_and_a_lost_one_does_not() {
        let closed = |status: &str| {
            parse(format!(r#"{{"id":"evt_7","type":"charge.dispute.closed","data":{{"object":{{"id":"dp_1","object":"dispute","charge":"ch_1","payment_intent":"pi_1","amount":42000,"status":"{status}"}}}}}}"#).as_bytes()).unwrap()
        };
        for status in ["won", "warning_closed"] {
            let event = closed(status);
            assert_eq!(
                event.reinstatement,
                Some(Reinstatement {
                    payment_intent: Some("pi_1".into()),
                    amount: 42_000
                }),
                "{status}"
            );
            assert_eq!((event.reversal, event.payment), (None, None));
            assert!(event.reinstatement.unwrap().is_whole(42_000));
        }
        assert_eq!(closed("lost").reinstatement, None);
        // Only a closed dispute reinstates: a new one with the same status text does not.
        let created = parse(br#"{"id":"evt_8","type":"charge.dispute.created","data":{"object":{"id":"dp_1","payment_intent":"pi_1","amount":42000,"status":"won"}}}"#).unwrap();
        assert_eq!(created.reinstatement, None);
    }

    #[test]
    fn refunds_and_disputes_name_the_payment_intent_and_the_amount_taken_back() {
        let refund = parse(br#"{"id":"evt_4","type":"charge.refunded","data":{"object":{"id":"ch_1","object":"charge","payment_intent":"pi_1","amount":42000,"amount_refunded":10000,"refunded":false}}}"#).unwrap();
        assert_eq!(refund.payment, None);
        assert_eq!(
            refund.reversal,
            Some(Reversal {
                kind: ReversalKind::Refunded,
                payment_intent: Some("pi_1".into()),
                amount: 10_000,
                complete: false
            })
        );
        let dispute = parse(br#"{"id":"evt_5","type":"charge.dispute.created","data":{"object":{"id":"dp_1","object":"dispute","charge":"ch_1","payment_intent":"pi_1","amount":42000,"status":"needs_response"}}}"#).unwrap();
        assert_eq!(
            dispute.reversal,
            Some(Reversal {
                kind: ReversalKind::Disputed,
                payment_intent: Some("pi_1".into()),
                amount: 42_000,
                complete: false
            })
        );
        let bare = parse(br#"{"id":"evt_6","type":"charge.refunded","data":{"object":{"id":"ch_2","payment_intent":null,"amount":100,"amount_refunded":100,"refunded":true}}}"#).unwrap();
        let bare = bare.reversal.unwrap();
        assert_eq!((bare.payment_intent, bare.complete), (None, true));
        let other =
            parse(br#"{"id":"evt_7","type":"charge.succeeded","data":{"object":{"id":"ch_3"}}}"#)
                .unwrap();
        assert_eq!(other.reversal, None);
    }
}
