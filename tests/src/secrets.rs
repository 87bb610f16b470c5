//! No secret (bearer token, payment-method token) appears in the logs of a full run across
//! the three services: the logs are captured at the production filter, with this suite's own
//! crates at debug, while every service handles real calls, refused calls and payments.
//!
//! On PostgreSQL the services connect with a database URL that carries a password (the test
//! server trusts local connections, so it ignores the password), and the run also includes a
//! start that fails (a database that does not exist) and calls whose connections are cut: the
//! password must appear nowhere, neither in the logs nor in the errors. SQLite has no password.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use proto::{
    reseller::v1::{self as rpb, reseller_billing_client::ResellerBillingClient},
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::testing::{self, TestBackend, authed};
use tracing_subscriber::fmt::MakeWriter;

use crate::{Suite, channel};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

const DEV_TOKEN: &str = "dev-secret-token-9f3a";
const WRONG_TOKEN: &str = "wrong-secret-token-7c1e";
const DB_PASSWORD: &str = "db-secret-password-5b2d";

/// `url` with [`DB_PASSWORD`] as the password of its user (`postgres` when it names none).
fn with_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or(userinfo);
            format!("{user}:{DB_PASSWORD}@{host}")
        }
        None => format!("postgres:{DB_PASSWORD}@{authority}"),
    };
    format!("{scheme}://{authority}{tail}")
}

#[tokio::test]
async fn no_secret_appears_in_the_logs_of_a_full_run() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            "info,sqlx=warn,runtime=debug,credits_wallet=debug,subscription=debug,reseller_billing=debug",
        )
        .with_writer(logs.clone())
        .finish();
    // This test binary installs no other subscriber.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let mut db = testing::TestDatabase::fresh();
    let postgres = testing::backend() == TestBackend::Postgres;
    if postgres {
        db.url = with_password(&db.url);
        // A start that fails: the error (logged by `run_main` as below) must not carry the URL's
        // password either.
        let mut missing = testing::TestDatabase::fresh();
        let base = missing.url.rsplit_once('/').unwrap().0.to_string();
        missing.url = format!("{base}/no_such_database_{}", std::process::id());
        let config = testing::config(&credits_wallet::DEFAULTS, &missing);
        tracing::info!(config = ?config, "starting with");
        let e = runtime::server::start(&credits_wallet::SPEC, config, credits_wallet::routes)
            .await
            .err()
            .expect("a start on a database that does not exist fails");
        tracing::error!(error = %format!("{e:#}"), "failed to start");
        assert!(
            !format!("{e:#} {e:?}").contains(DB_PASSWORD),
            "the start error shows the password: {e:#}"
        );
    } else {
        eprintln!(
            "secrets: SQLite has no database password; the database-password part runs with \
             BILLING_TEST_BACKEND=postgres"
        );
    }
    let db_schema = db.schema.clone();
    let db_url = db.url.clone();
    let suite = Suite::start_on(db, Some(DEV_TOKEN)).await.unwrap();
    let mut wallet = CreditsWalletClient::new(channel(&suite.wallet).await.unwrap());
    let mut reseller = ResellerBillingClient::new(channel(&suite.reseller).await.unwrap());
    let pricing = wpb::CreditPricing {
        mode: wpb::TierMode::Graduated as i32,
        tiers: vec![wpb::PriceTier {
            first: 1,
            last: 0,
            unit_price: "0.01".into(),
            flat_price: String::new(),
        }],
    };
    let rating = wpb::RatingRule {
        credits_per_recipient: "1".into(),
        per_mailing_surcharge: 0,
    };
    reseller
        .register_partner(authed(
            DEV_TOKEN,
            rpb::RegisterPartnerRequest {
                idempotency_key: "reg".into(),
                partner_id: "p1".into(),
                currency: "EUR".into(),
                funding: rpb::PartnerFunding::OnDemand as i32,
                payment_method: "pm_card_ok".into(),
                pricing: Some(pricing.clone()),
                rating: Some(rating.clone()),
            },
        ))
        .await
        .unwrap();
    reseller
        .add_customer(authed(
            DEV_TOKEN,
            rpb::AddCustomerRequest {
                idempotency_key: "add".into(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                billing_mode: rpb::BillingMode::PartnerPays as i32,
            },
        ))
        .await
        .unwrap();
    reseller
        .charge_mailing(authed(
            DEV_TOKEN,
            rpb::ChargeMailingRequest {
                idempotency_key: "send".into(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                mailing_id: "m1".into(),
                recipients: 100,
            },
        ))
        .await
        .unwrap();
    // Payments that fail, time out and are refused, and calls with a wrong token.
    for method in ["pm_card_declined", "pm_card_timeout", "pm_sepa_returned"] {
        let _ = wallet
            .purchase_credits(authed(
                DEV_TOKEN,
                wpb::PurchaseCreditsRequest {
                    idempotency_key: format!("buy-{method}"),
                    wallet_id: "partner:p1".into(),
                    credits: 10,
                    payment_method: method.into(),
                    expires_at: None,
                    expected_amount: None,
                },
            ))
            .await;
    }
    let refused = wallet
        .get_wallet(authed(
            WRONG_TOKEN,
            wpb::GetWalletRequest {
                wallet_id: "partner:p1".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    if postgres {
        // The wallet's connections cut under it: the calls that follow fail or reconnect, and
        // whatever the pool and the services log about it must not show the password.
        sqlx::any::install_default_drivers();
        let admin = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&db_url)
            .await
            .unwrap();
        let name = runtime::db::application_name(
            credits_wallet::DEFAULTS.name,
            &format!("{db_schema}_wallet"),
        );
        let cut: Vec<sqlx::any::AnyRow> = sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&name)
        .fetch_all(&admin)
        .await
        .unwrap();
        admin.close().await;
        assert!(!cut.is_empty(), "the wallet had connections to cut");
        for i in 0..3 {
            let _ = wallet
                .grant_credits(authed(
                    DEV_TOKEN,
                    wpb::GrantCreditsRequest {
                        idempotency_key: format!("grant-after-cut-{i}"),
                        wallet_id: "partner:p1".into(),
                        credits: 5,
                        kind: wpb::LotKind::Promotional as i32,
                        expires_at: None,
                        reference: "after the cut".into(),
                    },
                ))
                .await;
        }
    }
    suite.stop().await.unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("serving"), "the logs were captured");
    assert!(
        text.contains("\"request_id\""),
        "calls were logged with their request ids"
    );
    for secret in [
        DEV_TOKEN,
        WRONG_TOKEN,
        runtime::testing::ADMIN_TOKEN,
        "pm_card_ok",
        "pm_card_declined",
        "pm_card_timeout",
        "pm_sepa_returned",
        DB_PASSWORD,
    ] {
        assert!(!text.contains(secret), "{secret} appears in the logs");
    }
    if postgres {
        assert!(
            text.contains("failed to start") && text.contains("<redacted>"),
            "the failed start and the configuration were logged"
        );
        eprintln!(
            "secrets [postgres]: {} bytes of logs, database password absent (url, failed start, \
             cut connections)",
            text.len()
        );
    }
}
