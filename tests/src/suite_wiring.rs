//! The suite as `cargo run -p suite` starts it (`suite::start`), and what a caller sees of its
//! wallet peer: subscription's monthly credits reach the wallet through the suite's own wiring
//! (C7); a caller whose wallet is down names it in its errors and reports its own service
//! `NOT_SERVING` until the wallet is back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use proto::{
    reseller::v1::{self as rpb, reseller_billing_client::ResellerBillingClient},
    subscription::v1::{catalog_client::CatalogClient, subscriptions_client::SubscriptionsClient},
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::testing::{self, ADMIN_TOKEN, authed};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{Suite, channel};

const DEV_TOKEN: &str = "dev-admin-token";

#[tokio::test]
async fn the_suite_as_the_readme_starts_it_grants_a_plans_monthly_credits_in_the_wallet() {
    let suite = Suite::start_as_readme(testing::TestDatabase::fresh(), DEV_TOKEN)
        .await
        .unwrap();
    let mut wallet = CreditsWalletClient::new(channel(&suite.wallet).await.unwrap());
    let subs_channel = channel(&suite.subscription).await.unwrap();
    wallet
        .open_wallet(authed(
            DEV_TOKEN,
            wpb::OpenWalletRequest {
                idempotency_key: "open-shop".into(),
                wallet_id: "shop".into(),
                currency: "EUR".into(),
                pricing: Some(wpb::CreditPricing {
                    mode: wpb::TierMode::Graduated as i32,
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
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let mut plan = crate::scenarios::plan("email");
    plan.monthly_credits = 1_000;
    CatalogClient::new(subs_channel.clone())
        .publish_plan(authed(
            DEV_TOKEN,
            proto::subscription::v1::PublishPlanRequest {
                idempotency_key: "plan-email".into(),
                plan: Some(plan),
            },
        ))
        .await
        .unwrap();
    SubscriptionsClient::new(subs_channel)
        .subscribe(authed(
            DEV_TOKEN,
            crate::card_subscribe("sub-shop".into(), None, "shop", "email", 5_000),
        ))
        .await
        .unwrap();
    // C7: the month's credits arrive in the account's wallet (the grant runs after the
    // subscription commits, through the wallet peer the suite configured).
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let balance = wallet
            .get_wallet(authed(
                DEV_TOKEN,
                wpb::GetWalletRequest {
                    wallet_id: "shop".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .balance;
        if balance == 1_000 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the plan's 1,000 monthly credits never reached the wallet (balance {balance})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    suite.stop().await.unwrap();
}

async fn status(health: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits until `service`'s health is `want`; returns how long it took.
async fn wait_health(
    health: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
    want: ServingStatus,
) -> Duration {
    let t = Instant::now();
    while status(health, service).await != want as i32 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{service} did not become {want:?} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.elapsed()
}

#[tokio::test]
async fn a_caller_names_its_down_wallet_and_reports_not_serving_until_it_is_back() {
    let db = testing::TestDatabase::fresh();
    let wallet_db = db.sibling("wallet");
    let wallet = runtime::server::start(
        &credits_wallet::SPEC,
        testing::config(&credits_wallet::DEFAULTS, &wallet_db),
        credits_wallet::routes,
    )
    .await
    .unwrap();
    let wallet_addr = wallet.addr;
    let peer =
        format!("[peers.wallet]\nurl = \"http://{wallet_addr}\"\ntoken = \"{ADMIN_TOKEN}\"\n");
    let reseller_db = db.sibling("reseller");
    let reseller = runtime::server::start(
        &reseller_billing::SPEC,
        testing::config_with(&reseller_billing::DEFAULTS, &reseller_db, &peer),
        reseller_billing::routes,
    )
    .await
    .unwrap();
    let reseller_channel = channel(&reseller).await.unwrap();
    let mut health = HealthClient::new(reseller_channel.clone());
    wait_health(
        &mut health,
        reseller_billing::SERVICE,
        ServingStatus::Serving,
    )
    .await;

    wallet.stop().await.unwrap();
    // Hold the wallet's port, bound but not listening (a connect is refused), so that no other
    // test's server takes it while the wallet is down.
    let hold = hold_port(wallet_addr);
    let took = wait_health(
        &mut health,
        reseller_billing::SERVICE,
        ServingStatus::NotServing,
    )
    .await;
    assert!(
        took < Duration::from_secs(5),
        "NOT_SERVING took {took:?}, more than two probes"
    );
    assert_eq!(
        status(&mut health, "").await,
        ServingStatus::Serving as i32,
        "the process itself still serves (liveness probes must not restart it)"
    );

    // A call that needs the wallet says which peer is down and where.
    let refused = ResellerBillingClient::new(reseller_channel)
        .register_partner(authed(
            ADMIN_TOKEN,
            rpb::RegisterPartnerRequest {
                idempotency_key: "reg".into(),
                partner_id: "p1".into(),
                currency: "EUR".into(),
                funding: rpb::PartnerFunding::Prepaid as i32,
                payment_method: String::new(),
                pricing: Some(wpb::CreditPricing {
                    mode: wpb::TierMode::Graduated as i32,
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
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let named = format!("credits-wallet (peer `wallet` at http://{wallet_addr}) is unreachable");
    assert!(
        refused.message().contains(&named),
        "the message names the peer: {:?}",
        refused.message()
    );

    // The wallet back on its address: SERVING again.
    drop(hold);
    let mut config = testing::config(&credits_wallet::DEFAULTS, &wallet_db);
    config.listen_addr = wallet_addr;
    let wallet = runtime::server::start(&credits_wallet::SPEC, config, credits_wallet::routes)
        .await
        .unwrap();
    let took = wait_health(
        &mut health,
        reseller_billing::SERVICE,
        ServingStatus::Serving,
    )
    .await;
    assert!(took < Duration::from_secs(5), "SERVING again took {took:?}");

    let (a, b) = tokio::join!(reseller.stop(), wallet.stop());
    a.unwrap();
    b.unwrap();
}

/// Binds `addr` without listening: connections to it are refused, and the port stays ours.
fn hold_port(addr: std::net::SocketAddr) -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket
}
