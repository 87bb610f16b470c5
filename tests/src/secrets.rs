//! No secret (bearer token, payment-method token) appears in the logs of a full run across
//! the three services: the logs are captured at the production filter, with this suite's own
//! crates at debug, while every service handles real calls, refused calls and payments.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use proto::{
    reseller::v1::{self as rpb, reseller_billing_client::ResellerBillingClient},
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::testing::authed;
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

    let suite = Suite::start_with_dev_token(DEV_TOKEN).await.unwrap();
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
    ] {
        assert!(!text.contains(secret), "{secret} appears in the logs");
    }
}
