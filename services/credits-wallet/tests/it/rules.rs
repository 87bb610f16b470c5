//! One test per rule of DOMAIN.md (C1-C9), named after it.

use proto::wallet::v1 as pb;
use runtime::testing::{ADMIN_TOKEN, authed};
use tonic::Code;

use crate::Harness;

fn shortfall_top_up(max: u64, cap: u64) -> pb::AutoTopUp {
    pb::AutoTopUp {
        mode: pb::AutoTopUpMode::Shortfall as i32,
        max_per_purchase: max,
        monthly_cap: cap,
        ..Default::default()
    }
}

// rule C1
#[tokio::test]
async fn c1_larger_purchases_pay_less_per_credit_and_credits_arrive_once_paid() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    let quote = |credits| {
        let mut c = h.client.clone();
        async move {
            c.quote_credit_purchase(authed(
                ADMIN_TOKEN,
                pb::QuoteCreditPurchaseRequest {
                    wallet_id: "w1".into(),
                    credits,
                },
            ))
            .await
            .unwrap()
            .into_inner()
        }
    };
    let small = quote(5_000).await;
    assert_eq!(small.amount.as_ref().unwrap().amount, "50.00");
    let large = quote(50_000).await;
    assert_eq!(large.amount.as_ref().unwrap().amount, "420.00");
    assert_eq!(large.amount.as_ref().unwrap().currency, "EUR");

    let p = h.purchase("w1", 50_000, "pm_card_ok").await;
    assert_eq!(p.status, pb::PurchaseStatus::Succeeded as i32);
    assert_eq!(p.amount.unwrap().amount, "420.00");
    let w = h.wallet("w1").await;
    assert_eq!((w.balance, w.available), (50_000, 50_000));
    let ledger = h.ledger("w1").await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].kind, pb::LedgerEntryKind::Purchase as i32);
    assert_eq!(ledger[0].reference, format!("purchase:{}", p.purchase_id));
    assert!(!h.events_of("wallet.purchase_succeeded", 1).await.is_empty());
    h.assert_ledger_balances("w1").await;
}

// rule C1
#[tokio::test]
async fn c1_a_declined_purchase_grants_nothing_and_says_why() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    let p = h.purchase("w1", 1_000, "pm_card_insufficient_funds").await;
    assert_eq!(p.status, pb::PurchaseStatus::Failed as i32);
    assert!(
        p.failure_reason.contains("insufficient"),
        "{}",
        p.failure_reason
    );
    let p = h.purchase("w1", 1_000, "pm_card_declined").await;
    assert_eq!(p.status, pb::PurchaseStatus::Failed as i32);
    assert!(!p.failure_reason.is_empty());
    let w = h.wallet("w1").await;
    assert_eq!(w.balance, 0);
    assert!(h.ledger("w1").await.is_empty());
    assert_eq!(h.events_of("wallet.purchase_failed", 2).await.len(), 2);
}

// rule C1
#[tokio::test]
async fn c1_direct_debit_credits_become_usable_only_when_the_debit_settles() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    let p = h.purchase("w1", 2_000, "pm_sepa_ok").await;
    assert_eq!(p.status, pb::PurchaseStatus::PendingSettlement as i32);
    assert_eq!(h.wallet("w1").await.balance, 0);
    let refused = h.charge("w1", "m1", 10).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    h.advance(4 * 86_400).await;
    let w = h.wait_for("w1", |w| w.balance == 2_000).await;
    assert_eq!(w.available, 2_000);
    h.charge("w1", "m2", 10).await.unwrap();
    h.assert_ledger_balances("w1").await;
}

// rule C2
#[tokio::test]
async fn c2_a_mailing_is_rated_and_its_credits_consumed_at_once() {
    let h = Harness::start().await;
    h.open("w1", "1.05", 0).await;
    h.grant("w1", 10_000).await;
    let rating = h
        .client
        .clone()
        .rate_mailing(authed(
            ADMIN_TOKEN,
            pb::RateMailingRequest {
                wallet_id: "w1".into(),
                recipients: 5_000,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rating.credits, 5_250,
        "5,000 recipients at 1.05 need 5,250 credits"
    );
    assert!(rating.covered);
    assert_eq!(
        h.wallet("w1").await.balance,
        10_000,
        "rating charges nothing"
    );

    let charge = h.charge("w1", "newsletter-1", 5_000).await.unwrap();
    assert_eq!(charge.credits, 5_250);
    assert_eq!(charge.balance_after, 4_750);
    assert_eq!(h.wallet("w1").await.balance, 4_750);
    let ledger = h.ledger("w1").await;
    assert_eq!(ledger.last().unwrap().delta, -5_250);
    assert_eq!(ledger.last().unwrap().reference, "mailing:newsletter-1");
    h.assert_ledger_balances("w1").await;
}

// rule C2
#[tokio::test]
async fn c2_an_overdraw_is_refused_with_the_shortfall_and_changes_nothing() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    let err = h.charge("w1", "m1", 5_000).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("short by 2000"), "{}", err.message());
    assert_eq!(h.wallet("w1").await.balance, 3_000);
    assert_eq!(h.ledger("w1").await.len(), 1);
}

// rule C3
#[tokio::test]
async fn c3_the_low_balance_reminder_fires_once_per_crossing_and_re_arms() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    h.client
        .clone()
        .configure_low_balance_reminder(authed(
            ADMIN_TOKEN,
            pb::ConfigureLowBalanceReminderRequest {
                idempotency_key: h.key(),
                wallet_id: "w1".into(),
                threshold: 1_000,
            },
        ))
        .await
        .unwrap();
    h.charge("w1", "m1", 1_500).await.unwrap(); // 1,500: still above
    h.charge("w1", "m2", 600).await.unwrap(); // 900: crosses below
    h.charge("w1", "m3", 100).await.unwrap(); // 800: no second reminder
    h.charge("w1", "m4", 100).await.unwrap(); // 700
    assert_eq!(h.events_of("wallet.low_balance", 1).await.len(), 1);
    h.grant("w1", 1_000).await; // 1,700: re-armed
    h.charge("w1", "m5", 800).await.unwrap(); // 900: crosses again
    let reminders = h.events_of("wallet.low_balance", 2).await;
    assert_eq!(reminders.len(), 2);
    assert!(reminders[1].payload_json.contains("\"available\":900"));
}

// rule C4
#[tokio::test]
async fn c4_a_fixed_amount_is_bought_automatically_when_the_balance_is_used_up() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 1_000).await;
    h.auto_top_up(
        "w1",
        pb::AutoTopUp {
            mode: pb::AutoTopUpMode::Fixed as i32,
            threshold: 0,
            amount: 10_000,
            ..Default::default()
        },
        "pm_card_ok",
    )
    .await;
    h.charge("w1", "m1", 400).await.unwrap();
    assert_eq!(
        h.wallet("w1").await.balance,
        600,
        "above the threshold: no top-up"
    );
    h.charge("w1", "m2", 600).await.unwrap(); // used up
    let w = h.wait_for("w1", |w| w.balance == 10_000).await;
    assert_eq!(w.auto_top_up_bought_this_month, 10_000);
    assert_eq!(h.events_of("wallet.top_up_succeeded", 1).await.len(), 1);
    h.assert_ledger_balances("w1").await;
}

// rule C5
#[tokio::test]
async fn c5_a_send_over_the_balance_buys_exactly_the_missing_2000() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    h.auto_top_up("w1", shortfall_top_up(10_000, 0), "pm_card_ok")
        .await;
    let charge = h.charge("w1", "m1", 5_000).await.unwrap();
    assert_eq!(charge.credits, 5_000);
    assert_eq!(charge.credits_bought, 2_000);
    let purchase = charge.purchase.unwrap();
    assert_eq!(purchase.trigger, pb::PurchaseTrigger::AutoShortfall as i32);
    assert_eq!(purchase.amount.unwrap().amount, "20.00");
    assert_eq!(charge.balance_after, 0);
    h.assert_ledger_balances("w1").await;
}

// rule C5
#[tokio::test]
async fn c5_a_declined_card_fails_the_send_and_nothing_is_bought_or_debited() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    h.auto_top_up("w1", shortfall_top_up(10_000, 0), "pm_card_declined")
        .await;
    let err = h.charge("w1", "m1", 5_000).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("declined"), "{}", err.message());
    let w = h.wallet("w1").await;
    assert_eq!(w.balance, 3_000);
    assert_eq!(h.ledger("w1").await.len(), 1, "only the grant");
    assert_eq!(h.events_of("wallet.top_up_failed", 1).await.len(), 1);
}

// rule C5
#[tokio::test]
async fn c5_the_shortfall_above_the_maximum_or_the_monthly_cap_is_refused() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    h.auto_top_up("w1", shortfall_top_up(1_000, 0), "pm_card_ok")
        .await;
    let err = h.charge("w1", "m1", 5_000).await.unwrap_err();
    assert!(err.message().contains("maximum"), "{}", err.message());

    h.auto_top_up("w1", shortfall_top_up(10_000, 3_000), "pm_card_ok")
        .await;
    h.charge("w1", "m2", 5_000).await.unwrap(); // buys 2,000 of the 3,000 cap
    let err = h.charge("w1", "m3", 2_000).await.unwrap_err(); // would need 2,000 more
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("cap"), "{}", err.message());
    assert_eq!(h.wallet("w1").await.balance, 0);
    h.assert_ledger_balances("w1").await;
}

// rule C6
#[tokio::test]
async fn c6_switching_auto_top_up_off_makes_the_same_send_fail() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    h.auto_top_up("w1", shortfall_top_up(10_000, 0), "pm_card_ok")
        .await;
    h.auto_top_up(
        "w1",
        pb::AutoTopUp {
            mode: pb::AutoTopUpMode::Off as i32,
            ..Default::default()
        },
        "",
    )
    .await;
    let err = h.charge("w1", "m1", 5_000).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("off"), "{}", err.message());
    assert_eq!(h.wallet("w1").await.balance, 3_000);
}

// rule C7
#[tokio::test]
async fn c7_unused_monthly_credits_expire_at_the_period_end() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.purchase("w1", 500, "pm_card_ok").await;
    let period_end = h.running.platform.clock.now() + chrono::Duration::days(30);
    h.client
        .clone()
        .grant_credits(authed(
            ADMIN_TOKEN,
            pb::GrantCreditsRequest {
                idempotency_key: h.key(),
                wallet_id: "w1".into(),
                credits: 1_000,
                kind: pb::LotKind::SubscriptionAllowance as i32,
                expires_at: Some(runtime::convert::timestamp(period_end)),
                reference: "subscription:s1:2026-01".into(),
            },
        ))
        .await
        .unwrap();
    // The allowance is used before the purchased credits: it expires first.
    h.charge("w1", "m1", 400).await.unwrap();
    let w = h.wallet("w1").await;
    assert_eq!(w.lots[0].remaining, 600);
    assert_eq!(w.lots[0].kind, pb::LotKind::SubscriptionAllowance as i32);
    assert_eq!(w.lots[1].remaining, 500);

    h.advance(30 * 86_400).await;
    // Expired credits never count, whether or not the sweep already ran.
    let w = h.wallet("w1").await;
    assert_eq!((w.balance, w.available), (500, 500));
    assert_eq!(w.lots.len(), 1);
    let ledger = h.ledger("w1").await;
    let expiry = ledger
        .iter()
        .find(|e| e.kind == pb::LedgerEntryKind::Expiry as i32)
        .expect("an expiry entry");
    assert_eq!(expiry.delta, -600);
    assert_eq!(h.events_of("wallet.credits_expired", 1).await.len(), 1);
    h.assert_ledger_balances("w1").await;
}

// rule C8
#[tokio::test]
async fn c8_a_new_wallet_may_start_with_free_signup_credits() {
    let h = Harness::start().await;
    let w = h.open("w1", "1", 500).await;
    assert_eq!((w.balance, w.available), (500, 500));
    assert_eq!(w.lots[0].kind, pb::LotKind::Signup as i32);
    assert_eq!(
        h.ledger("w1").await[0].kind,
        pb::LedgerEntryKind::Grant as i32
    );
    let plain = h.open("w2", "1", 0).await;
    assert_eq!(plain.balance, 0);
}

pub(crate) async fn on_demand(h: &Harness, wallet: &str, method: &str) {
    h.client
        .clone()
        .set_funding_mode(authed(
            ADMIN_TOKEN,
            pb::SetFundingModeRequest {
                idempotency_key: h.key(),
                wallet_id: wallet.into(),
                funding_mode: pb::FundingMode::OnDemand as i32,
                payment_method: method.into(),
            },
        ))
        .await
        .unwrap();
}

// rule C9
#[tokio::test]
async fn c9_on_demand_each_send_is_charged_for_exactly_the_credits_it_needs() {
    let h = Harness::start().await;
    h.open("w1", "1.05", 0).await;
    on_demand(&h, "w1", "pm_card_ok").await;
    let charge = h.charge("w1", "m1", 5_000).await.unwrap();
    assert_eq!(charge.credits, 5_250);
    assert_eq!(charge.credits_bought, 5_250);
    let purchase = charge.purchase.unwrap();
    assert_eq!(purchase.trigger, pb::PurchaseTrigger::OnDemand as i32);
    assert_eq!(purchase.credits, 5_250);
    assert_eq!(purchase.amount.unwrap().amount, "52.50");
    assert_eq!(charge.balance_after, 0);
    let ledger = h.ledger("w1").await;
    assert_eq!(
        ledger.iter().map(|e| e.delta).collect::<Vec<_>>(),
        [5_250, -5_250],
        "bought and consumed in the same step"
    );
    h.assert_ledger_balances("w1").await;
}

// rule C9
#[tokio::test]
async fn c9_a_returned_direct_debit_claws_back_records_debt_and_stops_sends_until_paid() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    on_demand(&h, "w1", "pm_sepa_returned").await;
    let charge = h.charge("w1", "m1", 1_000).await.unwrap();
    assert_eq!(
        charge.purchase.unwrap().status,
        pb::PurchaseStatus::PendingSettlement as i32
    );
    h.advance(4 * 86_400).await;
    let w = h.wait_for("w1", |w| w.debt == 1_000).await;
    assert_eq!(w.balance, -1_000);
    assert_eq!(h.events_of("wallet.payment_returned", 1).await.len(), 1);
    assert_eq!(h.events_of("wallet.debt_recorded", 1).await.len(), 1);

    on_demand(&h, "w1", "pm_card_ok").await;
    let err = h.charge("w1", "m2", 10).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("owes 1000"), "{}", err.message());

    let p = h.purchase("w1", 1_500, "pm_card_ok").await;
    assert_eq!(p.status, pb::PurchaseStatus::Succeeded as i32);
    let w = h.wallet("w1").await;
    assert_eq!(
        (w.debt, w.balance),
        (0, 500),
        "the purchase paid the debt first"
    );
    assert_eq!(h.events_of("wallet.debt_settled", 1).await.len(), 1);
    h.charge("w1", "m3", 10).await.unwrap();
    h.assert_ledger_balances("w1").await;
}
