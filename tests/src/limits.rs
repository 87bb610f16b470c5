//! Oversized messages and streams are bounded: every RPC of every service (found from the proto
//! descriptors, plus health and the test clock) refuses a request over `max_request_bytes` with
//! `OUT_OF_RANGE` before decoding it (tonic's code for a message over the limit; gRPC's own
//! implementations use `RESOURCE_EXHAUSTED`, but either way it is final, not retryable); the refused call changes nothing and the service
//! answers the next normal call; a large legitimate request (a plan with a 1,000-band tier
//! table) fits the default; and each connection is bounded to `max_concurrent_streams`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use prost::Message;
use prost_reflect::DescriptorPool;
use proto::{
    subscription::v1::{self as spb, catalog_client::CatalogClient},
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::{
    Running,
    config::DEFAULT_MAX_REQUEST_BYTES,
    server::{EVENT_DELIVERY_SERVICE, TEST_CLOCK_SERVICE},
    testing::{ADMIN_TOKEN, authed},
};
use sqlx::Row;
use tonic::{Code, Status, transport::Channel};

use crate::{Suite, channel, readme::RawCodec};

const WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Calls `path` with `body` as the encoded request (admin token); a server-streaming call
/// answers with its first message or its status.
pub(crate) async fn call_raw(
    channel: Channel,
    path: &str,
    streaming: bool,
    body: Vec<u8>,
    first_message_wait: std::time::Duration,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let req = authed(ADMIN_TOKEN, body);
    let path: http::uri::PathAndQuery = path.parse().unwrap();
    if streaming {
        let mut stream = grpc
            .server_streaming(req, path, RawCodec)
            .await?
            .into_inner();
        // A stream that started is open: its first message, if one comes within the wait.
        match tokio::time::timeout(first_message_wait, stream.message()).await {
            Ok(Ok(m)) => Ok(m.unwrap_or_default()),
            Ok(Err(s)) => Err(s),
            Err(_) => Ok(Vec::new()),
        }
    } else {
        Ok(grpc.unary(req, path, RawCodec).await?.into_inner())
    }
}

/// A protobuf message of exactly `len` bytes made of one unknown length-delimited field (number
/// 999), which every message type accepts and ignores: only the size limit can refuse it.
pub(crate) fn padding(len: usize) -> Vec<u8> {
    // Tag (2 bytes) + length as a 3-byte varint (minimal for 16 KiB..2 MiB) + payload.
    assert!(((1 << 14) + 5..(1 << 21)).contains(&len));
    let payload = (len - 5) as u64;
    let mut out = Vec::with_capacity(len);
    prost::encoding::encode_key(999, prost::encoding::WireType::LengthDelimited, &mut out);
    assert_eq!(out.len(), 2);
    out.extend([
        (payload & 0x7f) as u8 | 0x80,
        ((payload >> 7) & 0x7f) as u8 | 0x80,
        (payload >> 14) as u8,
    ]);
    out.resize(len, b'x');
    out
}

/// Every (path, server-streaming) a service serves: its business RPCs from the descriptors,
/// health, the test clock and event delivery.
fn methods(pool: &DescriptorPool, services: &[&str]) -> Vec<(String, bool)> {
    let mut out = vec![
        ("/grpc.health.v1.Health/Check".to_string(), false),
        ("/grpc.health.v1.Health/Watch".to_string(), true),
        (format!("/{TEST_CLOCK_SERVICE}/GetTime"), false),
        (format!("/{TEST_CLOCK_SERVICE}/AdvanceTime"), false),
        (format!("/{EVENT_DELIVERY_SERVICE}/ListDeliveries"), false),
        (format!("/{EVENT_DELIVERY_SERVICE}/RetryDeadLetter"), false),
    ];
    for name in services {
        let service = pool.get_service_by_name(name).unwrap();
        for m in service.methods() {
            out.push((format!("/{name}/{}", m.name()), m.is_server_streaming()));
        }
    }
    out
}

async fn outbox_rows(running: &Running) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM outbox")
        .fetch_one(running.platform.db.pool())
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn oversized_requests_are_refused_with_out_of_range_and_change_nothing() {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let suite = Suite::start().await.unwrap();
    let limit = suite.wallet.platform.config.max_request_bytes;
    assert_eq!(
        limit, DEFAULT_MAX_REQUEST_BYTES,
        "the test runs at the default"
    );

    // Every RPC: one byte over the limit is refused before decoding, and the exact limit is not.
    let mut refused = 0;
    for (services, running) in suite.all() {
        let ch = channel(running).await.unwrap();
        let before = outbox_rows(running).await;
        for (path, streaming) in methods(&pool, services) {
            let over = call_raw(ch.clone(), &path, streaming, padding(limit + 1), WAIT).await;
            let code = over.as_ref().err().map(Status::code);
            assert_eq!(
                code,
                Some(Code::OutOfRange),
                "{path} with a request of {} bytes: {over:?}",
                limit + 1
            );
            refused += 1;
            // Not refused for its size (a clear answer to an empty request, or OK).
            if let Err(s) = call_raw(ch.clone(), &path, streaming, padding(limit), WAIT).await {
                assert!(
                    !matches!(s.code(), Code::OutOfRange | Code::Internal | Code::Unknown),
                    "{path} with a request of exactly the limit: {s:?}"
                );
            }
        }
        assert_eq!(
            outbox_rows(running).await,
            before,
            "no event from refused calls"
        );
        // Still serving.
        let health = call_raw(ch, "/grpc.health.v1.Health/Check", false, Vec::new(), WAIT).await;
        assert!(health.is_ok(), "{health:?}");
    }

    // A real mutation padded over the limit: refused, its key not claimed, nothing written;
    // the same call at a normal size then succeeds once.
    let mut wallet = CreditsWalletClient::new(channel(&suite.wallet).await.unwrap());
    wallet
        .open_wallet(authed(
            ADMIN_TOKEN,
            wpb::OpenWalletRequest {
                idempotency_key: "open".into(),
                wallet_id: "w-1".into(),
                currency: "EUR".into(),
                pricing: Some(wpb::CreditPricing {
                    mode: wpb::TierMode::Volume as i32,
                    tiers: vec![wpb::PriceTier {
                        first: 1,
                        last: 0,
                        unit_price: "0.01".into(),
                        flat_price: String::new(),
                    }],
                }),
                rating: Some(wpb::RatingRule {
                    credits_per_recipient: "1".into(),
                    per_mailing_surcharge: 0,
                }),
                signup_credits: 0,
                signup_credits_expire_at: None,
            },
        ))
        .await
        .unwrap();
    let events_before = outbox_rows(&suite.wallet).await;
    let grant = |reference: String| wpb::GrantCreditsRequest {
        idempotency_key: "grant-1".into(),
        wallet_id: "w-1".into(),
        credits: 500,
        kind: wpb::LotKind::Promotional as i32,
        expires_at: None,
        reference,
    };
    let huge = grant("r".repeat(limit + 1));
    assert!(huge.encoded_len() > limit);
    let err = wallet
        .grant_credits(authed(ADMIN_TOKEN, huge))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");
    let w = wallet
        .get_wallet(authed(
            ADMIN_TOKEN,
            wpb::GetWalletRequest {
                wallet_id: "w-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.balance, 0, "the refused grant wrote nothing");
    assert_eq!(outbox_rows(&suite.wallet).await, events_before);
    let done = wallet
        .grant_credits(authed(ADMIN_TOKEN, grant("promo".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.wallet.unwrap().balance, 500);
    let report = wallet
        .verify_ledger(authed(ADMIN_TOKEN, wpb::VerifyLedgerRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.violations, []);
    assert_eq!(report.entries_checked, 1, "one grant, once");

    // The largest legitimate request fits: a plan with a 1,000-band contact tier table.
    let mut catalog = CatalogClient::new(channel(&suite.subscription).await.unwrap());
    let bands = 1_000u64;
    let tiers = (0..bands)
        .map(|i| spb::PriceTier {
            first: i * 100 + 1,
            last: if i + 1 == bands { 0 } else { (i + 1) * 100 },
            unit_price: "0.006".into(),
            flat_price: String::new(),
        })
        .collect();
    let spec = spb::PlanSpec {
        plan_id: "big".into(),
        name: "Big tier table".into(),
        product: spb::Product::Marketing as i32,
        level: Some(spb::Level {
            name: "starter".into(),
            rank: 1,
        }),
        interval: spb::Interval::Month as i32,
        currency: "EUR".into(),
        contact_tiers: Some(spb::ContactTiers {
            mode: spb::TierMode::Graduated as i32,
            tiers,
        }),
        slider: Some(spb::Slider {
            min: 100,
            max: 100_000,
            step: 100,
        }),
        included_seats: 1,
        seat_price: "5".into(),
        add_ons: vec![],
        proration: spb::ProrationPolicy::ProrateToCycleEnd as i32,
        self_serve: None,
        trial: None,
        monthly_credits: 0,
    };
    let publish = spb::PublishPlanRequest {
        idempotency_key: "big".into(),
        plan: Some(spec),
    };
    let plan_bytes = publish.encoded_len();
    let plan = catalog
        .publish_plan(authed(ADMIN_TOKEN, publish))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        plan.spec.unwrap().contact_tiers.unwrap().tiers.len() as u64,
        bands
    );
    assert!(plan_bytes * 10 < limit, "{plan_bytes} bytes leaves room");

    eprintln!(
        "limits: {refused} RPCs refused a {} byte request with OUT_OF_RANGE and accepted \
         {limit} bytes; a {bands}-band plan is {plan_bytes} bytes; records changed by refused \
         calls: 0",
        limit + 1
    );
    suite.stop().await.unwrap();
}

#[tokio::test]
async fn each_connection_is_bounded_to_the_configured_concurrent_streams() {
    let suite = Suite::start().await.unwrap();
    for (_, running) in suite.all() {
        let expected = running.platform.config.max_concurrent_streams as usize;
        let tcp = tokio::net::TcpStream::connect(running.addr).await.unwrap();
        let (mut send, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        // One open call (health, no token needed), so the server's SETTINGS have arrived.
        let request = http::Request::builder()
            .method("POST")
            .uri(format!(
                "http://{}/grpc.health.v1.Health/Check",
                running.addr
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        send = send.ready().await.unwrap();
        let (response, mut body) = send.send_request(request, false).unwrap();
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            send.current_max_send_streams(),
            expected,
            "the server advertises max_concurrent_streams"
        );
    }
    suite.stop().await.unwrap();
}
