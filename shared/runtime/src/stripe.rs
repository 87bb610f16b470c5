//! The Stripe adapter: [`StripeGateway`] implements [`PaymentGateway`] with PaymentIntents over
//! Stripe's HTTP API (reqwest with rustls; form-encoded requests, JSON answers).
//!
//! - A charge is one PaymentIntent created and confirmed off-session (`confirm=true`,
//!   `off_session=true`) with the customer and its saved payment method, both named by the
//!   payment-method token `cus_...:pm_...` ([`parse_method`]). The amount is the `Money`'s
//!   minor units, the currency its ISO code in lower case.
//! - Our idempotency key goes to Stripe twice: derived into the `Idempotency-Key` header
//!   ([`idempotency_header`]), so a retry after a timeout gets the first PaymentIntent back
//!   instead of a second charge, and as the PaymentIntent's metadata `billing_key`, so the
//!   charge can be found by our key ([`PaymentGateway::charge_status`]) with Stripe's search.
//! - Answers: `succeeded` is [`ChargeOutcome::Succeeded`]; `processing` (a SEPA direct debit)
//!   is [`ChargeOutcome::Pending`], polled later by the services' reconcilers through
//!   `charge_status`; a decline (HTTP 402, or a PaymentIntent that needs a new payment method or
//!   an authentication) is [`ChargeOutcome::Declined`] with its reason. A network error, a
//!   timeout, HTTP 409 (a request under the same key still in progress), 429 or 5xx, or an
//!   answer that cannot be read leave the outcome unknown:
//!   [`GatewayError::Timeout`], reconciled with the same key. Anything else Stripe refuses
//!   (bad key, malformed request) is [`GatewayError::Refused`] and charged nothing.
//! - Stripe honours `Idempotency-Key` for 24 hours. For a key whose earlier attempt timed out in
//!   this process, a retry first searches for the PaymentIntent by its metadata, so even a
//!   retry after 24 hours does not charge twice when the search finds it (Stripe's search index
//!   lags by up to a minute, which the 24 hours cover).
//! - The PaymentIntent ids of direct debits still `processing` are kept in memory (one entry
//!   per open debit, dropped once it settles), so polling them is one `GET` by id; after a
//!   restart the search finds them.
//! - A refund or dispute webhook names only the PaymentIntent: [`PaymentGateway::key_of_charge`]
//!   retrieves it by id for its `billing_key`.
//!
//! The secret key is sent only as the bearer token and never logged; [`Secret`]'s `Debug`
//! output is `<redacted>`.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use async_trait::async_trait;
use chrono::DateTime;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use shared::{
    ChargeOutcome, ChargeRecord, ChargeRequest, ChargeStatus, Currency, DeclineReason,
    GatewayError, Money, PaymentGateway,
};

/// Stripe's public API.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";
/// How long one call to Stripe may take before its outcome counts as unknown. Below the
/// services' default request deadline (10 s), so a purchase answers before its caller gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(8);
/// The PaymentIntent metadata entry that holds our idempotency key.
pub const METADATA_KEY: &str = "billing_key";
/// Longest Stripe object id accepted in a payment-method token.
const MAX_STRIPE_ID_LEN: usize = 255;

/// A secret setting (an API key, a webhook signing secret): its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How to reach Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeSettings {
    /// `https://api.stripe.com`, or a local Stripe (localstripe) in tests.
    pub api_base: String,
    /// The secret API key (`sk_live_...`, `sk_test_...`).
    pub secret_key: Secret,
    /// Per-call time limit ([`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// The signing secret of the webhook endpoint (`whsec_...`); `None`: no endpoint, outcomes
    /// are polled only.
    pub webhook_secret: Option<Secret>,
}

/// A saved Stripe payment method as the services store it: the token `cus_...:pm_...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripeMethod<'a> {
    /// The Stripe customer the payment method is attached to.
    pub customer: &'a str,
    /// The payment method (a card or a SEPA debit mandate).
    pub payment_method: &'a str,
}

fn stripe_id(id: &str, prefix: &str) -> bool {
    id.len() > prefix.len()
        && id.len() <= MAX_STRIPE_ID_LEN
        && id.starts_with(prefix)
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Reads a payment-method token `cus_<id>:pm_<id>`; `None` if it is not one. Stripe needs the
/// customer with the method for an off-session charge, and the token keeps both in the
/// services' existing `payment_method` fields.
pub fn parse_method(token: &str) -> Option<StripeMethod<'_>> {
    let (customer, payment_method) = token.split_once(':')?;
    (stripe_id(customer, "cus_") && stripe_id(payment_method, "pm_")).then_some(StripeMethod {
        customer,
        payment_method,
    })
}

/// The `Idempotency-Key` header for our key: `billing-suite-` and the key's SHA-256 in hex, so
/// any key (up to Stripe's 255 characters or not, any characters) maps to one fixed-size header.
pub fn idempotency_header(key: &str) -> String {
    format!("billing-suite-{:x}", Sha256::digest(key.as_bytes()))
}

/// Stripe's search-query string literal for `value` (quotes and backslashes escaped).
fn search_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A PaymentIntent, as far as the adapter reads it.
#[derive(Debug, Clone, Deserialize)]
struct PaymentIntent {
    id: String,
    status: String,
    amount: i64,
    currency: String,
    created: i64,
    #[serde(default)]
    customer: Option<serde_json::Value>,
    #[serde(default)]
    payment_method: Option<serde_json::Value>,
    #[serde(default)]
    metadata: HashMap<String, String>,
    #[serde(default)]
    last_payment_error: Option<StripeError>,
}

/// An id field that Stripe answers as a string, or as the object when expanded.
fn id_of(value: Option<&serde_json::Value>) -> Option<&str> {
    match value? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("id")?.as_str(),
        _ => None,
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct StripeError {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: StripeError,
}

#[derive(Debug, Deserialize)]
struct SearchResult {
    data: Vec<PaymentIntent>,
}

/// Stripe's decline and error codes onto ours.
fn decline_reason(e: &StripeError) -> DeclineReason {
    let codes = [e.code.as_deref(), e.decline_code.as_deref()];
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
    }
}

/// The answer to a charge, from the PaymentIntent it created.
fn outcome_of(pi: &PaymentIntent) -> Result<ChargeOutcome, GatewayError> {
    match pi.status.as_str() {
        "succeeded" => Ok(ChargeOutcome::Succeeded {
            charge_id: pi.id.clone(),
        }),
        "processing" => Ok(ChargeOutcome::Pending {
            charge_id: pi.id.clone(),
        }),
        "requires_action" => Ok(ChargeOutcome::Declined {
            reason: DeclineReason::AuthenticationRequired,
        }),
        "requires_payment_method" | "canceled" => Ok(ChargeOutcome::Declined {
            reason: pi
                .last_payment_error
                .as_ref()
                .map_or(DeclineReason::Declined, decline_reason),
        }),
        other => Err(GatewayError::Refused(format!(
            "PaymentIntent {} is `{other}`, which a confirmed automatic charge is never left in",
            pi.id
        ))),
    }
}

/// What Stripe knows about the PaymentIntent of `key`. `was_pending`: it was a direct debit
/// answered `processing`, so a failure now is a returned debit.
fn record_of(
    pi: &PaymentIntent,
    key: &str,
    was_pending: bool,
) -> Result<ChargeRecord, GatewayError> {
    let status = match pi.status.as_str() {
        "succeeded" => ChargeStatus::Succeeded,
        "requires_action" => ChargeStatus::Declined(DeclineReason::AuthenticationRequired),
        "requires_payment_method" | "canceled" if was_pending => ChargeStatus::Returned,
        "requires_payment_method" | "canceled" => ChargeStatus::Declined(
            pi.last_payment_error
                .as_ref()
                .map_or(DeclineReason::Declined, decline_reason),
        ),
        // `processing`, and the states of a PaymentIntent not confirmed yet: no final outcome.
        _ => ChargeStatus::Pending,
    };
    let currency: Currency = pi.currency.to_ascii_uppercase().parse().map_err(|_| {
        GatewayError::Refused(format!(
            "PaymentIntent {} is in currency {:?}, which the suite does not use",
            pi.id, pi.currency
        ))
    })?;
    let payment_method = match (
        id_of(pi.customer.as_ref()),
        id_of(pi.payment_method.as_ref()),
    ) {
        (Some(c), Some(p)) => format!("{c}:{p}"),
        (None, Some(p)) => p.to_string(),
        _ => String::new(),
    };
    Ok(ChargeRecord {
        charge_id: pi.id.clone(),
        idempotency_key: key.to_string(),
        payment_method,
        amount: Money::from_minor_units(pi.amount, currency),
        status,
        created_at: DateTime::from_timestamp(pi.created, 0).unwrap_or_default(),
    })
}

/// A charge request's parts once checked.
struct Checked<'a> {
    minor_units: i64,
    method: StripeMethod<'a>,
}

fn check(request: &ChargeRequest) -> Result<Checked<'_>, GatewayError> {
    if request.idempotency_key.is_empty() {
        return Err(GatewayError::MissingIdempotencyKey);
    }
    if !request.amount.is_positive() {
        return Err(GatewayError::InvalidAmount(format!(
            "{} is not positive",
            request.amount
        )));
    }
    // Stripe charges whole minor units (zero-decimal currencies such as JPY included, as in
    // `Currency`); rounding is the caller's job.
    let minor_units = request
        .amount
        .to_minor_units()
        .map_err(|e| GatewayError::InvalidAmount(e.to_string()))?;
    let method = parse_method(&request.payment_method)
        .ok_or_else(|| GatewayError::UnknownPaymentMethod(request.payment_method.clone()))?;
    Ok(Checked {
        minor_units,
        method,
    })
}

/// Payments through Stripe (see the module docs).
pub struct StripeGateway {
    http: reqwest::Client,
    api_base: String,
    secret_key: Secret,
    /// Our key → PaymentIntent id, for direct debits answered `processing` and not final yet.
    pending: Mutex<HashMap<String, String>>,
    /// Keys whose last attempt ended with an unknown outcome in this process.
    uncertain: Mutex<HashSet<String>>,
}

impl fmt::Debug for StripeGateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeGateway")
            .field("api_base", &self.api_base)
            .field("secret_key", &self.secret_key)
            .finish_non_exhaustive()
    }
}

/// What one HTTP exchange with Stripe came to.
enum Answer {
    /// 2xx with its body.
    Ok(Vec<u8>),
    /// 4xx other than 429, with Stripe's error.
    Refused(reqwest::StatusCode, StripeError),
    /// No usable answer: network error, timeout, 429 or 5xx.
    Unknown(String),
}

impl StripeGateway {
    /// A gateway talking to `settings.api_base`.
    pub fn new(settings: &StripeSettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("billing-suite/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(StripeGateway {
            http,
            api_base: settings.api_base.trim_end_matches('/').to_string(),
            secret_key: settings.secret_key.clone(),
            pending: Mutex::new(HashMap::new()),
            uncertain: Mutex::new(HashSet::new()),
        })
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<String, String>> {
        // Plain maps, never left half-updated: recover the guard rather than panic.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn uncertain(&self) -> MutexGuard<'_, HashSet<String>> {
        self.uncertain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn exchange(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = match request.bearer_auth(self.secret_key.expose()).send().await {
            Ok(r) => r,
            Err(e) => return Answer::Unknown(e.without_url().to_string()),
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => return Answer::Unknown(e.without_url().to_string()),
        };
        if status.is_success() {
            return Answer::Ok(body);
        }
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Answer::Unknown(format!("Stripe answered HTTP {status}"));
        }
        let error = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.error)
            .unwrap_or_default();
        Answer::Refused(status, error)
    }

    /// The PaymentIntent `id`.
    async fn retrieve(&self, id: &str) -> Result<Option<PaymentIntent>, GatewayError> {
        let url = format!("{}/v1/payment_intents/{id}", self.api_base);
        match self.exchange(self.http.get(url)).await {
            Answer::Ok(body) => serde_json::from_slice(&body).map(Some).map_err(|e| {
                tracing::warn!(payment_intent = %id, error = %e, "unreadable PaymentIntent from Stripe");
                GatewayError::Timeout
            }),
            Answer::Refused(reqwest::StatusCode::NOT_FOUND, _) => Ok(None),
            Answer::Refused(status, e) => Err(refused(status, &e)),
            Answer::Unknown(why) => {
                tracing::warn!(payment_intent = %id, error = %why, "retrieving a PaymentIntent failed");
                Err(GatewayError::Timeout)
            }
        }
    }

    /// The PaymentIntent whose metadata holds `key`, by Stripe's search.
    async fn find(&self, key: &str) -> Result<Option<PaymentIntent>, GatewayError> {
        let url = format!("{}/v1/payment_intents/search", self.api_base);
        let query = format!("metadata['{METADATA_KEY}']:{}", search_literal(key));
        let request = self
            .http
            .get(url)
            .query(&[("query", query.as_str()), ("limit", "1")]);
        match self.exchange(request).await {
            Answer::Ok(body) => serde_json::from_slice::<SearchResult>(&body)
                .map(|r| {
                    r.data
                        .into_iter()
                        .find(|pi| pi.metadata.get(METADATA_KEY).map(String::as_str) == Some(key))
                })
                .map_err(|e| {
                    tracing::warn!(key = %key, error = %e, "unreadable search answer from Stripe");
                    GatewayError::Timeout
                }),
            Answer::Refused(status, e) => Err(refused(status, &e)),
            Answer::Unknown(why) => {
                tracing::warn!(key = %key, error = %why, "searching a PaymentIntent failed");
                Err(GatewayError::Timeout)
            }
        }
    }

    /// Settles what an answer means for `key`'s bookkeeping and returns it.
    fn answered(
        &self,
        key: &str,
        outcome: Result<ChargeOutcome, GatewayError>,
    ) -> Result<ChargeOutcome, GatewayError> {
        match &outcome {
            Err(GatewayError::Timeout) => {
                self.uncertain().insert(key.to_string());
            }
            Ok(ChargeOutcome::Pending { charge_id }) => {
                self.uncertain().remove(key);
                self.pending().insert(key.to_string(), charge_id.clone());
            }
            _ => {
                self.uncertain().remove(key);
            }
        }
        outcome
    }

    async fn create(
        &self,
        request: &ChargeRequest,
        checked: &Checked<'_>,
    ) -> Result<ChargeOutcome, GatewayError> {
        let key = request.idempotency_key.as_str();
        let currency = request.amount.currency().code().to_ascii_lowercase();
        let minor_units = checked.minor_units.to_string();
        // `description` would be Stripe's own field; localstripe refuses it, so it travels as
        // metadata (shown in Stripe's dashboard all the same).
        let description: String = request.description.chars().take(500).collect();
        let form = [
            ("amount", minor_units.as_str()),
            ("currency", currency.as_str()),
            ("customer", checked.method.customer),
            ("payment_method", checked.method.payment_method),
            ("confirm", "true"),
            ("off_session", "true"),
            ("payment_method_types[]", "card"),
            ("payment_method_types[]", "sepa_debit"),
            ("metadata[billing_key]", key),
            ("metadata[description]", description.as_str()),
        ];
        let url = format!("{}/v1/payment_intents", self.api_base);
        let sent = self
            .http
            .post(url)
            .header("Idempotency-Key", idempotency_header(key))
            .form(&form);
        match self.exchange(sent).await {
            Answer::Ok(body) => match serde_json::from_slice::<PaymentIntent>(&body) {
                Ok(pi) => outcome_of(&pi),
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "unreadable PaymentIntent from Stripe; outcome unknown");
                    Err(GatewayError::Timeout)
                }
            },
            // 409: another request with this key is still in progress at Stripe (a reconciler
            // racing the request that made the charge). Nothing is known yet: it is not a
            // refusal, and the next attempt gets the first request's answer.
            Answer::Refused(reqwest::StatusCode::CONFLICT, _) => {
                tracing::warn!(key = %key, "Stripe is still processing another request with this key; outcome unknown, will reconcile");
                Err(GatewayError::Timeout)
            }
            Answer::Refused(status, e) if e.kind.as_deref() == Some("idempotency_error") => {
                tracing::warn!(key = %key, %status, "Stripe refused a retry that differs from the first request");
                Err(GatewayError::MismatchedRetry)
            }
            // 402: the card (or debit) was declined; the PaymentIntent stays unpaid.
            Answer::Refused(reqwest::StatusCode::PAYMENT_REQUIRED, e) => {
                Ok(ChargeOutcome::Declined {
                    reason: decline_reason(&e),
                })
            }
            Answer::Refused(status, e)
                if status == reqwest::StatusCode::NOT_FOUND
                    || e.code.as_deref() == Some("resource_missing") =>
            {
                Err(GatewayError::UnknownPaymentMethod(
                    request.payment_method.clone(),
                ))
            }
            Answer::Refused(status, e) => Err(refused(status, &e)),
            Answer::Unknown(why) => {
                tracing::warn!(key = %key, error = %why, "Stripe did not answer; outcome unknown, will reconcile");
                Err(GatewayError::Timeout)
            }
        }
    }
}

fn refused(status: reqwest::StatusCode, e: &StripeError) -> GatewayError {
    GatewayError::Refused(format!(
        "HTTP {}: {}",
        status.as_u16(),
        e.message.as_deref().unwrap_or("no message")
    ))
}

#[async_trait]
impl PaymentGateway for StripeGateway {
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, GatewayError> {
        let checked = check(request)?;
        let key = request.idempotency_key.as_str();
        if self.uncertain().contains(key) {
            // An earlier attempt's outcome is unknown: if Stripe has its PaymentIntent, that is
            // the answer (a search failure falls through to the create, which the
            // Idempotency-Key still guards for 24 hours).
            if let Ok(Some(pi)) = self.find(key).await {
                if pi.amount != checked.minor_units
                    || id_of(pi.payment_method.as_ref()) != Some(checked.method.payment_method)
                {
                    return Err(GatewayError::MismatchedRetry);
                }
                let outcome = outcome_of(&pi);
                return self.answered(key, outcome);
            }
        }
        let outcome = self.create(request, &checked).await;
        self.answered(key, outcome)
    }

    async fn charge_status(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<ChargeRecord>, GatewayError> {
        let known = self.pending().get(idempotency_key).cloned();
        let pi = match &known {
            Some(id) => self.retrieve(id).await?,
            None => self.find(idempotency_key).await?,
        };
        let Some(pi) = pi else {
            return Ok(None);
        };
        let record = record_of(&pi, idempotency_key, known.is_some())?;
        if record.status != ChargeStatus::Pending {
            self.pending().remove(idempotency_key);
        }
        Ok(Some(record))
    }

    /// Retrieves the PaymentIntent `charge_id` (`GET /v1/payment_intents/{id}`) and answers its
    /// metadata `billing_key`. A refund's Charge or a dispute names the PaymentIntent but does
    /// not carry its metadata, so this is how such an event finds our purchase.
    async fn key_of_charge(&self, charge_id: &str) -> Result<Option<String>, GatewayError> {
        // The id goes into the URL's path: anything but a PaymentIntent id is none of ours.
        if !stripe_id(charge_id, "pi_") {
            return Ok(None);
        }
        Ok(self
            .retrieve(charge_id)
            .await?
            .and_then(|mut pi| pi.metadata.remove(METADATA_KEY)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_a_customer_and_a_payment_method() {
        assert_eq!(
            parse_method("cus_A1b2:pm_1Nx_card"),
            Some(StripeMethod {
                customer: "cus_A1b2",
                payment_method: "pm_1Nx_card"
            })
        );
        for bad in [
            "pm_card_ok",
            "cus_:pm_x",
            "cus_x:pm_",
            "pm_x:cus_x",
            "cus_x:pm_x:extra",
            "cus_x pm_x",
            "cus_x:pm_x\n",
            "",
        ] {
            assert_eq!(parse_method(bad), None, "{bad:?}");
        }
        let long = format!("cus_x:pm_{}", "a".repeat(MAX_STRIPE_ID_LEN));
        assert_eq!(parse_method(&long), None);
    }

    #[test]
    fn the_idempotency_header_is_derived_from_the_key_alone() {
        let a = idempotency_header("pur_0191");
        assert_eq!(a, idempotency_header("pur_0191"));
        assert_ne!(a, idempotency_header("pur_0192"));
        assert!(a.starts_with("billing-suite-"));
        assert_eq!(a.len(), "billing-suite-".len() + 64);
        assert!(idempotency_header(&"k".repeat(10_000)).len() < 255);
    }

    #[test]
    fn search_literals_escape_quotes() {
        assert_eq!(search_literal("a'b\\c"), r"'a\'b\\c'");
    }

    fn pi(status: &str, error: Option<(&str, Option<&str>)>) -> PaymentIntent {
        PaymentIntent {
            id: "pi_1".into(),
            status: status.into(),
            amount: 42_000,
            currency: "eur".into(),
            created: 1_767_225_600,
            customer: Some(serde_json::json!("cus_1")),
            payment_method: Some(serde_json::json!({"id": "pm_1", "type": "card"})),
            metadata: HashMap::from([(METADATA_KEY.to_string(), "k".to_string())]),
            last_payment_error: error.map(|(code, decline)| StripeError {
                kind: Some("card_error".into()),
                code: Some(code.into()),
                decline_code: decline.map(str::to_string),
                message: None,
            }),
        }
    }

    #[test]
    fn stripe_answers_map_onto_outcomes() {
        assert_eq!(
            outcome_of(&pi("succeeded", None)),
            Ok(ChargeOutcome::Succeeded {
                charge_id: "pi_1".into()
            })
        );
        assert_eq!(
            outcome_of(&pi("processing", None)),
            Ok(ChargeOutcome::Pending {
                charge_id: "pi_1".into()
            })
        );
        let declined = |reason| Ok(ChargeOutcome::Declined { reason });
        assert_eq!(
            outcome_of(&pi(
                "requires_payment_method",
                Some(("card_declined", Some("insufficient_funds")))
            )),
            declined(DeclineReason::InsufficientFunds)
        );
        assert_eq!(
            outcome_of(&pi(
                "requires_payment_method",
                Some(("card_declined", Some("generic_decline")))
            )),
            declined(DeclineReason::Declined)
        );
        assert_eq!(
            outcome_of(&pi(
                "requires_payment_method",
                Some(("authentication_required", None))
            )),
            declined(DeclineReason::AuthenticationRequired)
        );
        assert_eq!(
            outcome_of(&pi("requires_action", None)),
            declined(DeclineReason::AuthenticationRequired)
        );
        assert!(matches!(
            outcome_of(&pi("requires_capture", None)),
            Err(GatewayError::Refused(_))
        ));
    }

    #[test]
    fn records_read_amount_method_and_a_returned_debit() {
        let r = record_of(&pi("succeeded", None), "k", false).unwrap();
        assert_eq!(r.amount, Money::from_minor_units(42_000, Currency::EUR));
        assert_eq!(r.payment_method, "cus_1:pm_1");
        assert_eq!(r.status, ChargeStatus::Succeeded);
        let failed = pi("requires_payment_method", Some(("card_declined", None)));
        assert_eq!(
            record_of(&failed, "k", true).unwrap().status,
            ChargeStatus::Returned
        );
        assert_eq!(
            record_of(&failed, "k", false).unwrap().status,
            ChargeStatus::Declined(DeclineReason::Declined)
        );
        assert_eq!(
            record_of(&pi("processing", None), "k", true)
                .unwrap()
                .status,
            ChargeStatus::Pending
        );
        let mut odd = pi("succeeded", None);
        odd.currency = "xyz".into();
        assert!(record_of(&odd, "k", false).is_err());
    }

    #[test]
    fn the_secret_key_never_shows_in_debug_output() {
        let settings = StripeSettings {
            api_base: DEFAULT_API_BASE.into(),
            secret_key: Secret::new("sk_live_very_secret"),
            timeout: DEFAULT_TIMEOUT,
            webhook_secret: Some(Secret::new("whsec_very_secret")),
        };
        let gateway = StripeGateway::new(&settings).unwrap();
        for text in [format!("{settings:?}"), format!("{gateway:?}")] {
            assert!(!text.contains("very_secret"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
    }
}
