//! The foundation, tried as a new user would: every service lists itself through reflection,
//! reports SERVING, refuses business RPCs without the right token, echoes request ids, exposes
//! metrics, runs on the test clock, and drains on shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use proto::common::v1::{
    AdvanceTimeRequest, GetTimeRequest, WatchEventsRequest, test_clock_client::TestClockClient,
};
use runtime::testing::{ADMIN_TOKEN, READ_TOKEN, authed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::{Suite, channel};

async fn list_services_v1(ch: tonic::transport::Channel) -> Vec<String> {
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    match resp.message_response.unwrap() {
        v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn list_services_v1alpha(ch: tonic::transport::Channel) -> Vec<String> {
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    match resp.message_response.unwrap() {
        v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_each_service_health_and_clock_on_v1_and_v1alpha() {
    let suite = Suite::start().await.unwrap();
    for (names, running) in suite.all() {
        for listed in [
            list_services_v1(channel(running).await.unwrap()).await,
            list_services_v1alpha(channel(running).await.unwrap()).await,
        ] {
            assert!(listed.contains(&"grpc.health.v1.Health".to_string()));
            assert!(listed.contains(&"billing.common.v1.TestClock".to_string()));
            assert!(listed.contains(&"billing.common.v1.EventDelivery".to_string()));
            // Each service lists its own business services, and not its neighbours'.
            let mut business: Vec<&str> = listed
                .iter()
                .map(String::as_str)
                .filter(|s| s.starts_with("billing.") && !s.starts_with("billing.common"))
                .collect();
            business.sort_unstable();
            let mut expected = names.to_vec();
            expected.sort_unstable();
            assert_eq!(business, expected, "{listed:?}");
        }
    }
    suite.stop().await.unwrap();
}

#[tokio::test]
async fn health_reports_serving_without_a_token() {
    let suite = Suite::start().await.unwrap();
    for (names, running) in suite.all() {
        let name = names[names.len() - 1];
        let mut health = HealthClient::new(channel(running).await.unwrap());
        for service in ["", name] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{name} {service:?}");
        }
    }
    suite.stop().await.unwrap();
}

async fn watch_code(running: &runtime::Running, token: Option<&str>) -> Code {
    let ch = channel(running).await.unwrap();
    let req = WatchEventsRequest::default();
    let req = match token {
        Some(t) => authed(t, req),
        None => Request::new(req),
    };
    let path = match running.platform.config.service_name {
        "credits-wallet" => proto::wallet::v1::credits_wallet_client::CreditsWalletClient::new(ch)
            .watch_events(req)
            .await
            .map(|_| ()),
        "subscription" => {
            proto::subscription::v1::subscriptions_client::SubscriptionsClient::new(ch)
                .watch_events(req)
                .await
                .map(|_| ())
        }
        _ => proto::reseller::v1::reseller_billing_client::ResellerBillingClient::new(ch)
            .watch_events(req)
            .await
            .map(|_| ()),
    };
    match path {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn business_rpcs_need_a_known_token_with_the_right_scope() {
    let suite = Suite::start().await.unwrap();
    for (names, running) in suite.all() {
        let name = names[names.len() - 1];
        assert_eq!(
            watch_code(running, None).await,
            Code::Unauthenticated,
            "{name}"
        );
        assert_eq!(
            watch_code(running, Some("not-a-configured-token")).await,
            Code::Unauthenticated,
            "{name}"
        );
        assert_eq!(
            watch_code(running, Some(READ_TOKEN)).await,
            Code::Ok,
            "{name}"
        );

        let mut clock = TestClockClient::new(channel(running).await.unwrap());
        let denied = clock
            .advance_time(authed(READ_TOKEN, AdvanceTimeRequest { to: None }))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{name}");
        assert!(denied.message().contains("admin"), "{}", denied.message());
    }
    suite.stop().await.unwrap();
}

#[tokio::test]
async fn the_test_clock_moves_only_forward_and_only_when_enabled() {
    let suite = Suite::start().await.unwrap();
    let mut clock = TestClockClient::new(channel(&suite.wallet).await.unwrap());
    let start = clock
        .get_time(authed(READ_TOKEN, GetTimeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(start.test_clock);
    let now = start.now.unwrap();
    let later = prost_types_ts(now.seconds + 86_400 * 31);
    let moved = clock
        .advance_time(authed(ADMIN_TOKEN, AdvanceTimeRequest { to: Some(later) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.now.unwrap().seconds, now.seconds + 86_400 * 31);
    assert_eq!(
        suite.wallet.platform.clock.now().timestamp(),
        now.seconds + 86_400 * 31,
        "the service's rules read the same clock"
    );
    let back = clock
        .advance_time(authed(ADMIN_TOKEN, AdvanceTimeRequest { to: Some(now) }))
        .await
        .unwrap_err();
    assert_eq!(back.code(), Code::InvalidArgument);
    let missing = clock
        .advance_time(authed(ADMIN_TOKEN, AdvanceTimeRequest { to: None }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    suite.stop().await.unwrap();
}

fn prost_types_ts(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let suite = Suite::start().await.unwrap();
    let mut clock = TestClockClient::new(channel(&suite.subscription).await.unwrap());
    let mut req = authed(READ_TOKEN, GetTimeRequest {});
    req.metadata_mut()
        .insert("x-request-id", "req-from-caller-42".parse().unwrap());
    let resp = clock.get_time(req).await.unwrap();
    assert_eq!(
        resp.metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "req-from-caller-42"
    );
    let resp = clock
        .get_time(authed(READ_TOKEN, GetTimeRequest {}))
        .await
        .unwrap();
    let made = resp
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(made.len(), 32);
    suite.stop().await.unwrap();
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test]
async fn metrics_count_calls_by_code_and_report_pool_and_outbox() {
    let suite = Suite::start().await.unwrap();
    assert_eq!(watch_code(&suite.wallet, None).await, Code::Unauthenticated);
    let mut clock = TestClockClient::new(channel(&suite.wallet).await.unwrap());
    clock
        .get_time(authed(READ_TOKEN, GetTimeRequest {}))
        .await
        .unwrap();
    let text = scrape(suite.wallet.metrics_addr.unwrap()).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(r#"billing_rpc_requests_total{service="credits-wallet",method="/billing.wallet.v1.CreditsWallet/WatchEvents",code="UNAUTHENTICATED"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"method="/billing.common.v1.TestClock/GetTime",code="OK"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("billing_rpc_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("billing_db_pool_connections{"), "{text}");
    assert!(text.contains("billing_outbox_pending_events"), "{text}");
    suite.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_open_event_streams_and_drains() {
    let suite = Suite::start().await.unwrap();
    let mut client = proto::wallet::v1::credits_wallet_client::CreditsWalletClient::new(
        channel(&suite.wallet).await.unwrap(),
    );
    let mut events = client
        .watch_events(authed(READ_TOKEN, WatchEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let stop = tokio::spawn(suite.stop());
    // The open stream ends (it does not hold the shutdown forever), and the services stop.
    let ended = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("stream should end on shutdown");
    assert!(ended.is_none() || ended.is_some_and(|r| r.is_err()));
    tokio::time::timeout(Duration::from_secs(20), stop)
        .await
        .expect("suite should stop")
        .unwrap()
        .unwrap();
}
