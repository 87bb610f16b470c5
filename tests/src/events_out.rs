//! Events out (issue 19) across the real services: each of the three, started by the suite's
//! own wiring with webhooks (and the wallet with NATS JetStream) in its environment, relays its
//! outbox with no code of its own; a wallet opened through gRPC reaches a signed webhook and
//! the JetStream subject `billing.credits-wallet.wallet.opened`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use proto::{
    common::v1::{ListDeliveriesRequest, event_delivery_client::EventDeliveryClient},
    wallet::v1::{self as pb, credits_wallet_client::CreditsWalletClient},
};
use runtime::{
    relay::webhook,
    testing::{ADMIN_TOKEN, READ_TOKEN, TestDatabase, authed},
};
use serde_json::Value;

use crate::{Suite, channel, suite_env};

const SECRET: &str = "whsec_e2e_0123456789abcdef";

/// Bodies whose signature verified.
type Received = Arc<Mutex<Vec<Value>>>;

async fn hook(State(got): State<Received>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = headers
        .get(webhook::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let now = chrono::Utc::now().timestamp();
    if webhook::verify(
        SECRET.as_bytes(),
        header,
        &body,
        now,
        Duration::from_secs(300),
    )
    .is_err()
    {
        return StatusCode::BAD_REQUEST;
    }
    got.lock()
        .unwrap()
        .push(serde_json::from_slice(&body).unwrap());
    StatusCode::OK
}

async fn receiver() -> (SocketAddr, Received) {
    let got = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(Arc::clone(&got));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, got)
}

const NATS_URL: &str = "nats://127.0.0.1:4222";

#[tokio::test]
async fn every_service_relays_to_its_webhooks_and_the_wallet_to_jetstream() {
    let (addr, got) = receiver().await;
    let db = TestDatabase::fresh();
    let mut env = suite_env(&db, None, ADMIN_TOKEN);
    let tokens = "test-admin:test-admin-token:read+mutate+admin+act-for-user,\
                  test-read:test-read-token:read";
    // The wallet's subjects: a stream of this test captures them. One left behind by an
    // earlier run that failed would overlap it, so it goes first.
    let stream = format!("TEST_WALLET_{}", uuid::Uuid::new_v4().simple());
    let js = async_nats::jetstream::new(async_nats::connect(NATS_URL).await.unwrap());
    if let Ok(old) = js
        .stream_by_subject("billing.credits-wallet.wallet.opened")
        .await
    {
        let _ = js.delete_stream(old).await;
    }
    for prefix in ["WALLET", "SUBSCRIPTION", "RESELLER"] {
        let name = prefix.to_lowercase();
        env.insert(format!("{prefix}_TOKENS"), tokens.into());
        env.insert(format!("{prefix}_WEBHOOKS"), format!("platform-{name}"));
        let var = |part: &str| format!("{prefix}_WEBHOOK_PLATFORM_{prefix}_{part}");
        env.insert(var("URL"), format!("http://{addr}/hook"));
        env.insert(var("SECRET"), SECRET.into());
    }
    env.insert("WALLET_NATS_URL".into(), NATS_URL.into());
    env.insert("WALLET_NATS_STREAM".into(), stream.clone());
    let suite = Suite::from_env(suite::start(&env).await.unwrap(), db);

    let mut wallet = CreditsWalletClient::new(channel(&suite.wallet).await.unwrap());
    wallet
        .open_wallet(authed(
            ADMIN_TOKEN,
            pb::OpenWalletRequest {
                idempotency_key: "open-e2e".into(),
                wallet_id: "w-e2e".into(),
                currency: "EUR".into(),
                pricing: Some(pb::CreditPricing {
                    mode: pb::TierMode::Volume as i32,
                    tiers: vec![pb::PriceTier {
                        first: 1,
                        last: 0,
                        unit_price: "0.01".into(),
                        flat_price: String::new(),
                    }],
                }),
                rating: Some(pb::RatingRule {
                    credits_per_recipient: "1".into(),
                    per_mailing_surcharge: 0,
                }),
                signup_credits: 0,
                signup_credits_expire_at: None,
            },
        ))
        .await
        .unwrap();

    let mut opened = None;
    for _ in 0..200 {
        opened = got
            .lock()
            .unwrap()
            .iter()
            .find(|b| b["type"] == "wallet.opened")
            .cloned();
        if opened.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = opened.expect("wallet.opened reached the webhook");
    assert_eq!(opened["subject"], "w-e2e");
    assert!(opened["cursor"].as_u64().unwrap() >= 1);

    // JetStream has it on the wallet's subject, under the event's id.
    let mut published = None;
    for _ in 0..200 {
        if let Ok(mut s) = js.get_stream(&stream).await
            && s.info().await.map(|i| i.state.messages).unwrap_or(0) >= 1
        {
            published = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let published = published.expect("the wallet's stream has its events");
    let m = published
        .get_last_raw_message_by_subject("billing.credits-wallet.wallet.opened")
        .await
        .unwrap();
    assert_eq!(
        m.headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_string()),
        opened["id"].as_str().map(String::from)
    );

    // Each service shows its sink, configured, through its own EventDelivery.
    for (running, sink) in [
        (&suite.wallet, "webhook:platform-wallet"),
        (&suite.subscription, "webhook:platform-subscription"),
        (&suite.reseller, "webhook:platform-reseller"),
    ] {
        let mut client = EventDeliveryClient::new(channel(running).await.unwrap());
        let listed = client
            .list_deliveries(authed(READ_TOKEN, ListDeliveriesRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let status = listed
            .sinks
            .iter()
            .find(|s| s.sink == sink)
            .unwrap_or_else(|| panic!("{sink} in {listed:?}"));
        assert!(status.configured, "{sink}");
    }
    suite.stop().await.unwrap();
    js.delete_stream(&stream).await.unwrap();
}
