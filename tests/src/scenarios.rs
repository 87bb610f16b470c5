//! One scenario per help-centre page in `../shared/seeds/`, played end to end through the
//! three real services, their gRPC clients and the test clock (all three clocks start at the
//! same instant and are moved together).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::atomic::AtomicU64, time::Duration};

use chrono::{DateTime, Utc};
use proto::{
    common::v1::test_clock_client::TestClockClient,
    reseller::v1::{self as rpb, reseller_billing_client::ResellerBillingClient},
    subscription::v1::{
        self as spb, catalog_client::CatalogClient, subscriptions_client::SubscriptionsClient,
    },
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::testing::{self, ADMIN_TOKEN, authed};
use tonic::{Code, transport::Channel};

use crate::{Suite, channel};

struct World {
    suite: Suite,
    wallet: CreditsWalletClient<Channel>,
    subs: SubscriptionsClient<Channel>,
    catalog: CatalogClient<Channel>,
    reseller: ResellerBillingClient<Channel>,
    clocks: Vec<TestClockClient<Channel>>,
    key: AtomicU64,
}

fn billing_admin() -> Option<spb::Actor> {
    Some(spb::Actor {
        user_id: "primary-admin".into(),
        billing_permission: true,
    })
}

fn card(token: &str) -> Option<spb::Payment> {
    Some(spb::Payment {
        kind: spb::PaymentKind::Card as i32,
        payment_method: token.into(),
    })
}

fn graduated(tiers: &[(u64, u64, &str)]) -> wpb::CreditPricing {
    wpb::CreditPricing {
        mode: wpb::TierMode::Graduated as i32,
        tiers: tiers
            .iter()
            .map(|(first, last, price)| wpb::PriceTier {
                first: *first,
                last: *last,
                unit_price: (*price).into(),
                flat_price: String::new(),
            })
            .collect(),
    }
}

/// A monthly marketing plan: graduated contact tiers on a 1,000..50,000 slider, one included
/// seat at 5.00 per extra seat, an SMS add-on, 1,000 monthly credits.
pub(crate) fn plan(plan_id: &str) -> spb::PlanSpec {
    spb::PlanSpec {
        plan_id: plan_id.into(),
        name: "Email marketing".into(),
        product: spb::Product::Marketing as i32,
        level: Some(spb::Level {
            name: "starter".into(),
            rank: 1,
        }),
        interval: spb::Interval::Month as i32,
        currency: "EUR".into(),
        contact_tiers: Some(spb::ContactTiers {
            mode: spb::TierMode::Graduated as i32,
            tiers: graduated(&[(1, 10_000, "0.006"), (10_001, 0, "0.005")])
                .tiers
                .into_iter()
                .map(|t| spb::PriceTier {
                    first: t.first,
                    last: t.last,
                    unit_price: t.unit_price,
                    flat_price: t.flat_price,
                })
                .collect(),
        }),
        slider: Some(spb::Slider {
            min: 1_000,
            max: 50_000,
            step: 1_000,
        }),
        included_seats: 1,
        seat_price: "5".into(),
        add_ons: vec![spb::AddOn {
            code: "sms".into(),
            name: "SMS".into(),
            price: "9.99".into(),
        }],
        proration: spb::ProrationPolicy::ProrateToCycleEnd as i32,
        self_serve: Some(spb::SelfServe {
            downgrade: true,
            remove_add_on: true,
            change_product: false,
            unbundle: false,
        }),
        trial: Some(spb::TrialTerms {
            days: 30,
            contact_cap: 0,
            free_mails: 200,
        }),
        monthly_credits: 1_000,
    }
}

impl World {
    async fn start() -> World {
        let suite = Suite::start().await.unwrap();
        let w = channel(&suite.wallet).await.unwrap();
        let s = channel(&suite.subscription).await.unwrap();
        let r = channel(&suite.reseller).await.unwrap();
        World {
            wallet: CreditsWalletClient::new(w.clone()),
            subs: SubscriptionsClient::new(s.clone()),
            catalog: CatalogClient::new(s.clone()),
            reseller: ResellerBillingClient::new(r.clone()),
            clocks: vec![
                TestClockClient::new(w),
                TestClockClient::new(s),
                TestClockClient::new(r),
            ],
            suite,
            key: AtomicU64::new(0),
        }
    }

    fn key(&self) -> String {
        format!(
            "scenario-{}",
            self.key.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    fn now(&self) -> DateTime<Utc> {
        self.suite.subscription.platform.clock.now()
    }

    /// Moves every service's test clock to the same instant.
    async fn advance_days(&self, days: i64) {
        let to = self.now() + chrono::Duration::days(days);
        for clock in &self.clocks {
            testing::advance_clock(clock, to).await;
        }
    }

    async fn publish(&self, spec: spb::PlanSpec) {
        self.catalog
            .clone()
            .publish_plan(authed(
                ADMIN_TOKEN,
                spb::PublishPlanRequest {
                    idempotency_key: self.key(),
                    plan: Some(spec),
                },
            ))
            .await
            .unwrap();
    }

    async fn open_wallet(&self, wallet_id: &str, rate: &str, signup: u64) {
        self.wallet
            .clone()
            .open_wallet(authed(
                ADMIN_TOKEN,
                wpb::OpenWalletRequest {
                    idempotency_key: self.key(),
                    wallet_id: wallet_id.into(),
                    currency: "EUR".into(),
                    pricing: Some(graduated(&[(1, 10_000, "0.010"), (10_001, 0, "0.008")])),
                    rating: Some(wpb::RatingRule {
                        credits_per_recipient: rate.into(),
                        per_mailing_surcharge: 0,
                    }),
                    signup_credits: signup,
                    signup_credits_expire_at: None,
                },
            ))
            .await
            .unwrap();
    }

    async fn wallet_state(&self, wallet_id: &str) -> wpb::Wallet {
        self.wallet
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
    }

    async fn wait_wallet(
        &self,
        wallet_id: &str,
        pred: impl Fn(&wpb::Wallet) -> bool,
    ) -> wpb::Wallet {
        testing::poll_until(|| self.wallet_state(wallet_id), pred)
            .await
            .unwrap_or_else(|w| panic!("wallet {wallet_id} never reached the state: {w:?}"))
    }

    async fn subscription(&self, account: &str) -> spb::Subscription {
        self.subs
            .clone()
            .get_subscription(authed(
                ADMIN_TOKEN,
                spb::GetSubscriptionRequest {
                    actor: billing_admin(),
                    account_id: account.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn wait_subscription(
        &self,
        account: &str,
        pred: impl Fn(&spb::Subscription) -> bool,
    ) -> spb::Subscription {
        testing::poll_until(|| self.subscription(account), pred)
            .await
            .unwrap_or_else(|s| panic!("subscription {account} never reached the state: {s:?}"))
    }

    async fn may_send(&self, account: &str, mails: u64) -> spb::SendingDecision {
        self.subs
            .clone()
            .check_sending(authed(
                ADMIN_TOKEN,
                spb::CheckSendingRequest {
                    actor: None,
                    account_id: account.into(),
                    mails,
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn subscribe(
        &self,
        account: &str,
        plan: &str,
        contacts: u64,
        payment: Option<spb::Payment>,
    ) -> Result<spb::Subscription, tonic::Status> {
        self.subs
            .clone()
            .subscribe(authed(
                ADMIN_TOKEN,
                spb::SubscribeRequest {
                    idempotency_key: self.key(),
                    actor: billing_admin(),
                    account_id: account.into(),
                    plan_id: plan.into(),
                    contacts,
                    seats: 1,
                    add_ons: vec![],
                    payment,
                    vat_rate: "0.21".into(),
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    async fn start_trial(&self, account: &str, plan: &str) {
        self.subs
            .clone()
            .start_trial(authed(
                ADMIN_TOKEN,
                spb::StartTrialRequest {
                    idempotency_key: self.key(),
                    actor: billing_admin(),
                    account_id: account.into(),
                    plan_id: plan.into(),
                    contacts: 0,
                    terms_override: None,
                },
            ))
            .await
            .unwrap();
    }

    async fn verify(&self, account: &str) {
        self.subs
            .clone()
            .verify_account(authed(
                ADMIN_TOKEN,
                spb::VerifyAccountRequest {
                    idempotency_key: self.key(),
                    actor: None,
                    account_id: account.into(),
                },
            ))
            .await
            .unwrap();
    }

    async fn admit(&self, account: &str, contacts: u64) -> spb::AdmitContactsResponse {
        self.subs
            .clone()
            .admit_contacts(authed(
                ADMIN_TOKEN,
                spb::AdmitContactsRequest {
                    idempotency_key: self.key(),
                    actor: None,
                    account_id: account.into(),
                    contacts,
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn preview(
        &self,
        account: &str,
        actor: Option<spb::Actor>,
        kind: spb::change::Kind,
    ) -> Result<spb::ChangePreview, tonic::Status> {
        self.subs
            .clone()
            .preview_change(authed(
                ADMIN_TOKEN,
                spb::PreviewChangeRequest {
                    actor,
                    account_id: account.into(),
                    change: Some(spb::Change { kind: Some(kind) }),
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    async fn apply(&self, account: &str, preview: &spb::ChangePreview) -> spb::ApplyChangeResponse {
        self.subs
            .clone()
            .apply_change(authed(
                ADMIN_TOKEN,
                spb::ApplyChangeRequest {
                    idempotency_key: self.key(),
                    actor: billing_admin(),
                    account_id: account.into(),
                    change: preview.change.clone(),
                    preview_token: preview.preview_token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn stop(self) {
        self.suite.stop().await.unwrap();
    }
}

fn amount(m: &Option<proto::common::v1::Money>) -> String {
    m.as_ref().map(|m| m.amount.clone()).unwrap_or_default()
}

/// Seed 000: a 30-day trial with 200 free mails; conversion keeps everything; a bank-transfer
/// customer cannot send until the transfer is recorded; an upgrade that restarts the period
/// with a credit for the unused remainder.
#[tokio::test]
async fn seed_000_trial_conversion_bank_transfer_and_restarting_upgrade() {
    let w = World::start().await;
    w.publish(plan("email")).await;
    w.open_wallet("shop", "1", 0).await;

    // rule S14: 30 days and 200 free mails.
    w.start_trial("shop", "email").await;
    assert!(w.may_send("shop", 150).await.allowed);
    w.subs
        .clone()
        .record_mails_sent(authed(
            ADMIN_TOKEN,
            spb::RecordMailsSentRequest {
                idempotency_key: w.key(),
                actor: None,
                account_id: "shop".into(),
                mails: 150,
            },
        ))
        .await
        .unwrap();
    let over = w.may_send("shop", 100).await;
    assert!(!over.allowed);
    assert_eq!(over.refusal, spb::SendingRefusal::TrialMailCap as i32);
    assert_eq!(over.trial_mails_left, 50);

    // rule S17: the contacts gathered during the trial stay after conversion.
    w.admit("shop", 800).await;
    w.subscribe("shop", "email", 2_000, card("pm_card_ok"))
        .await
        .unwrap();
    w.verify("shop").await;
    w.advance_days(31).await;
    let s = w
        .wait_subscription("shop", |s| {
            s.status == spb::SubscriptionStatus::Active as i32
        })
        .await;
    assert_eq!(s.usage.unwrap().active, 800);
    assert_eq!(s.contacts, 2_000);
    // The plan's monthly credits arrived in the account's wallet.
    w.wait_wallet("shop", |w| w.balance == 1_000).await;

    // rule S18: paying by bank transfer gives access, but sending only once paid.
    w.subscribe(
        "agency",
        "email",
        5_000,
        Some(spb::Payment {
            kind: spb::PaymentKind::BankTransfer as i32,
            payment_method: String::new(),
        }),
    )
    .await
    .unwrap();
    let unpaid = w.may_send("agency", 10).await;
    assert!(!unpaid.allowed);
    assert_eq!(
        unpaid.refusal,
        spb::SendingRefusal::BankTransferUnpaid as i32
    );
    let invoices = w
        .subs
        .clone()
        .list_invoices(authed(
            ADMIN_TOKEN,
            spb::ListInvoicesRequest {
                actor: None,
                account_id: "agency".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .invoices;
    w.subs
        .clone()
        .record_bank_transfer(authed(
            ADMIN_TOKEN,
            spb::RecordBankTransferRequest {
                idempotency_key: w.key(),
                actor: None,
                invoice_id: invoices[0].invoice_id.clone(),
                amount: invoices[0].total.clone(),
            },
        ))
        .await
        .unwrap();
    assert!(w.may_send("agency", 10).await.allowed);

    // rule S8: a plan that restarts the period on upgrade credits the unused remainder.
    let mut restart = plan("email-restart");
    restart.proration = spb::ProrationPolicy::RestartPeriod as i32;
    w.publish(restart).await;
    w.subscribe("studio", "email-restart", 5_000, card("pm_card_ok"))
        .await
        .unwrap();
    w.advance_days(10).await;
    let preview = w
        .preview(
            "studio",
            billing_admin(),
            spb::change::Kind::Contacts(10_000),
        )
        .await
        .unwrap();
    assert!(
        preview
            .lines
            .iter()
            .any(|l| l.amount.as_ref().is_some_and(|a| a.amount.starts_with('-'))),
        "a credit line for the unused remainder: {:?}",
        preview.lines
    );
    let applied = w.apply("studio", &preview).await;
    assert_eq!(
        amount(&applied.invoice.as_ref().unwrap().total),
        amount(&preview.amount_due_today)
    );
    let s = applied.subscription.unwrap();
    assert_eq!(
        s.current_period_start.unwrap().seconds,
        w.now().timestamp(),
        "a new full period starts on the day of the upgrade"
    );
    w.stop().await;
}

/// Seed 001: a partner with 50,000 prepaid credits and several partner-pays customers; a
/// reminder below the partner's threshold; automatic re-purchase when used up; an on-demand
/// partner charged for 5,250 credits for 5,000 recipients.
#[tokio::test]
async fn seed_001_partner_credits_reminder_re_purchase_and_on_demand() {
    let w = World::start().await;
    let mut r = w.reseller.clone();
    let register =
        |partner: &str, funding: rpb::PartnerFunding, rate: &str| rpb::RegisterPartnerRequest {
            idempotency_key: format!("reg-{partner}"),
            partner_id: partner.into(),
            currency: "EUR".into(),
            funding: funding as i32,
            payment_method: "pm_card_ok".into(),
            pricing: Some(graduated(&[(1, 10_000, "0.010"), (10_001, 0, "0.008")])),
            rating: Some(wpb::RatingRule {
                credits_per_recipient: rate.into(),
                per_mailing_surcharge: 0,
            }),
        };
    r.register_partner(authed(
        ADMIN_TOKEN,
        register("agency", rpb::PartnerFunding::Prepaid, "1"),
    ))
    .await
    .unwrap();
    // rule W3, W4 (C1): the partner buys 50,000 credits at volume prices.
    let bought = w
        .wallet
        .clone()
        .purchase_credits(authed(
            ADMIN_TOKEN,
            wpb::PurchaseCreditsRequest {
                idempotency_key: w.key(),
                wallet_id: "partner:agency".into(),
                credits: 50_000,
                payment_method: String::new(),
                expires_at: None,
                expected_amount: None,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&bought.amount), "420.00");
    for c in ["bakery", "florist", "garage"] {
        r.add_customer(authed(
            ADMIN_TOKEN,
            rpb::AddCustomerRequest {
                idempotency_key: format!("add-{c}"),
                partner_id: "agency".into(),
                customer_id: c.into(),
                billing_mode: rpb::BillingMode::PartnerPays as i32,
            },
        ))
        .await
        .unwrap();
    }
    // rule W4: a reminder at 10,000 and re-purchase of 30,000 when used up.
    r.configure_partner_reminder(authed(
        ADMIN_TOKEN,
        rpb::ConfigurePartnerReminderRequest {
            idempotency_key: w.key(),
            partner_id: "agency".into(),
            threshold: 10_000,
        },
    ))
    .await
    .unwrap();
    r.configure_partner_auto_top_up(authed(
        ADMIN_TOKEN,
        rpb::ConfigurePartnerAutoTopUpRequest {
            idempotency_key: w.key(),
            partner_id: "agency".into(),
            auto_top_up: Some(wpb::AutoTopUp {
                mode: wpb::AutoTopUpMode::Fixed as i32,
                threshold: 0,
                amount: 30_000,
                ..Default::default()
            }),
            payment_method: String::new(),
        },
    ))
    .await
    .unwrap();
    let send = |customer: &str, mailing: &str, recipients: u64| rpb::ChargeMailingRequest {
        idempotency_key: format!("{customer}-{mailing}"),
        partner_id: "agency".into(),
        customer_id: customer.into(),
        mailing_id: mailing.into(),
        recipients,
    };
    // rule W2, W3: each send is deducted from the partner's credits at once.
    let first = r
        .charge_mailing(authed(ADMIN_TOKEN, send("bakery", "m1", 5_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.payer_balance_after, 45_000);
    r.charge_mailing(authed(ADMIN_TOKEN, send("florist", "m1", 20_000)))
        .await
        .unwrap();
    r.charge_mailing(authed(ADMIN_TOKEN, send("garage", "m1", 16_000)))
        .await
        .unwrap(); // 9,000 left
    assert_eq!(w.wallet_state("partner:agency").await.balance, 9_000);
    r.charge_mailing(authed(ADMIN_TOKEN, send("bakery", "m2", 9_000)))
        .await
        .unwrap(); // used up
    w.wait_wallet("partner:agency", |w| w.balance == 30_000)
        .await;
    let mut events = r
        .watch_events(authed(
            ADMIN_TOKEN,
            proto::common::v1::WatchEventsRequest {
                after_cursor: 0,
                types: vec![
                    "reseller.partner_low_balance".into(),
                    "reseller.partner_top_up_succeeded".into(),
                ],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut events),
        )
        .await
        {
            Ok(Some(Ok(e))) => seen.push(e.r#type),
            other => panic!("events so far {seen:?}, then {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "reseller.partner_low_balance",
            "reseller.partner_top_up_succeeded"
        ]
    );

    // rule W5: an on-demand partner pays exactly the credits each send needs.
    r.register_partner(authed(
        ADMIN_TOKEN,
        register("studio", rpb::PartnerFunding::OnDemand, "1.05"),
    ))
    .await
    .unwrap();
    r.add_customer(authed(
        ADMIN_TOKEN,
        rpb::AddCustomerRequest {
            idempotency_key: "add-cafe".into(),
            partner_id: "studio".into(),
            customer_id: "cafe".into(),
            billing_mode: rpb::BillingMode::PartnerPays as i32,
        },
    ))
    .await
    .unwrap();
    let paid = r
        .charge_mailing(authed(
            ADMIN_TOKEN,
            rpb::ChargeMailingRequest {
                idempotency_key: "cafe-m1".into(),
                partner_id: "studio".into(),
                customer_id: "cafe".into(),
                mailing_id: "m1".into(),
                recipients: 5_000,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let purchase = paid.charge.unwrap().purchase.unwrap();
    assert_eq!(purchase.credits, 5_250);
    assert_eq!(amount(&purchase.amount), "52.50");
    w.stop().await;
}

/// Seed 002: 3,000 credits and a 5,000-message send buys the missing 2,000; switching auto
/// top-up off makes the same send fail; monthly subscription credits expire unused at the
/// month end.
#[tokio::test]
async fn seed_002_shortfall_top_up_switched_off_and_monthly_credits_expiring() {
    let w = World::start().await;
    w.open_wallet("shop", "1", 0).await;
    let mut wallet = w.wallet.clone();
    wallet
        .grant_credits(authed(
            ADMIN_TOKEN,
            wpb::GrantCreditsRequest {
                idempotency_key: w.key(),
                wallet_id: "shop".into(),
                credits: 3_000,
                kind: wpb::LotKind::Promotional as i32,
                expires_at: None,
                reference: String::new(),
            },
        ))
        .await
        .unwrap();
    let top_up = |mode: wpb::AutoTopUpMode| wpb::ConfigureAutoTopUpRequest {
        idempotency_key: format!("top-up-{}", mode as i32),
        wallet_id: "shop".into(),
        auto_top_up: Some(wpb::AutoTopUp {
            mode: mode as i32,
            max_per_purchase: 10_000,
            ..Default::default()
        }),
        payment_method: "pm_card_ok".into(),
    };
    wallet
        .configure_auto_top_up(authed(ADMIN_TOKEN, top_up(wpb::AutoTopUpMode::Shortfall)))
        .await
        .unwrap();
    let send = |key: &str| wpb::ChargeMailingRequest {
        idempotency_key: key.into(),
        wallet_id: "shop".into(),
        mailing_id: "launch".into(),
        recipients: 5_000,
    };
    // rule C5
    let charged = wallet
        .charge_mailing(authed(ADMIN_TOKEN, send("send-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(charged.credits_bought, 2_000);
    assert_eq!(charged.balance_after, 0);
    // rule C6: the same send with auto top-up off fails, and nothing is bought.
    wallet
        .configure_auto_top_up(authed(ADMIN_TOKEN, top_up(wpb::AutoTopUpMode::Off)))
        .await
        .unwrap();
    wallet
        .grant_credits(authed(
            ADMIN_TOKEN,
            wpb::GrantCreditsRequest {
                idempotency_key: w.key(),
                wallet_id: "shop".into(),
                credits: 3_000,
                kind: wpb::LotKind::Promotional as i32,
                expires_at: None,
                reference: String::new(),
            },
        ))
        .await
        .unwrap();
    let refused = wallet
        .charge_mailing(authed(ADMIN_TOKEN, send("send-2")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(w.wallet_state("shop").await.balance, 3_000);

    // rule C7: the subscription's monthly credits arrive, and what is unused expires at the
    // period end instead of rolling over.
    w.publish(plan("email")).await;
    w.subscribe("shop", "email", 2_000, card("pm_card_ok"))
        .await
        .unwrap();
    w.wait_wallet("shop", |w| w.balance == 4_000).await;
    wallet
        .charge_mailing(authed(
            ADMIN_TOKEN,
            wpb::ChargeMailingRequest {
                idempotency_key: "send-3".into(),
                wallet_id: "shop".into(),
                mailing_id: "newsletter".into(),
                recipients: 400,
            },
        ))
        .await
        .unwrap();
    let before = w.wallet_state("shop").await;
    let allowance = before
        .lots
        .iter()
        .find(|l| l.kind == wpb::LotKind::SubscriptionAllowance as i32)
        .expect("an allowance lot");
    assert_eq!(
        allowance.remaining, 600,
        "the allowance is used before the promotional credits"
    );
    w.advance_days(31).await;
    // The old allowance expired (600 gone), the new month's 1,000 arrived; promotional stay.
    let after = w
        .wait_wallet("shop", |w| {
            w.lots
                .iter()
                .filter(|l| l.kind == wpb::LotKind::SubscriptionAllowance as i32)
                .map(|l| l.remaining)
                .sum::<u64>()
                == 1_000
        })
        .await;
    assert_eq!(after.balance, 3_000 + 1_000);
    let ledger = wallet
        .list_ledger_entries(authed(
            ADMIN_TOKEN,
            wpb::ListLedgerEntriesRequest {
                wallet_id: "shop".into(),
                page_size: 500,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        ledger
            .iter()
            .any(|e| e.kind == wpb::LedgerEntryKind::Expiry as i32 && e.delta == -600)
    );
    w.stop().await;
}

/// Seed 003: previewed seat, tier and add-on changes charged exactly as shown; a downgrade
/// that becomes a change request; only a billing admin may do any of it.
#[tokio::test]
async fn seed_003_previewed_changes_change_requests_and_billing_permission() {
    let w = World::start().await;
    let mut spec = plan("email");
    spec.self_serve = Some(spb::SelfServe {
        downgrade: false,
        remove_add_on: false,
        change_product: false,
        unbundle: false,
    });
    w.publish(spec).await;
    w.subscribe("firm", "email", 5_000, card("pm_card_ok"))
        .await
        .unwrap();
    w.advance_days(9).await;
    for change in [
        spb::change::Kind::Seats(3),
        spb::change::Kind::Contacts(10_000),
        spb::change::Kind::AddAddOn("sms".into()),
    ] {
        // rule S6, S7, S19
        let preview = w
            .preview("firm", billing_admin(), change.clone())
            .await
            .unwrap();
        assert_eq!(
            preview.timing,
            spb::ChangeTiming::Immediate as i32,
            "{change:?}"
        );
        let applied = w.apply("firm", &preview).await;
        let invoice = applied.invoice.expect("an invoice for the prorated charge");
        assert_eq!(
            amount(&invoice.total),
            amount(&preview.amount_due_today),
            "{change:?}"
        );
        assert_eq!(
            amount(&applied.subscription.unwrap().recurring_price),
            amount(&preview.new_recurring_price)
        );
    }
    // rule S10: a downgrade is not self-serve on this plan: it becomes a change request.
    let preview = w
        .preview("firm", billing_admin(), spb::change::Kind::Contacts(5_000))
        .await
        .unwrap();
    let applied = w.apply("firm", &preview).await;
    assert_eq!(applied.timing, spb::ChangeTiming::ChangeRequest as i32);
    let requests = w
        .subs
        .clone()
        .list_change_requests(authed(
            ADMIN_TOKEN,
            spb::ListChangeRequestsRequest {
                actor: billing_admin(),
                account_id: "firm".into(),
                open_only: true,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .change_requests;
    assert_eq!(requests.len(), 1);
    assert_eq!(
        w.subscription("firm").await.contacts,
        10_000,
        "nothing changed yet"
    );
    // rule S5: a user without billing permission may neither see nor change billing.
    let clerk = Some(spb::Actor {
        user_id: "clerk".into(),
        billing_permission: false,
    });
    let denied = w
        .preview("firm", clerk.clone(), spb::change::Kind::Seats(4))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = w
        .subs
        .clone()
        .get_subscription(authed(
            ADMIN_TOKEN,
            spb::GetSubscriptionRequest {
                actor: clerk,
                account_id: "firm".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    w.stop().await;
}

/// Seed 004: a 21-day trial capped at 500 subscribers; contacts over the limit go pending and
/// are promoted by an upgrade; the 27,001 -> 28,000 downgrade floor; an add-on cancelled at the
/// next cycle; no purchase without verification.
#[tokio::test]
async fn seed_004_trial_cap_pending_contacts_downgrade_floor_add_on_and_verification() {
    let w = World::start().await;
    let mut spec = plan("email");
    spec.trial = Some(spb::TrialTerms {
        days: 21,
        contact_cap: 500,
        free_mails: 0,
    });
    w.publish(spec).await;
    // rule S14: at most 500 subscribed contacts in the trial.
    w.start_trial("club", "email").await;
    let admitted = w.admit("club", 700).await;
    assert_eq!((admitted.subscribed, admitted.pending_upgrade), (500, 200));
    // rule S16: no purchase after the trial without verification.
    w.advance_days(22).await;
    let lost = w
        .wait_subscription("club", |s| {
            s.status == spb::SubscriptionStatus::TrialExpired as i32
        })
        .await;
    assert_eq!(lost.status, spb::SubscriptionStatus::TrialExpired as i32);
    let refused = w
        .subscribe("club", "email", 1_000, card("pm_card_ok"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    w.verify("club").await;
    w.subscribe("club", "email", 1_000, card("pm_card_ok"))
        .await
        .unwrap();

    // rule S12: beyond the tier, contacts wait as pending upgrade; an upgrade promotes them.
    let admitted = w.admit("club", 29_000).await;
    assert!(admitted.pending_upgrade > 0);
    let preview = w
        .preview("club", billing_admin(), spb::change::Kind::Contacts(30_000))
        .await
        .unwrap();
    let applied = w.apply("club", &preview).await;
    assert!(applied.contacts_promoted > 0);
    let usage = applied.subscription.unwrap().usage.unwrap();
    assert_eq!(usage.pending, 0);
    // rule S9: with 27,001 active contacts the lowest tier on offer is 28,000.
    let active = usage.active;
    assert!(active >= 27_001);
    w.subs
        .clone()
        .release_contacts(authed(
            ADMIN_TOKEN,
            spb::ReleaseContactsRequest {
                idempotency_key: w.key(),
                actor: None,
                account_id: "club".into(),
                subscribed: active - 27_001,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let refused = w
        .preview("club", billing_admin(), spb::change::Kind::Contacts(27_000))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("28000") || refused.message().contains("28,000"),
        "{}",
        refused.message()
    );
    let floor = w
        .preview("club", billing_admin(), spb::change::Kind::Contacts(28_000))
        .await
        .unwrap();
    assert_eq!(floor.timing, spb::ChangeTiming::NextCycle as i32);

    // rule S13: an add-on cancelled ends at the next cycle, and the answer says when.
    let with_sms = w
        .preview(
            "club",
            billing_admin(),
            spb::change::Kind::AddAddOn("sms".into()),
        )
        .await
        .unwrap();
    w.apply("club", &with_sms).await;
    let cancelled = w
        .subs
        .clone()
        .cancel_add_on(authed(
            ADMIN_TOKEN,
            spb::CancelAddOnRequest {
                idempotency_key: w.key(),
                actor: billing_admin(),
                account_id: "club".into(),
                add_on: "sms".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let period_end = w.subscription("club").await.current_period_end.unwrap();
    assert_eq!(cancelled.effective_at.unwrap().seconds, period_end.seconds);
    assert!(
        w.subscription("club")
            .await
            .add_ons
            .contains(&"sms".to_string()),
        "usable until then"
    );
    w.stop().await;
}
