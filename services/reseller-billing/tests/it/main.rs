//! reseller-billing with the real credits-wallet service beside it, both on `127.0.0.1:0`
//! with fresh databases on the run's backend. Each rule W1-W5 has a test that names it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod batch;
mod boundary;
mod routing;
mod safety;
mod upgrade;

use std::time::Duration;

use proto::{
    common::v1::{Event, WatchEventsRequest},
    reseller::v1::{self as pb, reseller_billing_client::ResellerBillingClient},
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::{
    Running,
    testing::{self, ADMIN_TOKEN, TestDatabase, authed},
};
use tonic::transport::Channel;

pub struct Harness {
    pub wallet: Running,
    pub reseller: Running,
    pub client: ResellerBillingClient<Channel>,
    pub wallets: CreditsWalletClient<Channel>,
    pub db: TestDatabase,
    key: std::sync::atomic::AtomicU64,
}

pub async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Starts a reseller service on `db` whose wallet peer is at `wallet_url`.
pub async fn start_reseller(db: &TestDatabase, wallet_url: &str, extra_tokens: &str) -> Running {
    let peer = format!("[peers.wallet]\nurl = \"{wallet_url}\"\ntoken = \"{ADMIN_TOKEN}\"\n");
    let mut config = testing::config_with(&reseller_billing::DEFAULTS, db, &peer);
    for spec in extra_tokens.split(',').filter(|s| !s.is_empty()) {
        let mut parts = spec.splitn(3, ':');
        let (name, token) = (parts.next().unwrap(), parts.next().unwrap());
        config.tokens.push(runtime::config::TokenConfig {
            name: name.replace('|', ":"),
            token: token.into(),
            scopes: vec![runtime::auth::Scope::Read, runtime::auth::Scope::Mutate],
        });
    }
    runtime::server::start(&reseller_billing::SPEC, config, reseller_billing::routes)
        .await
        .unwrap()
}

impl Harness {
    pub async fn start() -> Harness {
        let db = TestDatabase::fresh();
        let wallet_db = db.sibling("wallet");
        let wallet = runtime::server::start(
            &credits_wallet::SPEC,
            testing::config(&credits_wallet::DEFAULTS, &wallet_db),
            credits_wallet::routes,
        )
        .await
        .unwrap();
        let reseller = start_reseller(
            &db,
            &format!("http://{}", wallet.addr),
            "partner|p1:partner-one-token,partner|p2:partner-two-token",
        )
        .await;
        Harness {
            client: ResellerBillingClient::new(channel(reseller.addr).await),
            wallets: CreditsWalletClient::new(channel(wallet.addr).await),
            wallet,
            reseller,
            db,
            key: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn key(&self) -> String {
        format!(
            "k-{}",
            self.key.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    pub async fn register(
        &self,
        partner: &str,
        rate: &str,
        funding: pb::PartnerFunding,
        method: &str,
    ) -> pb::Partner {
        self.client
            .clone()
            .register_partner(authed(
                ADMIN_TOKEN,
                pb::RegisterPartnerRequest {
                    idempotency_key: self.key(),
                    partner_id: partner.into(),
                    currency: "EUR".into(),
                    funding: funding as i32,
                    payment_method: method.into(),
                    pricing: Some(pricing()),
                    rating: Some(wpb::RatingRule {
                        credits_per_recipient: rate.into(),
                        per_mailing_surcharge: 0,
                    }),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn add(&self, partner: &str, customer: &str, mode: pb::BillingMode) -> pb::Customer {
        self.client
            .clone()
            .add_customer(authed(
                ADMIN_TOKEN,
                pb::AddCustomerRequest {
                    idempotency_key: self.key(),
                    partner_id: partner.into(),
                    customer_id: customer.into(),
                    billing_mode: mode as i32,
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// Buys credits into a wallet directly at the wallet service.
    pub async fn buy(&self, wallet_id: &str, credits: u64) {
        let p = self
            .wallets
            .clone()
            .purchase_credits(authed(
                ADMIN_TOKEN,
                wpb::PurchaseCreditsRequest {
                    idempotency_key: self.key(),
                    wallet_id: wallet_id.into(),
                    credits,
                    payment_method: "pm_card_ok".into(),
                    expires_at: None,
                    expected_amount: None,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.status, wpb::PurchaseStatus::Succeeded as i32);
    }

    pub async fn charge_as(
        &self,
        token: &str,
        partner: &str,
        customer: &str,
        mailing: &str,
        recipients: u64,
    ) -> Result<pb::RoutedCharge, tonic::Status> {
        self.client
            .clone()
            .charge_mailing(authed(
                token,
                pb::ChargeMailingRequest {
                    idempotency_key: self.key(),
                    partner_id: partner.into(),
                    customer_id: customer.into(),
                    mailing_id: mailing.into(),
                    recipients,
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn charge(
        &self,
        partner: &str,
        customer: &str,
        mailing: &str,
        recipients: u64,
    ) -> Result<pb::RoutedCharge, tonic::Status> {
        self.charge_as(ADMIN_TOKEN, partner, customer, mailing, recipients)
            .await
    }

    pub async fn balance(&self, wallet_id: &str) -> i64 {
        self.wallets
            .clone()
            .get_wallet(authed(
                ADMIN_TOKEN,
                wpb::GetWalletRequest {
                    wallet_id: wallet_id.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .balance
    }

    pub async fn set_mode(
        &self,
        partner: &str,
        customer: &str,
        mode: pb::BillingMode,
    ) -> pb::Customer {
        self.client
            .clone()
            .set_billing_mode(authed(
                ADMIN_TOKEN,
                pb::SetBillingModeRequest {
                    idempotency_key: self.key(),
                    partner_id: partner.into(),
                    customer_id: customer.into(),
                    billing_mode: mode as i32,
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// This service's events of one type (waits until `at_least` arrived, at most 10 s).
    pub async fn events_of(&self, event_type: &str, at_least: usize) -> Vec<Event> {
        let stream = self
            .client
            .clone()
            .watch_events(authed(
                ADMIN_TOKEN,
                WatchEventsRequest {
                    after_cursor: 0,
                    types: vec![event_type.into()],
                },
            ))
            .await
            .unwrap()
            .into_inner();
        // Then anything more that is already there.
        testing::collect_events(stream, at_least, Duration::from_millis(300)).await
    }
}

/// Graduated: 1..10,000 at 0.010 EUR, beyond at 0.008.
pub fn pricing() -> wpb::CreditPricing {
    wpb::CreditPricing {
        mode: wpb::TierMode::Graduated as i32,
        tiers: vec![
            wpb::PriceTier {
                first: 1,
                last: 10_000,
                unit_price: "0.010".into(),
                flat_price: String::new(),
            },
            wpb::PriceTier {
                first: 10_001,
                last: 0,
                unit_price: "0.008".into(),
                flat_price: String::new(),
            },
        ],
    }
}
