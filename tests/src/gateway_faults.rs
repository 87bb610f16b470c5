//! The gateway's faults across the flows that pay for credits, end to end through the real
//! services: a declined card, a card whose answer times out (the money is captured, the
//! outcome unknown to the caller) and a direct debit that the bank returns, for a wallet
//! purchase, a fixed auto top-up after a send (C4), an on-demand send at the wallet (C9) and an
//! on-demand send routed through reseller-billing. For each case: no credits are kept without
//! payment, no payment is kept without its credits (a returned debit's credits are clawed back),
//! each outcome is an event on the wallet's stream, and VerifyLedger is clean. And a
//! subscription's first renewal with each fault: the renewal invoice is paid exactly once
//! (timeout) or stays open with the subscription past due (declined, returned), each outcome an
//! event of the subscription service, and no month's credits granted twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use proto::{
    common::v1::{WatchEventsRequest, test_clock_client::TestClockClient},
    reseller::v1::{self as rpb, reseller_billing_client::ResellerBillingClient},
    subscription::v1::{
        self as spb, catalog_client::CatalogClient, subscriptions_client::SubscriptionsClient,
    },
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::testing::{self, ADMIN_TOKEN, authed};
use tonic::{Code, transport::Channel};

use crate::{Suite, channel};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Purchase,
    AutoTopUp,
    OnDemand,
    ResellerOnDemand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Declined,
    Timeout,
    Returned,
}

impl Fault {
    fn method(self) -> &'static str {
        match self {
            Fault::Declined => "pm_card_declined",
            Fault::Timeout => "pm_card_timeout",
            Fault::Returned => "pm_sepa_returned",
        }
    }
}

const FLOWS: [Flow; 4] = [
    Flow::Purchase,
    Flow::AutoTopUp,
    Flow::OnDemand,
    Flow::ResellerOnDemand,
];
const FAULTS: [Fault; 3] = [Fault::Declined, Fault::Timeout, Fault::Returned];

fn pricing() -> wpb::CreditPricing {
    wpb::CreditPricing {
        mode: wpb::TierMode::Graduated as i32,
        tiers: vec![wpb::PriceTier {
            first: 1,
            last: 0,
            unit_price: "0.01".into(),
            flat_price: String::new(),
        }],
    }
}

fn rating() -> wpb::RatingRule {
    wpb::RatingRule {
        credits_per_recipient: "1".into(),
        per_mailing_surcharge: 0,
    }
}

/// What one case's paying call answered: a code, or OK.
type Answer = Result<(), tonic::Status>;

struct World {
    suite: Suite,
    wallet: CreditsWalletClient<Channel>,
    reseller: ResellerBillingClient<Channel>,
    subs: SubscriptionsClient<Channel>,
    events: Arc<Mutex<Vec<proto::common::v1::Event>>>,
}

fn billing_admin() -> Option<spb::Actor> {
    Some(spb::Actor {
        user_id: "primary-admin".into(),
        billing_permission: true,
    })
}

fn payment(fault: Option<Fault>) -> Option<spb::Payment> {
    let (kind, method) = match fault {
        None => (spb::PaymentKind::Card, "pm_card_ok"),
        Some(Fault::Returned) => (spb::PaymentKind::DirectDebit, "pm_sepa_returned"),
        Some(f) => (spb::PaymentKind::Card, f.method()),
    };
    Some(spb::Payment {
        kind: kind as i32,
        payment_method: method.into(),
    })
}

/// Moves the three services' test clocks to `to`.
async fn advance_to(suite: &Suite, to: chrono::DateTime<chrono::Utc>) {
    for running in [&suite.wallet, &suite.subscription, &suite.reseller] {
        testing::advance_clock(&TestClockClient::new(channel(running).await.unwrap()), to).await;
    }
}

impl World {
    /// Calls `call` until it answers something other than `UNAVAILABLE` (a gateway answer
    /// that is not known yet), at most 10 tries, returning the first answer and the last.
    async fn paid<F, Fut>(mut call: F) -> (Answer, Answer, usize)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Answer>,
    {
        let first = call().await;
        let mut last = first.clone();
        let mut retries = 0;
        while matches!(&last, Err(s) if s.code() == Code::Unavailable) && retries < 10 {
            retries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            last = call().await;
        }
        (first, last, retries)
    }

    async fn open(&self, wallet_id: &str) {
        self.wallet
            .clone()
            .open_wallet(authed(
                ADMIN_TOKEN,
                wpb::OpenWalletRequest {
                    idempotency_key: format!("open-{wallet_id}"),
                    wallet_id: wallet_id.into(),
                    currency: "EUR".into(),
                    pricing: Some(pricing()),
                    rating: Some(rating()),
                    signup_credits: 0,
                    signup_credits_expire_at: None,
                },
            ))
            .await
            .unwrap();
    }

    async fn charge(&self, key: &str, wallet_id: &str, recipients: u64) -> Answer {
        self.wallet
            .clone()
            .charge_mailing(authed(
                ADMIN_TOKEN,
                wpb::ChargeMailingRequest {
                    idempotency_key: key.into(),
                    wallet_id: wallet_id.into(),
                    mailing_id: format!("mail-{key}"),
                    recipients,
                },
            ))
            .await
            .map(|_| ())
    }

    /// Sets up the case's wallet and makes its paying call (retried with the same key while
    /// the answer is unknown). Returns the wallet id, the first and the final answer, and the
    /// retries.
    async fn run(&self, flow: Flow, fault: Fault) -> (String, Answer, Answer, usize) {
        let tag = format!("{flow:?}-{fault:?}").to_lowercase();
        let method = fault.method();
        match flow {
            Flow::Purchase => {
                self.open(&tag).await;
                let (first, last, retries) = Self::paid(|| {
                    let mut w = self.wallet.clone();
                    let req = wpb::PurchaseCreditsRequest {
                        idempotency_key: format!("buy-{tag}"),
                        wallet_id: tag.clone(),
                        credits: 1_000,
                        payment_method: method.into(),
                        expires_at: None,
                        expected_amount: None,
                    };
                    async move {
                        w.purchase_credits(authed(ADMIN_TOKEN, req))
                            .await
                            .map(|_| ())
                    }
                })
                .await;
                (tag, first, last, retries)
            }
            Flow::AutoTopUp => {
                self.open(&tag).await;
                self.wallet
                    .clone()
                    .grant_credits(authed(
                        ADMIN_TOKEN,
                        wpb::GrantCreditsRequest {
                            idempotency_key: format!("grant-{tag}"),
                            wallet_id: tag.clone(),
                            credits: 500,
                            kind: wpb::LotKind::Promotional as i32,
                            expires_at: None,
                            reference: "start".into(),
                        },
                    ))
                    .await
                    .unwrap();
                self.wallet
                    .clone()
                    .configure_auto_top_up(authed(
                        ADMIN_TOKEN,
                        wpb::ConfigureAutoTopUpRequest {
                            idempotency_key: format!("auto-{tag}"),
                            wallet_id: tag.clone(),
                            auto_top_up: Some(wpb::AutoTopUp {
                                mode: wpb::AutoTopUpMode::Fixed as i32,
                                threshold: 100,
                                amount: 1_000,
                                max_per_purchase: 0,
                                monthly_cap: 0,
                            }),
                            payment_method: method.into(),
                        },
                    ))
                    .await
                    .unwrap();
                // 450 of 500 leaves 50, below the threshold: the top-up follows the send.
                let key = format!("send-{tag}");
                let (first, last, retries) = Self::paid(|| self.charge(&key, &tag, 450)).await;
                (tag, first, last, retries)
            }
            Flow::OnDemand => {
                self.open(&tag).await;
                self.wallet
                    .clone()
                    .set_funding_mode(authed(
                        ADMIN_TOKEN,
                        wpb::SetFundingModeRequest {
                            idempotency_key: format!("fund-{tag}"),
                            wallet_id: tag.clone(),
                            funding_mode: wpb::FundingMode::OnDemand as i32,
                            payment_method: method.into(),
                        },
                    ))
                    .await
                    .unwrap();
                let key = format!("send-{tag}");
                let (first, last, retries) = Self::paid(|| self.charge(&key, &tag, 100)).await;
                (tag, first, last, retries)
            }
            Flow::ResellerOnDemand => {
                let partner = tag.clone();
                self.reseller
                    .clone()
                    .register_partner(authed(
                        ADMIN_TOKEN,
                        rpb::RegisterPartnerRequest {
                            idempotency_key: format!("reg-{tag}"),
                            partner_id: partner.clone(),
                            currency: "EUR".into(),
                            funding: rpb::PartnerFunding::OnDemand as i32,
                            payment_method: method.into(),
                            pricing: Some(pricing()),
                            rating: Some(rating()),
                        },
                    ))
                    .await
                    .unwrap();
                self.reseller
                    .clone()
                    .add_customer(authed(
                        ADMIN_TOKEN,
                        rpb::AddCustomerRequest {
                            idempotency_key: format!("add-{tag}"),
                            partner_id: partner.clone(),
                            customer_id: format!("c-{tag}"),
                            billing_mode: rpb::BillingMode::PartnerPays as i32,
                        },
                    ))
                    .await
                    .unwrap();
                let (first, last, retries) = Self::paid(|| {
                    let mut r = self.reseller.clone();
                    let req = rpb::ChargeMailingRequest {
                        idempotency_key: format!("send-{tag}"),
                        partner_id: partner.clone(),
                        customer_id: format!("c-{tag}"),
                        mailing_id: "m1".into(),
                        recipients: 100,
                    };
                    async move { r.charge_mailing(authed(ADMIN_TOKEN, req)).await.map(|_| ()) }
                })
                .await;
                (format!("partner:{tag}"), first, last, retries)
            }
        }
    }

    async fn invoices(&self, account: &str) -> Vec<spb::Invoice> {
        self.subs
            .clone()
            .list_invoices(authed(
                ADMIN_TOKEN,
                spb::ListInvoicesRequest {
                    actor: billing_admin(),
                    account_id: account.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .invoices
    }

    /// Waits (at most 20 s) until `account`'s renewal invoice has one of `statuses`.
    async fn wait_renewal(&self, account: &str, statuses: &[spb::InvoiceStatus]) -> spb::Invoice {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let invoices = self.invoices(account).await;
            if let Some(renewal) = invoices.iter().find(|i| i.kind == "renewal")
                && statuses.iter().any(|s| *s as i32 == renewal.status)
            {
                return renewal.clone();
            }
            assert!(
                Instant::now() < until,
                "{account}: no renewal in {statuses:?}: {invoices:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn entries(&self, wallet_id: &str) -> Vec<wpb::LedgerEntry> {
        self.wallet
            .clone()
            .list_ledger_entries(authed(
                ADMIN_TOKEN,
                wpb::ListLedgerEntriesRequest {
                    wallet_id: wallet_id.into(),
                    page_size: 500,
                    page_token: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .entries
    }

    fn event_types(&self, wallet_id: &str) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.subject == wallet_id)
            .map(|e| e.r#type.clone())
            .collect()
    }

    /// Waits (at most 20 s) until `wallet_id` has an event of one of `types`.
    async fn wait_event(&self, wallet_id: &str, types: &[&str]) {
        let until = Instant::now() + Duration::from_secs(20);
        while !self
            .event_types(wallet_id)
            .iter()
            .any(|t| types.contains(&t.as_str()))
        {
            assert!(
                Instant::now() < until,
                "{wallet_id}: none of {types:?} among {:?}",
                self.event_types(wallet_id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn sum(entries: &[wpb::LedgerEntry], kind: wpb::LedgerEntryKind) -> (usize, i64) {
    let of_kind: Vec<_> = entries.iter().filter(|e| e.kind == kind as i32).collect();
    (of_kind.len(), of_kind.iter().map(|e| e.delta).sum())
}

#[tokio::test]
async fn every_gateway_fault_in_every_paying_flow_keeps_credits_and_payments_together() {
    let started = Instant::now();
    let suite = Suite::start().await.unwrap();
    let w = channel(&suite.wallet).await.unwrap();
    let world = World {
        wallet: CreditsWalletClient::new(w.clone()),
        reseller: ResellerBillingClient::new(channel(&suite.reseller).await.unwrap()),
        subs: SubscriptionsClient::new(channel(&suite.subscription).await.unwrap()),
        events: Arc::default(),
        suite,
    };
    // Every wallet event, as a watcher would see it.
    let mut stream = world
        .wallet
        .clone()
        .watch_events(authed(
            ADMIN_TOKEN,
            WatchEventsRequest {
                after_cursor: 0,
                types: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let sink = world.events.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            sink.lock().unwrap().push(event);
        }
    });

    let mut cases = Vec::new();
    for flow in FLOWS {
        for fault in FAULTS {
            let (wallet_id, first, last, retries) = world.run(flow, fault).await;
            cases.push((flow, fault, wallet_id, first, last, retries));
        }
    }
    // Renewals: each account subscribes by card (paid), then switches to the faulty method
    // before its first renewal.
    CatalogClient::new(channel(&world.suite.subscription).await.unwrap())
        .publish_plan(authed(
            ADMIN_TOKEN,
            spb::PublishPlanRequest {
                idempotency_key: "plan".into(),
                plan: Some(crate::scenarios::plan("email")),
            },
        ))
        .await
        .unwrap();
    for fault in FAULTS {
        let account = format!("renewal-{fault:?}").to_lowercase();
        world.open(&account).await;
        let mut subs = world.subs.clone();
        subs.subscribe(authed(
            ADMIN_TOKEN,
            spb::SubscribeRequest {
                idempotency_key: format!("sub-{account}"),
                actor: billing_admin(),
                account_id: account.clone(),
                plan_id: "email".into(),
                contacts: 5_000,
                seats: 1,
                add_ons: vec![],
                payment: payment(None),
                vat_rate: "0.21".into(),
            },
        ))
        .await
        .unwrap();
        subs.update_payment_method(authed(
            ADMIN_TOKEN,
            spb::UpdatePaymentMethodRequest {
                idempotency_key: format!("pm-{account}"),
                actor: billing_admin(),
                account_id: account.clone(),
                payment: payment(Some(fault)),
            },
        ))
        .await
        .unwrap();
    }
    // The direct debits settle (returned) after the simulator's 3 days; the monthly plans renew
    // on February 1st, and their direct debits come back 3 days later.
    let now = world.suite.wallet.platform.clock.now();
    advance_to(&world.suite, now + chrono::Duration::days(4)).await;
    let february = now + chrono::Duration::days(31) + chrono::Duration::hours(1);
    advance_to(&world.suite, february).await;
    use spb::InvoiceStatus as S;
    world
        .wait_renewal("renewal-returned", &[S::Pending, S::Open])
        .await;
    world
        .wait_renewal("renewal-timeout", &[S::Open, S::Paid])
        .await;
    advance_to(&world.suite, february + chrono::Duration::days(4)).await;
    let mut renewal_lines = Vec::new();
    for fault in FAULTS {
        let account = format!("renewal-{fault:?}").to_lowercase();
        let expected = match fault {
            Fault::Timeout => S::Paid,
            Fault::Declined | Fault::Returned => S::Open,
        };
        let renewal = world.wait_renewal(&account, &[expected]).await;
        let invoices = world.invoices(&account).await;
        assert_eq!(invoices.len(), 2, "{account}: one renewal: {invoices:?}");
        let sub = world
            .subs
            .clone()
            .get_subscription(authed(
                ADMIN_TOKEN,
                spb::GetSubscriptionRequest {
                    actor: billing_admin(),
                    account_id: account.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let expected_status = match fault {
            Fault::Timeout => spb::SubscriptionStatus::Active,
            Fault::Declined | Fault::Returned => spb::SubscriptionStatus::PastDue,
        };
        assert_eq!(sub.status, expected_status as i32, "{account}: {sub:?}");
        // An event is served once the relay has numbered it, a moment after its commit: read
        // until the fault's outcome is there (at most 20 s).
        let until = Instant::now() + Duration::from_secs(20);
        let (mine, paid, failed, returned) = loop {
            let events = subscription_events(&world.subs).await;
            // Not the first invoice's events (paid by card at Subscribe: issued, then paid).
            let first = format!("\"{}\"", invoices[0].invoice_id);
            let mine: Vec<String> = events
                .iter()
                .filter(|e| e.payload_json.contains(&format!("\"{account}\"")))
                .filter(|e| !e.payload_json.contains(&first))
                .map(|e| e.r#type.clone())
                .collect();
            let of = |t: &str| mine.iter().filter(|x| x.as_str() == t).count();
            let counts = (
                of("subscription.invoice_paid"),
                of("subscription.payment_failed"),
                of("subscription.payment_returned"),
            );
            let outcome = match fault {
                Fault::Timeout => counts.0,
                Fault::Declined => counts.1,
                Fault::Returned => counts.2,
            };
            if outcome > 0 || Instant::now() > until {
                break (mine, counts.0, counts.1, counts.2);
            }
        };
        match fault {
            // The captured payment is applied once: the renewal paid, once.
            Fault::Timeout => {
                assert_eq!((paid, failed, returned), (1, 0, 0), "{account}: {mine:?}")
            }
            // The renewal is never marked paid; each refused attempt is an event.
            Fault::Declined => {
                assert_eq!((paid, returned), (0, 0), "{account}: {mine:?}");
                assert!(failed >= 1, "{account}: no payment_failed event: {mine:?}");
            }
            Fault::Returned => {
                assert_eq!((paid, returned), (0, 1), "{account}: {mine:?}");
            }
        }
        let grants = world
            .entries(&account)
            .await
            .iter()
            .filter(|e| e.kind == wpb::LedgerEntryKind::Grant as i32)
            .count();
        assert!(grants <= 2, "{account}: a month's credits granted twice");
        renewal_lines.push(format!(
            "Renewal x {fault:?}: renewal invoice {:?}, subscription {:?}; events invoice_paid \
             {paid}, payment_failed {failed}, payment_returned {returned}; monthly grants {grants}; events {mine:?}",
            S::try_from(renewal.status).unwrap(),
            spb::SubscriptionStatus::try_from(sub.status).unwrap(),
        ));
    }

    let mut lines = Vec::new();
    for (flow, fault, wallet_id, first, last, retries) in &cases {
        let what = format!("{flow:?} x {fault:?} ({wallet_id})");
        match fault {
            Fault::Declined => {
                world
                    .wait_event(
                        wallet_id,
                        &["wallet.purchase_failed", "wallet.top_up_failed"],
                    )
                    .await;
            }
            Fault::Timeout => {
                world
                    .wait_event(
                        wallet_id,
                        &["wallet.purchase_succeeded", "wallet.top_up_succeeded"],
                    )
                    .await;
            }
            Fault::Returned => {
                world
                    .wait_event(wallet_id, &["wallet.payment_returned"])
                    .await
            }
        }
        let entries = world.entries(wallet_id).await;
        let (purchases, bought) = sum(&entries, wpb::LedgerEntryKind::Purchase);
        let (clawbacks, clawed) = sum(&entries, wpb::LedgerEntryKind::Clawback);
        let (sends, debited) = sum(&entries, wpb::LedgerEntryKind::Mailing);
        let types = world.event_types(wallet_id);
        let count = |t: &str| types.iter().filter(|x| x.as_str() == t).count();
        let succeeded = count("wallet.purchase_succeeded") + count("wallet.top_up_succeeded");
        let failed = count("wallet.purchase_failed") + count("wallet.top_up_failed");
        match fault {
            Fault::Declined => {
                // No payment, so no credits; the event says so.
                assert_eq!(purchases, 0, "{what}: credits without payment: {entries:?}");
                assert_eq!((succeeded, failed), (0, 1), "{what}: {types:?}");
                match flow {
                    // The top-up follows a send that is paid with credits already there.
                    Flow::AutoTopUp => assert!(last.is_ok(), "{what}: {last:?}"),
                    // The send needed the credits: refused, nothing debited.
                    _ => {
                        let code = last.as_ref().err().map(tonic::Status::code);
                        assert!(
                            matches!(code, Some(Code::FailedPrecondition))
                                || (*flow == Flow::Purchase && last.is_ok()),
                            "{what}: {last:?}"
                        );
                        assert_eq!(sends, 0, "{what}: debited without credits");
                    }
                }
            }
            Fault::Timeout => {
                // The money was captured: its credits are granted, exactly once.
                assert!(last.is_ok(), "{what}: {last:?}");
                assert_eq!(purchases, 1, "{what}: {entries:?}");
                assert!(bought > 0, "{what}");
                assert_eq!((succeeded, failed), (1, 0), "{what}: {types:?}");
            }
            Fault::Returned => {
                // The bank took the money back: whatever was granted is clawed back.
                assert_eq!(
                    bought + clawed,
                    0,
                    "{what}: credits kept without payment: {entries:?}"
                );
                assert_eq!(count("wallet.payment_returned"), 1, "{what}: {types:?}");
                // A send already paid with the returned credits leaves a debt (C9), recorded.
                let debt = usize::from(bought > 0);
                assert_eq!(count("wallet.debt_recorded"), debt, "{what}: {types:?}");
                if matches!(flow, Flow::OnDemand | Flow::ResellerOnDemand) {
                    assert_eq!(
                        balance_of(&entries),
                        -bought,
                        "{what}: the debt is the send"
                    );
                }
                assert!(last.is_ok(), "{what}: {last:?}");
            }
        }
        if matches!(flow, Flow::OnDemand | Flow::ResellerOnDemand) && last.is_ok() {
            assert_eq!((sends, debited), (1, -100), "{what}: the send debited once");
        }
        let balance = entries.last().map_or(0, |e| e.balance_after);
        let sum_all: i64 = entries.iter().map(|e| e.delta).sum();
        assert_eq!(balance, sum_all, "{what}");
        lines.push(format!(
            "{flow:?} x {fault:?}: first {}, final {} after {retries} retries; purchase entries \
             {purchases} (+{bought}), claw-backs {clawbacks} ({clawed}), sends {sends}; balance \
             {balance}; events {types:?}",
            code_of(first),
            code_of(last),
        ));
    }
    let report = world
        .wallet
        .clone()
        .verify_ledger(authed(
            ADMIN_TOKEN,
            wpb::VerifyLedgerRequest {
                outbox_grace_seconds: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.violations_total, 0, "{:?}", report.violations);
    watcher.abort();
    eprintln!(
        "gateway faults [{:?}]: {} cases; VerifyLedger {} wallets, {} entries, {} purchases, 0 \
         violations; {:.1?}\n  {}",
        testing::backend(),
        cases.len() + renewal_lines.len(),
        report.wallets_checked,
        report.entries_checked,
        report.purchases_checked,
        started.elapsed(),
        lines
            .iter()
            .chain(&renewal_lines)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    world.suite.stop().await.unwrap();
}

/// Every event of the subscription service so far.
async fn subscription_events(subs: &SubscriptionsClient<Channel>) -> Vec<proto::common::v1::Event> {
    let mut stream = subs
        .clone()
        .watch_events(authed(
            ADMIN_TOKEN,
            WatchEventsRequest {
                after_cursor: 0,
                types: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    // The stream stays open: read until it has been quiet for a moment.
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {
        events.push(event);
    }
    events
}

fn balance_of(entries: &[wpb::LedgerEntry]) -> i64 {
    entries.last().map_or(0, |e| e.balance_after)
}

fn code_of(answer: &Answer) -> String {
    match answer {
        Ok(()) => "OK".into(),
        Err(s) => format!("{:?}", s.code()),
    }
}
