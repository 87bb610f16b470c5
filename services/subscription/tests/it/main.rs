//! The subscription service, started for real on `127.0.0.1:0` with a fresh database on the
//! run's backend (`BILLING_TEST_BACKEND`) and the test clock, driven through its gRPC clients.
//! Each rule of DOMAIN.md (S1-S19) has a test that names it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod batches;
mod catalog;
mod crash;
mod payments;
mod replicas;
mod rules;
mod stripe;
mod wallet_grants;
mod wire;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proto::{
    common::v1::{Event, WatchEventsRequest, test_clock_client::TestClockClient},
    subscription::v1::{
        self as pb, catalog_client::CatalogClient, subscriptions_client::SubscriptionsClient,
    },
    wallet::v1::credits_wallet_client::CreditsWalletClient,
};
use runtime::{
    Running,
    testing::{self, ADMIN_TOKEN, TestDatabase, authed},
};
use tonic::transport::Channel;

/// A running subscription service (and, when asked, a real credits-wallet as its peer).
pub struct Harness {
    pub running: Running,
    pub subs: SubscriptionsClient<Channel>,
    pub catalog: CatalogClient<Channel>,
    pub clock: TestClockClient<Channel>,
    pub wallet: Option<(Running, CreditsWalletClient<Channel>)>,
    pub db: TestDatabase,
    key: std::sync::atomic::AtomicU64,
}

async fn channel(running: &Running) -> Channel {
    Channel::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with("", None, TestDatabase::fresh()).await
    }

    /// With a real credits-wallet as `[peers.wallet]`.
    pub async fn start_with_wallet() -> Harness {
        Self::start_with_wallet_on(TestDatabase::fresh()).await
    }

    /// [`Harness::start_with_wallet`] on `db` (the wallet on its sibling `wallet`).
    pub async fn start_with_wallet_on(db: TestDatabase) -> Harness {
        let wallet_db = db.sibling("wallet");
        let wallet = runtime::server::start(
            &credits_wallet::SPEC,
            testing::config(&credits_wallet::DEFAULTS, &wallet_db),
            credits_wallet::routes,
        )
        .await
        .unwrap();
        let peer = format!(
            "[peers.wallet]\nurl = \"http://{}\"\ntoken = \"{ADMIN_TOKEN}\"\n",
            wallet.addr
        );
        let client = CreditsWalletClient::new(channel(&wallet).await);
        Self::start_with(&peer, Some((wallet, client)), db).await
    }

    /// Another replica of the service on `db` (e.g. [`TestDatabase::share`] of a running one).
    /// Its idempotency keys differ from the first replica's.
    pub async fn start_on(db: TestDatabase) -> Harness {
        let h = Self::start_with("", None, db).await;
        h.key.store(1_000_000, std::sync::atomic::Ordering::Relaxed);
        h
    }

    async fn start_with(
        extra: &str,
        wallet: Option<(Running, CreditsWalletClient<Channel>)>,
        db: TestDatabase,
    ) -> Harness {
        let running = runtime::server::start(
            &subscription::SPEC,
            testing::config_with(&subscription::DEFAULTS, &db, extra),
            subscription::routes,
        )
        .await
        .unwrap();
        let ch = channel(&running).await;
        Harness {
            running,
            subs: SubscriptionsClient::new(ch.clone()),
            catalog: CatalogClient::new(ch.clone()),
            clock: TestClockClient::new(ch),
            wallet,
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

    pub async fn publish(&self, spec: pb::PlanSpec) -> pb::Plan {
        self.catalog
            .clone()
            .publish_plan(authed(
                ADMIN_TOKEN,
                pb::PublishPlanRequest {
                    idempotency_key: self.key(),
                    plan: Some(spec),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn subscribe(
        &self,
        account: &str,
        plan: &str,
        contacts: u64,
        payment: pb::Payment,
    ) -> Result<pb::Subscription, tonic::Status> {
        self.subs
            .clone()
            .subscribe(authed(
                ADMIN_TOKEN,
                pb::SubscribeRequest {
                    idempotency_key: self.key(),
                    actor: Some(admin_user()),
                    account_id: account.into(),
                    plan_id: plan.into(),
                    contacts,
                    seats: 1,
                    add_ons: vec![],
                    payment: Some(payment),
                    vat_rate: "0.21".into(),
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get(&self, account: &str) -> pb::Subscription {
        self.subs
            .clone()
            .get_subscription(authed(
                ADMIN_TOKEN,
                pb::GetSubscriptionRequest {
                    actor: Some(admin_user()),
                    account_id: account.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn invoices(&self, account: &str) -> Vec<pb::Invoice> {
        self.subs
            .clone()
            .list_invoices(authed(
                ADMIN_TOKEN,
                pb::ListInvoicesRequest {
                    actor: None,
                    account_id: account.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .invoices
    }

    pub async fn admit(&self, account: &str, n: u64) -> pb::AdmitContactsResponse {
        self.subs
            .clone()
            .admit_contacts(authed(
                ADMIN_TOKEN,
                pb::AdmitContactsRequest {
                    idempotency_key: self.key(),
                    actor: None,
                    account_id: account.into(),
                    contacts: n,
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn check(&self, account: &str, mails: u64) -> pb::SendingDecision {
        self.subs
            .clone()
            .check_sending(authed(
                ADMIN_TOKEN,
                pb::CheckSendingRequest {
                    actor: None,
                    account_id: account.into(),
                    mails,
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn preview(
        &self,
        account: &str,
        change: pb::change::Kind,
    ) -> Result<pb::ChangePreview, tonic::Status> {
        self.subs
            .clone()
            .preview_change(authed(
                ADMIN_TOKEN,
                pb::PreviewChangeRequest {
                    actor: Some(admin_user()),
                    account_id: account.into(),
                    change: Some(pb::Change { kind: Some(change) }),
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn apply(
        &self,
        account: &str,
        change: pb::change::Kind,
        token: &str,
    ) -> Result<pb::ApplyChangeResponse, tonic::Status> {
        self.subs
            .clone()
            .apply_change(authed(
                ADMIN_TOKEN,
                pb::ApplyChangeRequest {
                    idempotency_key: self.key(),
                    actor: Some(admin_user()),
                    account_id: account.into(),
                    change: Some(pb::Change { kind: Some(change) }),
                    preview_token: token.into(),
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Preview then apply.
    pub async fn change(
        &self,
        account: &str,
        change: pb::change::Kind,
    ) -> Result<pb::ApplyChangeResponse, tonic::Status> {
        let p = self.preview(account, change.clone()).await?;
        self.apply(account, change, &p.preview_token).await
    }

    pub async fn verify(&self, account: &str) {
        self.subs
            .clone()
            .verify_account(authed(
                ADMIN_TOKEN,
                pb::VerifyAccountRequest {
                    idempotency_key: self.key(),
                    actor: None,
                    account_id: account.into(),
                },
            ))
            .await
            .unwrap();
    }

    pub async fn start_trial(&self, account: &str, plan: &str, contacts: u64) -> pb::Subscription {
        self.subs
            .clone()
            .start_trial(authed(
                ADMIN_TOKEN,
                pb::StartTrialRequest {
                    idempotency_key: self.key(),
                    actor: Some(admin_user()),
                    account_id: account.into(),
                    plan_id: plan.into(),
                    contacts,
                    terms_override: None,
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.running.platform.clock.now()
    }

    /// Moves the test clock to `to`.
    pub async fn advance_to(&self, to: DateTime<Utc>) {
        let to = DateTime::from_timestamp(to.timestamp(), 0).unwrap();
        testing::advance_clock(&self.clock, to).await;
    }

    /// Moves the test clock forward by `seconds`.
    pub async fn advance(&self, seconds: i64) {
        self.advance_to(self.now() + chrono::Duration::seconds(seconds))
            .await;
    }

    /// Polls GetSubscription until `pred` holds (background jobs), at most 10 s.
    pub async fn wait_for(
        &self,
        account: &str,
        pred: impl Fn(&pb::Subscription) -> bool,
    ) -> pb::Subscription {
        testing::poll_until(|| self.get(account), pred)
            .await
            .unwrap_or_else(|s| panic!("condition never held; subscription is {s:?}"))
    }

    /// Every event so far (waits until `at_least` have arrived, at most 10 s).
    pub async fn events(&self, at_least: usize) -> Vec<Event> {
        let stream = self
            .subs
            .clone()
            .watch_events(authed(ADMIN_TOKEN, WatchEventsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        testing::collect_events(stream, at_least, Duration::from_millis(600)).await
    }

    /// Events of one type (at least `at_least`, waiting up to 10 s).
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
}

/// Opens the account's wallet (1 credit per recipient, 0.01 EUR per credit).
pub async fn open_wallet(wallet: &CreditsWalletClient<Channel>, account: &str) {
    wallet
        .clone()
        .open_wallet(authed(
            ADMIN_TOKEN,
            proto::wallet::v1::OpenWalletRequest {
                idempotency_key: format!("w-{account}"),
                wallet_id: account.into(),
                currency: "EUR".into(),
                pricing: Some(proto::wallet::v1::CreditPricing {
                    mode: proto::wallet::v1::TierMode::Volume as i32,
                    tiers: vec![proto::wallet::v1::PriceTier {
                        first: 1,
                        last: 0,
                        unit_price: "0.01".into(),
                        flat_price: String::new(),
                    }],
                }),
                rating: Some(proto::wallet::v1::RatingRule {
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

/// A user with billing permission (the primary admin).
pub fn admin_user() -> pb::Actor {
    pb::Actor {
        user_id: "u-admin".into(),
        billing_permission: true,
    }
}

pub fn card(token: &str) -> pb::Payment {
    pb::Payment {
        kind: pb::PaymentKind::Card as i32,
        payment_method: token.into(),
    }
}

pub fn bank() -> pb::Payment {
    pb::Payment {
        kind: pb::PaymentKind::BankTransfer as i32,
        payment_method: String::new(),
    }
}

pub fn utc(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
}

/// Graduated tiers (S3): the first 10,000 contacts at 0.006 EUR each, the rest at 0.005, so 5,000
/// contacts cost 30.00 and 10,000 cost 60.00 a month; slider 1,000..50,000 by 1,000; one seat
/// included, extra seats 5.00; add-on SMS 9.99; S7 proration; downgrades and add-on removal
/// self-serve; a 30-day trial with 200 free mails; 1,000 credits a month.
pub fn plan_spec(plan_id: &str) -> pb::PlanSpec {
    pb::PlanSpec {
        plan_id: plan_id.into(),
        name: "Email".into(),
        product: pb::Product::Marketing as i32,
        level: Some(pb::Level {
            name: "starter".into(),
            rank: 1,
        }),
        interval: pb::Interval::Month as i32,
        currency: "EUR".into(),
        contact_tiers: Some(pb::ContactTiers {
            mode: pb::TierMode::Graduated as i32,
            tiers: vec![
                pb::PriceTier {
                    first: 1,
                    last: 10_000,
                    unit_price: "0.006".into(),
                    flat_price: String::new(),
                },
                pb::PriceTier {
                    first: 10_001,
                    last: 0,
                    unit_price: "0.005".into(),
                    flat_price: String::new(),
                },
            ],
        }),
        slider: Some(pb::Slider {
            min: 1_000,
            max: 50_000,
            step: 1_000,
        }),
        included_seats: 1,
        seat_price: "5".into(),
        add_ons: vec![pb::AddOn {
            code: "sms".into(),
            name: "SMS".into(),
            price: "9.99".into(),
        }],
        proration: pb::ProrationPolicy::ProrateToCycleEnd as i32,
        self_serve: Some(pb::SelfServe {
            downgrade: true,
            remove_add_on: true,
            change_product: false,
            unbundle: false,
        }),
        trial: Some(pb::TrialTerms {
            days: 30,
            contact_cap: 0,
            free_mails: 200,
        }),
        monthly_credits: 1_000,
    }
}
