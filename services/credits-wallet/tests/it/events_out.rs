//! Events out (issue 19) through a real wallet process killed with SIGKILL mid-delivery: the
//! webhook receiver (in this test) holds one delivery unanswered while the process dies, so its
//! acknowledgement is never recorded. The process restarted on the same database takes the sink
//! over once the dead one's lease expires and goes on from the stored cursor: every event
//! arrives, in cursor order, and the only repeat is the unacknowledged one, with the same id.

use std::{
    process::Stdio,
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
    testing::{ADMIN_TOKEN, TestDatabase, authed},
};
use serde_json::Value;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::concurrency::{Process, free_port};

const SECRET: &str = "whsec_wallet_crash_0123456789";
/// The cursor whose first delivery the receiver takes but never answers.
const HELD: i64 = 3;

#[derive(Default)]
struct Receiver {
    /// (cursor, id) of every delivery whose signature verified, in arrival order.
    got: Mutex<Vec<(i64, String)>>,
    held_once: Mutex<bool>,
}

async fn hook(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
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
    let v: Value = serde_json::from_slice(&body).unwrap();
    let cursor = v["cursor"].as_i64().unwrap();
    r.got
        .lock()
        .unwrap()
        .push((cursor, v["id"].as_str().unwrap().to_string()));
    let hold = cursor == HELD && !std::mem::replace(&mut *r.held_once.lock().unwrap(), true);
    if hold {
        // Never answered in time: the process is killed while it waits.
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    StatusCode::OK
}

async fn spawn_wallet(db: &TestDatabase, hook: &str) -> (Process, Channel) {
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_credits-wallet"))
        .env("WALLET_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("WALLET_METRICS_ADDR", "off")
        .env("WALLET_DATABASE_URL", &db.url)
        .env("WALLET_DATABASE_SCHEMA", &db.schema)
        .env(
            "WALLET_TOKENS",
            format!("test:{ADMIN_TOKEN}:read+mutate+admin"),
        )
        .env("WALLET_LOG_FILTER", "warn")
        .env("WALLET_TEST_CLOCK", "true")
        .env("WALLET_WEBHOOKS", "platform")
        .env("WALLET_WEBHOOK_PLATFORM_URL", hook)
        .env("WALLET_WEBHOOK_PLATFORM_SECRET", SECRET)
        .env("WALLET_EVENTS_RETRY_INITIAL_MS", "50")
        .env("WALLET_EVENTS_RETRY_MAX_MS", "200")
        .env("WALLET_EVENTS_LEASE_SECONDS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let process = Process(child);
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await
            && HealthClient::new(ch.clone())
                .check(HealthCheckRequest::default())
                .await
                .is_ok()
        {
            return (process, ch);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("wallet on port {port} never became healthy");
}

async fn open(ch: &Channel, id: &str) {
    CreditsWalletClient::new(ch.clone())
        .open_wallet(authed(
            ADMIN_TOKEN,
            pb::OpenWalletRequest {
                idempotency_key: format!("open-{id}"),
                wallet_id: id.into(),
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
}

#[tokio::test]
async fn a_wallet_killed_mid_delivery_loses_no_event_and_repeats_only_the_unacknowledged_one() {
    let receiver = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(Arc::clone(&receiver));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let db = TestDatabase::fresh();

    let (mut first, ch) = spawn_wallet(&db, &hook_url).await;
    for i in 0..6 {
        open(&ch, &format!("w-{i}")).await;
    }
    for _ in 0..400 {
        if receiver.got.lock().unwrap().iter().any(|(c, _)| *c == HELD) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        receiver.got.lock().unwrap().iter().any(|(c, _)| *c == HELD),
        "the held event reached the receiver"
    );
    first.kill_now();

    let (_second, ch) = spawn_wallet(&db, &hook_url).await;
    for i in 6..8 {
        open(&ch, &format!("w-{i}")).await;
    }
    let mut events = EventDeliveryClient::new(ch);
    let mut done = None;
    for _ in 0..400 {
        let listed = events
            .list_deliveries(authed(ADMIN_TOKEN, ListDeliveriesRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let sink = &listed.sinks[0];
        if listed.head_cursor >= 8 && sink.acked_cursor == listed.head_cursor {
            done = Some(listed.head_cursor as i64);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let head = done.expect("the restarted process delivered up to the head");

    let got = receiver.got.lock().unwrap().clone();
    let cursors: Vec<i64> = got.iter().map(|(c, _)| *c).collect();
    let mut expected: Vec<i64> = (1..=head).collect();
    expected.insert(HELD as usize, HELD);
    assert_eq!(
        cursors, expected,
        "every event, in order; the held one twice"
    );
    let held: Vec<&String> = got
        .iter()
        .filter(|(c, _)| *c == HELD)
        .map(|(_, id)| id)
        .collect();
    assert_eq!(held[0], held[1], "the repeat carries the same id");
    let mut ids: Vec<&String> = got.iter().map(|(_, id)| id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as i64, head, "one id per event");
}
