//! The payment-gateway port and a deterministic simulator.
//!
//! Services talk to payment providers only through [`PaymentGateway`]. The
//! [`SimulatedGateway`] stands in for a provider in tests and in the embedded
//! default; real providers plug in behind the same trait. It never reads the
//! system clock (the request carries `requested_at`), so tests are repeatable.
//!
//! Its behaviour is fixed by the payment-method token:
//!
//! | token | behaviour |
//! |---|---|
//! | [`PM_CARD_OK`] `pm_card_ok` | succeeds |
//! | [`PM_CARD_DECLINED`] `pm_card_declined` | declined ([`DeclineReason::Declined`]) |
//! | [`PM_CARD_INSUFFICIENT_FUNDS`] `pm_card_insufficient_funds` | declined ([`DeclineReason::InsufficientFunds`]) |
//! | [`PM_CARD_TIMEOUT`] `pm_card_timeout` | money is captured, but the first call per idempotency key returns [`GatewayError::Timeout`]; a retry with the same key or [`PaymentGateway::charge_status`] reports success |
//! | [`PM_SEPA_OK`] `pm_sepa_ok` | direct debit: `Pending`, settles to `Succeeded` via [`SimulatedGateway::settle_due`] |
//! | [`PM_SEPA_RETURNED`] `pm_sepa_returned` | direct debit: `Pending`, then `Returned` via [`SimulatedGateway::settle_due`] |
//!
//! Any other token is [`GatewayError::UnknownPaymentMethod`].

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::currency::Currency;
use crate::money::Money;

/// Card that always succeeds.
pub const PM_CARD_OK: &str = "pm_card_ok";
/// Card that is always declined.
pub const PM_CARD_DECLINED: &str = "pm_card_declined";
/// Card declined for insufficient funds.
pub const PM_CARD_INSUFFICIENT_FUNDS: &str = "pm_card_insufficient_funds";
/// Card whose first attempt per key times out after capturing the money.
pub const PM_CARD_TIMEOUT: &str = "pm_card_timeout";
/// SEPA direct debit that settles successfully.
pub const PM_SEPA_OK: &str = "pm_sepa_ok";
/// SEPA direct debit that is returned (clawed back) at settlement.
pub const PM_SEPA_RETURNED: &str = "pm_sepa_returned";

const KNOWN_METHODS: [&str; 6] = [
    PM_CARD_OK,
    PM_CARD_DECLINED,
    PM_CARD_INSUFFICIENT_FUNDS,
    PM_CARD_TIMEOUT,
    PM_SEPA_OK,
    PM_SEPA_RETURNED,
];

/// Default time from a direct-debit request to its settlement.
pub const DEFAULT_SETTLEMENT_DELAY_DAYS: i64 = 3;

/// True if the simulator knows `token`.
pub fn is_known_payment_method(token: &str) -> bool {
    KNOWN_METHODS.contains(&token)
}

/// True if `token` is a direct debit (settles later, may be returned).
pub fn is_direct_debit(token: &str) -> bool {
    token == PM_SEPA_OK || token == PM_SEPA_RETURNED
}

/// A request to charge a payment method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRequest {
    /// Forwarded to the provider; a retry with the same key never charges twice.
    pub idempotency_key: String,
    /// Provider token of the payment method.
    pub payment_method: String,
    /// Amount to charge; positive and already rounded to the minor unit.
    pub amount: Money,
    /// Statement description.
    pub description: String,
    /// When the caller made the request (from its clock, never the system clock).
    pub requested_at: DateTime<Utc>,
}

/// Why a charge was declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineReason {
    /// Generic decline by the issuer.
    Declined,
    /// Not enough funds on the account.
    InsufficientFunds,
    /// The issuer asks the customer to authenticate (3-D Secure), which an off-session charge
    /// cannot do: the customer must pay once on-session or save another method.
    AuthenticationRequired,
}

impl fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeclineReason::Declined => "the card was declined",
            DeclineReason::InsufficientFunds => "insufficient funds",
            DeclineReason::AuthenticationRequired => {
                "the card requires the customer to authenticate the payment"
            }
        })
    }
}

/// The immediate result of a charge attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChargeOutcome {
    /// Money captured.
    Succeeded {
        /// Provider charge id.
        charge_id: String,
    },
    /// Direct debit accepted; settles (or is returned) later.
    Pending {
        /// Provider charge id.
        charge_id: String,
    },
    /// The provider refused the charge.
    Declined {
        /// Why.
        reason: DeclineReason,
    },
}

/// Status of a charge as the provider records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChargeStatus {
    /// Money captured.
    Succeeded,
    /// Direct debit not settled yet.
    Pending,
    /// Direct debit returned by the bank after being pending.
    Returned,
    /// Refused.
    Declined(DeclineReason),
}

/// What the provider knows about one charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRecord {
    /// Provider charge id (`ch_sim_<n>` in the simulator).
    pub charge_id: String,
    /// The caller's idempotency key.
    pub idempotency_key: String,
    /// Payment-method token.
    pub payment_method: String,
    /// Amount charged.
    pub amount: Money,
    /// Current status.
    pub status: ChargeStatus,
    /// `requested_at` of the first request with this key.
    pub created_at: DateTime<Utc>,
}

/// Errors of a gateway call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// No answer in time: the charge may or may not have happened. Reconcile
    /// with `charge_status` or retry with the same key; never use a new key.
    #[error("payment provider timed out; the outcome is unknown")]
    Timeout,
    /// The payment-method token is not known to the provider.
    #[error("unknown payment method `{0}`")]
    UnknownPaymentMethod(String),
    /// The amount cannot be charged.
    #[error("invalid charge amount: {0}")]
    InvalidAmount(String),
    /// The idempotency key is empty.
    #[error("a charge needs a non-empty idempotency key")]
    MissingIdempotencyKey,
    /// Same idempotency key as an earlier charge but a different amount or method.
    #[error("idempotency key reused with a different amount or payment method")]
    MismatchedRetry,
    /// The provider refused the request itself (bad credentials, a malformed request): nothing
    /// was charged. The message is the provider's, without secrets.
    #[error("the payment provider refused the request: {0}")]
    Refused(String),
}

/// A payment provider.
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    /// Charges `amount` to `payment_method`. `idempotency_key` is forwarded to
    /// the provider: a retry with the same key never charges twice and
    /// returns the first outcome.
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, GatewayError>;

    /// Looks up what happened to an earlier charge (reconciliation after a
    /// timeout, or settlement of a direct debit).
    async fn charge_status(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<ChargeRecord>, GatewayError>;

    /// The idempotency key a charge was made with, from the id the provider gave it (a Stripe
    /// PaymentIntent's `pi_...`): how a later notice about the charge (a refund, a dispute)
    /// finds the purchase it is about. `Ok(None)`: the provider has no such charge, or it
    /// carries no key of ours. Providers that send no such notices keep this default.
    async fn key_of_charge(&self, _charge_id: &str) -> Result<Option<String>, GatewayError> {
        Ok(None)
    }
}

/// One charge as the simulator keeps it, in 40 bytes: its key's digest ([`KeyDigest`]), the
/// amount in minor units and its currency, the method as its position among the known tokens,
/// the first and the current status, and the request's instant in microseconds. The charge id
/// and the outcome replayed to retries follow from the position and the first status. So a
/// renewal run's hundreds of thousands of charges stay small (about 50 bytes each with the
/// index).
#[derive(Debug)]
struct Kept {
    key: KeyDigest,
    minor_units: i64,
    created_at_us: i64,
    currency: Currency,
    method: u8,
    first: ChargeStatus,
    status: ChargeStatus,
}

impl Kept {
    fn charge_id(index: usize) -> String {
        format!("ch_sim_{}", index + 1)
    }

    fn method(&self) -> &'static str {
        KNOWN_METHODS[usize::from(self.method)]
    }

    fn amount(&self) -> Money {
        Money::from_minor_units(self.minor_units, self.currency)
    }

    fn created_at(&self) -> DateTime<Utc> {
        // Made from a `DateTime`, so always in range.
        DateTime::from_timestamp_micros(self.created_at_us).unwrap_or_default()
    }

    fn record(&self, index: usize, key: &str) -> ChargeRecord {
        ChargeRecord {
            charge_id: Kept::charge_id(index),
            idempotency_key: key.to_string(),
            payment_method: self.method().to_string(),
            amount: self.amount(),
            status: self.status,
            created_at: self.created_at(),
        }
    }

    /// The answer to the first request, which retries replay.
    fn outcome(&self, index: usize) -> ChargeOutcome {
        match self.first {
            ChargeStatus::Declined(reason) => ChargeOutcome::Declined { reason },
            ChargeStatus::Pending | ChargeStatus::Returned => ChargeOutcome::Pending {
                charge_id: Kept::charge_id(index),
            },
            ChargeStatus::Succeeded => ChargeOutcome::Succeeded {
                charge_id: Kept::charge_id(index),
            },
        }
    }
}

/// An idempotency key as the simulator keeps it: the first 16 bytes of its SHA-256. Two keys
/// share a digest with a chance of about 2^-65 at four billion charges, and every caller of a
/// charge holds its key, so the simulator need not keep the text (a key is 40 to 60 bytes, 64
/// to 80 on the heap, where the digest is 16 inline).
type KeyDigest = [u8; 16];

fn digest(key: &str) -> KeyDigest {
    let hash = Sha256::digest(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash[..16]);
    out
}

/// The index's hash of a digest: its first eight bytes (already uniform).
fn hash_of(key: &KeyDigest) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&key[..8]);
    u64::from_le_bytes(first)
}

#[derive(Debug, Default)]
struct State {
    /// Charges in creation order, so settlement is deterministic.
    kept: Vec<Kept>,
    /// Each charge's position, found by its key's digest (kept in the charge, so the index
    /// holds positions alone: 9 bytes a slot).
    by_key: HashTable<usize>,
    /// The direct debits not settled yet (position and key, which settlement reports), in
    /// creation order: settlement looks at these alone, not at every charge ever made.
    pending: Vec<(usize, Box<str>)>,
}

impl State {
    fn position(&self, key: &KeyDigest) -> Option<(usize, &Kept)> {
        let kept = &self.kept;
        let &index = self.by_key.find(hash_of(key), |&i| {
            kept.get(i).is_some_and(|k| k.key == *key)
        })?;
        Some((index, kept.get(index)?))
    }

    /// Appends a charge whose key is not indexed yet.
    fn push(&mut self, charge: Kept) {
        let index = self.kept.len();
        let kept = &self.kept;
        self.by_key
            .insert_unique(hash_of(&charge.key), index, |&i| {
                kept.get(i).map_or(0, |k| hash_of(&k.key))
            });
        self.kept.push(charge);
    }
}

/// Deterministic in-memory provider (see the module docs for the tokens).
#[derive(Debug)]
pub struct SimulatedGateway {
    // A mutex is fine here: the simulator stands in for an external service
    // and every critical section is a few map operations, never held across await.
    state: Mutex<State>,
    settlement_delay: Duration,
}

impl Default for SimulatedGateway {
    fn default() -> Self {
        SimulatedGateway {
            state: Mutex::new(State::default()),
            settlement_delay: Duration::days(DEFAULT_SETTLEMENT_DELAY_DAYS),
        }
    }
}

impl SimulatedGateway {
    /// A simulator with the default 3-day direct-debit settlement delay.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how long after `requested_at` a direct debit settles.
    pub fn with_settlement_delay(mut self, delay: Duration) -> Self {
        self.settlement_delay = delay;
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the maps half-updated in a way that
        // matters for a simulator, so recover the guard instead of panicking.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many charges the simulator has made (one per idempotency key).
    pub fn charge_count(&self) -> usize {
        self.state().kept.len()
    }

    /// Settles every pending direct debit requested at least the settlement
    /// delay before `now`, and returns the records whose status changed.
    pub fn settle_due(&self, now: DateTime<Utc>) -> Vec<ChargeRecord> {
        let delay = self.settlement_delay;
        let mut state = self.state();
        let State { kept, pending, .. } = &mut *state;
        let mut changed = Vec::new();
        pending.retain(|(index, key)| {
            let Some(k) = kept.get_mut(*index) else {
                return false;
            };
            let due = k
                .created_at()
                .checked_add_signed(delay)
                .is_some_and(|due| due <= now);
            if due {
                k.status = if k.method() == PM_SEPA_RETURNED {
                    ChargeStatus::Returned
                } else {
                    ChargeStatus::Succeeded
                };
                changed.push(k.record(*index, key));
            }
            !due
        });
        changed
    }

    /// The request's amount in minor units, if the request can be charged.
    fn validate(request: &ChargeRequest) -> Result<i64, GatewayError> {
        if request.idempotency_key.is_empty() {
            return Err(GatewayError::MissingIdempotencyKey);
        }
        if !request.amount.is_positive() {
            return Err(GatewayError::InvalidAmount(format!(
                "{} is not positive",
                request.amount
            )));
        }
        // Providers charge whole minor units; rounding is the caller's job.
        let minor_units = request
            .amount
            .to_minor_units()
            .map_err(|e| GatewayError::InvalidAmount(e.to_string()))?;
        if !is_known_payment_method(&request.payment_method) {
            return Err(GatewayError::UnknownPaymentMethod(
                request.payment_method.clone(),
            ));
        }
        Ok(minor_units)
    }
}

#[async_trait]
impl PaymentGateway for SimulatedGateway {
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, GatewayError> {
        let minor_units = Self::validate(request)?;
        let key = digest(&request.idempotency_key);
        let mut state = self.state();
        if let Some((index, first)) = state.position(&key) {
            if first.amount() != request.amount || first.method() != request.payment_method {
                return Err(GatewayError::MismatchedRetry);
            }
            return Ok(first.outcome(index));
        }
        let position = KNOWN_METHODS
            .iter()
            .position(|m| *m == request.payment_method)
            .ok_or_else(|| GatewayError::UnknownPaymentMethod(request.payment_method.clone()))?;
        let method = KNOWN_METHODS[position];
        let status = match method {
            PM_CARD_DECLINED => ChargeStatus::Declined(DeclineReason::Declined),
            PM_CARD_INSUFFICIENT_FUNDS => ChargeStatus::Declined(DeclineReason::InsufficientFunds),
            PM_SEPA_OK | PM_SEPA_RETURNED => ChargeStatus::Pending,
            _ => ChargeStatus::Succeeded,
        };
        let charge = Kept {
            key,
            minor_units,
            created_at_us: request.requested_at.timestamp_micros(),
            currency: request.amount.currency(),
            // Six known tokens: the position fits.
            method: u8::try_from(position).unwrap_or(u8::MAX),
            first: status,
            status,
        };
        let index = state.kept.len();
        let outcome = charge.outcome(index);
        state.push(charge);
        if status == ChargeStatus::Pending {
            state
                .pending
                .push((index, request.idempotency_key.as_str().into()));
        }
        if method == PM_CARD_TIMEOUT {
            // The money is captured, but the caller does not learn it yet.
            return Err(GatewayError::Timeout);
        }
        Ok(outcome)
    }

    async fn charge_status(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<ChargeRecord>, GatewayError> {
        let state = self.state();
        Ok(state
            .position(&digest(idempotency_key))
            .map(|(i, k)| k.record(i, idempotency_key)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::currency::Currency;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 6, 1, 12, 0, 0).unwrap()
    }

    fn req(key: &str, method: &str, cents: i64) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            payment_method: method.into(),
            amount: Money::from_minor_units(cents, Currency::EUR),
            description: "test".into(),
            requested_at: t0(),
        }
    }

    #[tokio::test]
    async fn card_ok_succeeds_once_per_key() {
        let g = SimulatedGateway::new();
        let first = g.charge(&req("k1", PM_CARD_OK, 1_000)).await.unwrap();
        assert_eq!(
            first,
            ChargeOutcome::Succeeded {
                charge_id: "ch_sim_1".into()
            }
        );
        assert_eq!(
            g.charge(&req("k1", PM_CARD_OK, 1_000)).await.unwrap(),
            first
        );
        assert_eq!(g.charge_count(), 1, "a retry never charges twice");
        let second = g.charge(&req("k2", PM_CARD_OK, 1_000)).await.unwrap();
        assert_eq!(
            second,
            ChargeOutcome::Succeeded {
                charge_id: "ch_sim_2".into()
            }
        );
    }

    #[tokio::test]
    async fn each_key_finds_its_own_charge_among_many() {
        let g = SimulatedGateway::new();
        for i in 0..2_000i64 {
            let key = format!("inv_{i}:1");
            g.charge(&req(&key, PM_CARD_OK, 100 + i)).await.unwrap();
        }
        assert_eq!(g.charge_count(), 2_000);
        for i in [0i64, 1, 999, 1_999] {
            let key = format!("inv_{i}:1");
            let record = g.charge_status(&key).await.unwrap().unwrap();
            assert_eq!(record.charge_id, format!("ch_sim_{}", i + 1));
            assert_eq!(record.idempotency_key, key);
            assert_eq!(
                record.amount,
                Money::from_minor_units(100 + i, Currency::EUR)
            );
        }
        assert_eq!(g.charge_status("inv_2000:1").await.unwrap(), None);
    }

    #[test]
    fn a_kept_charge_is_forty_bytes() {
        assert_eq!(std::mem::size_of::<Kept>(), 40);
    }

    #[tokio::test]
    async fn declines_are_recorded_and_replayed() {
        let g = SimulatedGateway::new();
        let d = g.charge(&req("k1", PM_CARD_DECLINED, 500)).await.unwrap();
        assert_eq!(
            d,
            ChargeOutcome::Declined {
                reason: DeclineReason::Declined
            }
        );
        let i = g
            .charge(&req("k2", PM_CARD_INSUFFICIENT_FUNDS, 500))
            .await
            .unwrap();
        assert_eq!(
            i,
            ChargeOutcome::Declined {
                reason: DeclineReason::InsufficientFunds
            }
        );
        assert_eq!(
            g.charge(&req("k2", PM_CARD_INSUFFICIENT_FUNDS, 500))
                .await
                .unwrap(),
            i
        );
        let status = g.charge_status("k2").await.unwrap().unwrap().status;
        assert_eq!(
            status,
            ChargeStatus::Declined(DeclineReason::InsufficientFunds)
        );
        assert_eq!(
            DeclineReason::InsufficientFunds.to_string(),
            "insufficient funds"
        );
    }

    #[tokio::test]
    async fn timeout_captures_and_must_be_reconciled() {
        let g = SimulatedGateway::new();
        assert_eq!(
            g.charge(&req("k1", PM_CARD_TIMEOUT, 700)).await,
            Err(GatewayError::Timeout)
        );
        let record = g.charge_status("k1").await.unwrap().unwrap();
        assert_eq!(record.status, ChargeStatus::Succeeded);
        assert_eq!(
            g.charge(&req("k1", PM_CARD_TIMEOUT, 700)).await.unwrap(),
            ChargeOutcome::Succeeded {
                charge_id: record.charge_id
            }
        );
        assert_eq!(g.charge_count(), 1);
    }

    #[tokio::test]
    async fn sepa_settles_or_is_returned_after_the_delay() {
        let g = SimulatedGateway::new();
        let ok = g.charge(&req("k1", PM_SEPA_OK, 900)).await.unwrap();
        assert_eq!(
            ok,
            ChargeOutcome::Pending {
                charge_id: "ch_sim_1".into()
            }
        );
        g.charge(&req("k2", PM_SEPA_RETURNED, 900)).await.unwrap();
        assert!(
            g.settle_due(t0() + Duration::days(3) - Duration::seconds(1))
                .is_empty()
        );
        let changed = g.settle_due(t0() + Duration::days(3));
        let statuses: Vec<_> = changed.iter().map(|r| r.status).collect();
        assert_eq!(
            statuses,
            vec![ChargeStatus::Succeeded, ChargeStatus::Returned]
        );
        assert!(
            g.settle_due(t0() + Duration::days(30)).is_empty(),
            "settles once"
        );
        assert_eq!(
            g.charge_status("k2").await.unwrap().unwrap().status,
            ChargeStatus::Returned
        );
        // A retry still replays the first outcome.
        assert_eq!(g.charge(&req("k1", PM_SEPA_OK, 900)).await.unwrap(), ok);
    }

    #[tokio::test]
    async fn settlement_delay_is_configurable() {
        let g = SimulatedGateway::new().with_settlement_delay(Duration::hours(1));
        g.charge(&req("k1", PM_SEPA_OK, 900)).await.unwrap();
        assert_eq!(g.settle_due(t0() + Duration::hours(1)).len(), 1);
    }

    #[tokio::test]
    async fn invalid_requests_are_rejected_without_a_record() {
        let g = SimulatedGateway::new();
        assert_eq!(
            g.charge(&req("k1", "pm_card_unknown", 100)).await,
            Err(GatewayError::UnknownPaymentMethod("pm_card_unknown".into()))
        );
        assert!(matches!(
            g.charge(&req("k1", PM_CARD_OK, 0)).await,
            Err(GatewayError::InvalidAmount(_))
        ));
        assert!(matches!(
            g.charge(&req("k1", PM_CARD_OK, -5)).await,
            Err(GatewayError::InvalidAmount(_))
        ));
        let mut unrounded = req("k1", PM_CARD_OK, 100);
        unrounded.amount = Money::parse("1.005", "EUR").unwrap();
        assert!(matches!(
            g.charge(&unrounded).await,
            Err(GatewayError::InvalidAmount(_))
        ));
        assert_eq!(
            g.charge(&req("", PM_CARD_OK, 100)).await,
            Err(GatewayError::MissingIdempotencyKey)
        );
        assert_eq!(g.charge_count(), 0);
        assert_eq!(g.charge_status("k1").await, Ok(None));
        assert!(is_direct_debit(PM_SEPA_OK) && !is_direct_debit(PM_CARD_OK));
        assert!(is_known_payment_method(PM_CARD_TIMEOUT) && !is_known_payment_method("card"));
    }

    #[tokio::test]
    async fn reusing_a_key_for_a_different_charge_is_refused() {
        let g = SimulatedGateway::new();
        g.charge(&req("k1", PM_CARD_OK, 100)).await.unwrap();
        assert_eq!(
            g.charge(&req("k1", PM_CARD_OK, 200)).await,
            Err(GatewayError::MismatchedRetry)
        );
        assert_eq!(
            g.charge(&req("k1", PM_SEPA_OK, 100)).await,
            Err(GatewayError::MismatchedRetry)
        );
    }
}
