//! The Stripe adapter over HTTP: against localstripe (`runtime::testing::localstripe`) for what
//! it implements, and against a small scripted server for what it does not (it ignores
//! `Idempotency-Key`, has no PaymentIntent search, and never times out).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use chrono::Utc;
use runtime::{
    stripe::{self, Secret, StripeGateway, StripeSettings},
    testing::localstripe,
};
use shared::{
    ChargeOutcome, ChargeRequest, ChargeStatus, Currency, DeclineReason, GatewayError, Money,
    PaymentGateway,
};

fn gateway(url: &str, timeout: Duration) -> StripeGateway {
    StripeGateway::new(&StripeSettings {
        api_base: url.to_string(),
        secret_key: Secret::new(localstripe::SECRET_KEY),
        timeout,
        webhook_secret: None,
    })
    .unwrap()
}

fn request(key: &str, method: &str, cents: i64) -> ChargeRequest {
    ChargeRequest {
        idempotency_key: key.to_string(),
        payment_method: method.to_string(),
        amount: Money::from_minor_units(cents, Currency::EUR),
        description: "credits".into(),
        requested_at: Utc::now(),
    }
}

fn fresh_key() -> String {
    format!("pur_{}", uuid::Uuid::now_v7().simple())
}

#[tokio::test]
async fn a_saved_card_is_charged_once_in_minor_units_with_our_key_in_the_metadata() {
    let Some(url) = localstripe::url() else {
        return;
    };
    let g = gateway(&url, stripe::DEFAULT_TIMEOUT);
    let token = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    let key = fresh_key();
    let outcome = g.charge(&request(&key, &token, 42_050)).await.unwrap();
    let ChargeOutcome::Succeeded { charge_id } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(charge_id.starts_with("pi_"), "{charge_id}");
    let customer = token.split(':').next().unwrap();
    let intents = localstripe::payment_intents_of(&url, customer).await;
    assert_eq!(intents.len(), 1, "{intents:?}");
    let pi = &intents[0];
    assert_eq!(pi["id"], charge_id.as_str());
    assert_eq!(pi["amount"], 42_050);
    assert_eq!(pi["currency"], "eur");
    assert_eq!(pi["status"], "succeeded");
    assert_eq!(pi["metadata"]["billing_key"], key.as_str());
    assert_eq!(pi["payment_method"], token.split(':').nth(1).unwrap());
}

#[tokio::test]
async fn a_declined_card_is_a_clear_decline_and_a_missing_method_is_unknown() {
    let Some(url) = localstripe::url() else {
        return;
    };
    let g = gateway(&url, stripe::DEFAULT_TIMEOUT);
    let token = localstripe::customer_with_card(&url, localstripe::CARD_DECLINED).await;
    assert_eq!(
        g.charge(&request(&fresh_key(), &token, 1_000)).await,
        Ok(ChargeOutcome::Declined {
            reason: DeclineReason::Declined
        })
    );
    let customer = token.split(':').next().unwrap();
    let missing = format!("{customer}:pm_doesnotexist0000");
    assert_eq!(
        g.charge(&request(&fresh_key(), &missing, 1_000)).await,
        Err(GatewayError::UnknownPaymentMethod(missing.clone()))
    );
    // Not a Stripe token at all: refused before any call.
    assert_eq!(
        g.charge(&request(&fresh_key(), "pm_card_ok", 1_000)).await,
        Err(GatewayError::UnknownPaymentMethod("pm_card_ok".into()))
    );
    assert!(matches!(
        g.charge(&request(&fresh_key(), &token, 0)).await,
        Err(GatewayError::InvalidAmount(_))
    ));
}

#[tokio::test]
async fn a_sepa_debit_is_pending_and_its_failure_later_is_a_return() {
    let Some(url) = localstripe::url() else {
        return;
    };
    let g = gateway(&url, stripe::DEFAULT_TIMEOUT);
    let token = localstripe::customer_with_sepa(&url, localstripe::IBAN_FAILS_LATER).await;
    let key = fresh_key();
    let outcome = g.charge(&request(&key, &token, 9_900)).await.unwrap();
    assert!(
        matches!(outcome, ChargeOutcome::Pending { .. }),
        "{outcome:?}"
    );
    let mut status = ChargeStatus::Pending;
    for _ in 0..100 {
        let record = g.charge_status(&key).await.unwrap().unwrap();
        assert_eq!(record.amount, Money::from_minor_units(9_900, Currency::EUR));
        assert_eq!(record.payment_method, token);
        status = record.status;
        if status != ChargeStatus::Pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, ChargeStatus::Returned);
}

/// What the scripted Stripe saw.
#[derive(Default)]
struct Seen {
    creates: AtomicUsize,
    searches: AtomicUsize,
    headers: Mutex<Vec<HeaderMap>>,
}

struct Script {
    seen: Seen,
    /// Answer the creates after this long (longer than the gateway waits: a timeout).
    create_delay: Duration,
    create_status: StatusCode,
    /// Whether the search finds the PaymentIntent.
    searchable: bool,
    key: String,
}

fn intent(key: &str) -> String {
    serde_json::json!({
        "id": "pi_scripted", "object": "payment_intent", "status": "succeeded",
        "amount": 1_000, "currency": "eur", "created": 1_767_225_600,
        "customer": "cus_1", "payment_method": "pm_1",
        "metadata": {"billing_key": key},
    })
    .to_string()
}

async fn scripted(script: Arc<Script>) -> String {
    async fn create(State(s): State<Arc<Script>>, headers: HeaderMap) -> (StatusCode, String) {
        s.seen.creates.fetch_add(1, Ordering::SeqCst);
        s.seen.headers.lock().unwrap().push(headers);
        tokio::time::sleep(s.create_delay).await;
        (s.create_status, intent(&s.key))
    }
    async fn search(State(s): State<Arc<Script>>) -> String {
        s.seen.searches.fetch_add(1, Ordering::SeqCst);
        let data = if s.searchable {
            intent(&s.key)
        } else {
            String::new()
        };
        format!("{{\"object\": \"search_result\", \"data\": [{data}]}}")
    }
    let app = Router::new()
        .route("/v1/payment_intents", post(create))
        .route("/v1/payment_intents/search", get(search))
        .with_state(script);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_timeout_leaves_the_outcome_unknown_and_the_retry_finds_the_first_charge() {
    let key = fresh_key();
    let script = Arc::new(Script {
        seen: Seen::default(),
        create_delay: Duration::from_secs(3),
        create_status: StatusCode::OK,
        searchable: true,
        key: key.clone(),
    });
    let url = scripted(script.clone()).await;
    let g = gateway(&url, Duration::from_millis(300));
    let req = request(&key, "cus_1:pm_1", 1_000);
    assert_eq!(g.charge(&req).await, Err(GatewayError::Timeout));
    // A retry under the same key with another amount finds the first charge and is refused.
    assert_eq!(
        g.charge(&request(&key, "cus_1:pm_1", 2_000)).await,
        Err(GatewayError::MismatchedRetry)
    );
    // The true retry looks the PaymentIntent up by our key before creating anything.
    assert_eq!(
        g.charge(&req).await,
        Ok(ChargeOutcome::Succeeded {
            charge_id: "pi_scripted".into()
        })
    );
    assert_eq!(
        script.seen.creates.load(Ordering::SeqCst),
        1,
        "charged once"
    );
    assert_eq!(script.seen.searches.load(Ordering::SeqCst), 2);
    // The request carried the secret as bearer token and the key derived into Idempotency-Key.
    let headers = script.seen.headers.lock().unwrap()[0].clone();
    assert_eq!(
        headers["idempotency-key"],
        stripe::idempotency_header(&key).as_str()
    );
    assert_eq!(
        headers["authorization"],
        format!("Bearer {}", localstripe::SECRET_KEY).as_str()
    );
}

// Stripe answers 409 to a request whose key another request still holds in progress.
#[tokio::test]
async fn a_conflict_with_a_request_in_progress_leaves_the_outcome_unknown_not_refused() {
    let key = fresh_key();
    let script = Arc::new(Script {
        seen: Seen::default(),
        create_delay: Duration::ZERO,
        create_status: StatusCode::CONFLICT,
        searchable: false,
        key: key.clone(),
    });
    let url = scripted(script.clone()).await;
    let g = gateway(&url, Duration::from_secs(5));
    assert_eq!(
        g.charge(&request(&key, "cus_1:pm_1", 1_000)).await,
        Err(GatewayError::Timeout)
    );
}

#[tokio::test]
async fn a_server_error_leaves_the_outcome_unknown_and_retries_send_the_same_idempotency_key() {
    let key = fresh_key();
    let script = Arc::new(Script {
        seen: Seen::default(),
        create_delay: Duration::ZERO,
        create_status: StatusCode::BAD_GATEWAY,
        searchable: false,
        key: key.clone(),
    });
    let url = scripted(script.clone()).await;
    let g = gateway(&url, Duration::from_secs(5));
    let req = request(&key, "cus_1:pm_1", 1_000);
    assert_eq!(g.charge(&req).await, Err(GatewayError::Timeout));
    assert_eq!(g.charge(&req).await, Err(GatewayError::Timeout));
    let headers = script.seen.headers.lock().unwrap().clone();
    assert_eq!(headers.len(), 2);
    assert_eq!(headers[0]["idempotency-key"], headers[1]["idempotency-key"]);
    // Nothing found by the search between them: the retry went to the create again.
    assert_eq!(script.seen.searches.load(Ordering::SeqCst), 1);
}

/// A webhook event's id is recorded once: a repeated delivery finds it, and an event whose
/// transaction rolls back leaves no trace (it is applied when Stripe delivers it again).
#[tokio::test]
async fn a_webhook_event_is_recorded_once_and_only_with_its_transaction() {
    let (db, _t) = crate::fresh_db().await;
    // The table as the services' migrations create it.
    sqlx::query(
        "CREATE TABLE stripe_events (event_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, \
         received_at_us BIGINT NOT NULL)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let at = Utc::now();
    let mut tx = db.begin_write().await.unwrap();
    assert!(
        runtime::stripe_webhook::record_event(&mut tx, "evt_1", "charge.refunded", at)
            .await
            .unwrap()
    );
    tx.rollback().await.unwrap();
    for first in [true, false] {
        let mut tx = db.begin_write().await.unwrap();
        let recorded =
            runtime::stripe_webhook::record_event(&mut tx, "evt_1", "charge.refunded", at)
                .await
                .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(recorded, first);
    }
    let (count, micros): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), MAX(received_at_us) FROM stripe_events")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((count, micros), (1, at.timestamp_micros()));
}
