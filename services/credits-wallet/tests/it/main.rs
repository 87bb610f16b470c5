//! The credits-wallet service, started for real on `127.0.0.1:0` with a fresh database on the
//! run's backend (`BILLING_TEST_BACKEND`) and the test clock, driven through its gRPC client.
//! Each rule of DOMAIN.md (C1-C9) has a test that names it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod batch;
mod concurrency;
mod crash;
mod events_out;
mod holds;
mod idempotency;
mod properties;
mod rules;
mod stripe;
mod verify;

use std::time::Duration;

use proto::{
    common::v1::{Event, WatchEventsRequest, test_clock_client::TestClockClient},
    wallet::v1::{self as pb, credits_wallet_client::CreditsWalletClient},
};
use runtime::{
    Running,
    testing::{self, ADMIN_TOKEN, TestDatabase, authed},
};
use sqlx::Row;
use tonic::transport::Channel;

/// A running wallet service and a client with every scope.
pub struct Harness {
    pub running: Running,
    pub client: CreditsWalletClient<Channel>,
    pub clock: TestClockClient<Channel>,
    pub db: TestDatabase,
    key: std::sync::atomic::AtomicU64,
}

impl Harness {
    pub async fn start() -> Harness {
        let db = TestDatabase::fresh();
        Self::start_on(db).await
    }

    pub async fn start_on(db: TestDatabase) -> Harness {
        Self::start_with(db, "").await
    }

    /// With extra TOML settings (e.g. the payment provider).
    pub async fn start_with(db: TestDatabase, extra_toml: &str) -> Harness {
        let running = runtime::server::start(
            &credits_wallet::SPEC,
            testing::config_with(&credits_wallet::DEFAULTS, &db, extra_toml),
            credits_wallet::routes,
        )
        .await
        .unwrap();
        let channel = Channel::from_shared(format!("http://{}", running.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Harness {
            running,
            client: CreditsWalletClient::new(channel.clone()),
            clock: TestClockClient::new(channel),
            db,
            key: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A fresh idempotency key.
    pub fn key(&self) -> String {
        format!(
            "k-{}",
            self.key.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    /// A wallet in EUR with the standard price list and `rate` credits per recipient.
    pub async fn open(&self, wallet_id: &str, rate: &str, signup: u64) -> pb::Wallet {
        self.client
            .clone()
            .open_wallet(authed(
                ADMIN_TOKEN,
                pb::OpenWalletRequest {
                    idempotency_key: self.key(),
                    wallet_id: wallet_id.into(),
                    currency: "EUR".into(),
                    pricing: Some(standard_pricing()),
                    rating: Some(pb::RatingRule {
                        credits_per_recipient: rate.into(),
                        per_mailing_surcharge: 0,
                    }),
                    signup_credits: signup,
                    signup_credits_expire_at: None,
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn wallet(&self, wallet_id: &str) -> pb::Wallet {
        self.client
            .clone()
            .get_wallet(authed(
                ADMIN_TOKEN,
                pb::GetWalletRequest {
                    wallet_id: wallet_id.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn grant(&self, wallet_id: &str, credits: u64) -> pb::WalletChange {
        self.client
            .clone()
            .grant_credits(authed(
                ADMIN_TOKEN,
                pb::GrantCreditsRequest {
                    idempotency_key: self.key(),
                    wallet_id: wallet_id.into(),
                    credits,
                    kind: pb::LotKind::Promotional as i32,
                    expires_at: None,
                    reference: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn charge(
        &self,
        wallet_id: &str,
        mailing: &str,
        recipients: u64,
    ) -> Result<pb::MailingCharge, tonic::Status> {
        self.client
            .clone()
            .charge_mailing(authed(
                ADMIN_TOKEN,
                pb::ChargeMailingRequest {
                    idempotency_key: self.key(),
                    wallet_id: wallet_id.into(),
                    mailing_id: mailing.into(),
                    recipients,
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn reserve(
        &self,
        wallet_id: &str,
        mailing: &str,
        recipients: u64,
        ttl_seconds: u32,
    ) -> Result<pb::Reservation, tonic::Status> {
        self.client
            .clone()
            .reserve_credits(authed(
                ADMIN_TOKEN,
                pb::ReserveCreditsRequest {
                    idempotency_key: self.key(),
                    wallet_id: wallet_id.into(),
                    mailing_id: mailing.into(),
                    recipients,
                    ttl_seconds,
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn purchase(&self, wallet_id: &str, credits: u64, method: &str) -> pb::Purchase {
        self.client
            .clone()
            .purchase_credits(authed(
                ADMIN_TOKEN,
                pb::PurchaseCreditsRequest {
                    idempotency_key: self.key(),
                    wallet_id: wallet_id.into(),
                    credits,
                    payment_method: method.into(),
                    expires_at: None,
                    expected_amount: None,
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn auto_top_up(
        &self,
        wallet_id: &str,
        top_up: pb::AutoTopUp,
        method: &str,
    ) -> pb::Wallet {
        self.client
            .clone()
            .configure_auto_top_up(authed(
                ADMIN_TOKEN,
                pb::ConfigureAutoTopUpRequest {
                    idempotency_key: self.key(),
                    wallet_id: wallet_id.into(),
                    auto_top_up: Some(top_up),
                    payment_method: method.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn ledger(&self, wallet_id: &str) -> Vec<pb::LedgerEntry> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .client
                .clone()
                .list_ledger_entries(authed(
                    ADMIN_TOKEN,
                    pb::ListLedgerEntriesRequest {
                        wallet_id: wallet_id.into(),
                        page_size: 500,
                        page_token: token,
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            all.extend(page.entries);
            if page.next_page_token.is_empty() {
                return all;
            }
            token = page.next_page_token;
        }
    }

    /// Moves the test clock forward by `seconds`.
    pub async fn advance(&self, seconds: i64) {
        let now = self.running.platform.clock.now();
        let to = chrono::DateTime::from_timestamp(now.timestamp() + seconds, 0).unwrap();
        testing::advance_clock(&self.clock, to).await;
    }

    /// Every event so far (waits until `at_least` have arrived, at most 10 s).
    pub async fn events(&self, at_least: usize) -> Vec<Event> {
        let stream = self
            .client
            .clone()
            .watch_events(authed(ADMIN_TOKEN, WatchEventsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        testing::collect_events(stream, at_least, Duration::from_millis(600)).await
    }

    /// Events of one type.
    pub async fn events_of(&self, event_type: &str, at_least: usize) -> Vec<Event> {
        let mut found = Vec::new();
        for _ in 0..3 {
            found = self
                .events(0)
                .await
                .into_iter()
                .filter(|e| e.r#type == event_type)
                .collect();
            if found.len() >= at_least {
                break;
            }
        }
        found
    }

    /// Polls `GetWallet` until `pred` holds (background jobs run asynchronously), at most 10 s.
    pub async fn wait_for(
        &self,
        wallet_id: &str,
        pred: impl Fn(&pb::Wallet) -> bool,
    ) -> pb::Wallet {
        testing::poll_until(|| self.wallet(wallet_id), pred)
            .await
            .unwrap_or_else(|w| panic!("condition never held; wallet is {w:?}"))
    }

    /// The ledger invariant, read straight from the database: balance = sum of the ledger =
    /// sum of lot credits - debt, and no lot below zero.
    pub async fn assert_ledger_balances(&self, wallet_id: &str) {
        let db = &self.running.platform.db;
        let row = sqlx::query("SELECT balance, debt FROM wallets WHERE wallet_id = $1")
            .bind(wallet_id)
            .fetch_one(db.pool())
            .await
            .unwrap();
        let balance: i64 = row.get(0);
        let debt: i64 = row.get(1);
        let mut conn = db.pool().acquire().await.unwrap();
        let sum = credits_wallet::store::ledger_sum(&mut conn, wallet_id)
            .await
            .unwrap();
        let lots: i64 = credits_wallet::store::lots_with_credits(&mut conn, wallet_id)
            .await
            .unwrap()
            .iter()
            .map(|(l, _)| l.remaining)
            .sum();
        let negative: i64 = sqlx::query("SELECT COUNT(*) FROM credit_lots WHERE remaining < 0")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(balance, sum, "balance equals the sum of the ledger");
        assert_eq!(balance, lots - debt, "balance equals lots minus debt");
        assert_eq!(negative, 0);
    }
}

/// Graduated (C1): credits 1..10,000 at 0.010 EUR, 10,001..50,000 at 0.008, beyond at 0.006,
/// so larger purchases pay less per credit (50,000 credits cost 420.00 EUR).
pub fn standard_pricing() -> pb::CreditPricing {
    let tier = |first, last, price: &str| pb::PriceTier {
        first,
        last,
        unit_price: price.into(),
        flat_price: String::new(),
    };
    pb::CreditPricing {
        mode: pb::TierMode::Graduated as i32,
        tiers: vec![
            tier(1, 10_000, "0.010"),
            tier(10_001, 50_000, "0.008"),
            tier(50_001, 0, "0.006"),
        ],
    }
}
