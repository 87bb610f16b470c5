//! Who pays for a customer's send (W1-W5), caps, allocations, holds and usage statements.

use proto::{
    reseller::v1::{self as pb, BillingMode, PartnerFunding, Payer},
    wallet::v1 as wpb,
};
use runtime::testing::{ADMIN_TOKEN, authed};
use tonic::Code;

use crate::Harness;

// rule W3
#[tokio::test]
async fn w3_a_prepaid_partners_credits_are_deducted_at_once_for_a_customer_send() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 50_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    let charge = h.charge("p1", "c1", "m1", 5_000).await.unwrap();
    assert_eq!(charge.payer, Payer::Partner as i32);
    assert_eq!(charge.credits, 5_000);
    assert_eq!(charge.payer_balance_after, 45_000);
    assert_eq!(h.balance("partner:p1").await, 45_000);

    // The same at 1.05 credits per recipient: 44,750.
    h.register("p2", "1.05", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p2", 50_000).await;
    h.add("p2", "c2", BillingMode::PartnerPays).await;
    let charge = h.charge("p2", "c2", "m1", 5_000).await.unwrap();
    assert_eq!(charge.credits, 5_250);
    assert_eq!(h.balance("partner:p2").await, 44_750);
}

// rule W2
#[tokio::test]
async fn w2_partner_pays_takes_credits_from_the_partner_main_account_for_all_its_customers() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 10_000).await;
    for c in ["c1", "c2", "c3"] {
        h.add("p1", c, BillingMode::PartnerPays).await;
        h.charge("p1", c, "m", 2_000).await.unwrap();
    }
    assert_eq!(h.balance("partner:p1").await, 4_000);
    // Not enough left: refused with the wallet's shortfall, nothing debited.
    let err = h.charge("p1", "c1", "big", 5_000).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("short by 1000"), "{}", err.message());
    assert_eq!(h.balance("partner:p1").await, 4_000);
    // The entry is attributed: the wallet's reference names the mailing, the statement the customer.
    let now = h.reseller.platform.clock.now();
    use chrono::Datelike;
    let statement = h
        .client
        .clone()
        .get_usage_statement(authed(
            ADMIN_TOKEN,
            pb::GetUsageStatementRequest {
                partner_id: "p1".into(),
                year: now.year(),
                month: now.month(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statement.customers.len(), 3);
    assert!(
        statement
            .customers
            .iter()
            .all(|c| c.partner_paid_credits == 2_000 && c.mailings == 1)
    );
}

// rule W1
#[tokio::test]
async fn w1_switching_a_customer_to_customer_pays_moves_the_next_charge_to_its_own_wallet() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 10_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    h.charge("p1", "c1", "m1", 1_000).await.unwrap();
    let customer = h.set_mode("p1", "c1", BillingMode::CustomerPays).await;
    assert_eq!(customer.wallet_id, "customer:p1:c1");
    h.buy("customer:p1:c1", 3_000).await;
    let charge = h.charge("p1", "c1", "m2", 1_000).await.unwrap();
    assert_eq!(charge.payer, Payer::Customer as i32);
    assert_eq!(charge.payer_wallet_id, "customer:p1:c1");
    assert_eq!(h.balance("customer:p1:c1").await, 2_000);
    assert_eq!(
        h.balance("partner:p1").await,
        9_000,
        "the partner pays no more"
    );
    assert_eq!(
        h.events_of("reseller.billing_mode_changed", 1).await.len(),
        1
    );
    // And back: the change applies to sends from then on.
    h.set_mode("p1", "c1", BillingMode::PartnerPays).await;
    h.charge("p1", "c1", "m3", 1_000).await.unwrap();
    assert_eq!(h.balance("partner:p1").await, 8_000);
}

// rule W5
#[tokio::test]
async fn w5_an_on_demand_partner_is_charged_for_exactly_the_credits_each_send_needs() {
    let h = Harness::start().await;
    h.register("p1", "1.05", PartnerFunding::OnDemand, "pm_card_ok")
        .await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    let charge = h.charge("p1", "c1", "m1", 5_000).await.unwrap();
    let wallet_charge = charge.charge.unwrap();
    assert_eq!(wallet_charge.credits_bought, 5_250);
    let purchase = wallet_charge.purchase.unwrap();
    assert_eq!(purchase.credits, 5_250);
    assert_eq!(purchase.amount.unwrap().amount, "52.50");
    assert_eq!(purchase.payment_method, "pm_card_ok");
    assert_eq!(h.balance("partner:p1").await, 0);

    // A direct-debit partner works the same way (Germany, Austria).
    h.register("p2", "1", PartnerFunding::OnDemand, "pm_sepa_ok")
        .await;
    h.add("p2", "c2", BillingMode::PartnerPays).await;
    let charge = h.charge("p2", "c2", "m1", 800).await.unwrap();
    assert_eq!(charge.charge.unwrap().credits_bought, 800);
}

// rule W4
#[tokio::test]
async fn w4_the_partner_sets_a_credit_reminder_and_automatic_re_purchase_on_its_main_account() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "pm_card_ok")
        .await;
    h.buy("partner:p1", 10_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    let mut c = h.client.clone();
    c.configure_partner_reminder(authed(
        ADMIN_TOKEN,
        pb::ConfigurePartnerReminderRequest {
            idempotency_key: h.key(),
            partner_id: "p1".into(),
            threshold: 5_000,
        },
    ))
    .await
    .unwrap();
    let partner = c
        .configure_partner_auto_top_up(authed(
            ADMIN_TOKEN,
            pb::ConfigurePartnerAutoTopUpRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                auto_top_up: Some(wpb::AutoTopUp {
                    mode: wpb::AutoTopUpMode::Fixed as i32,
                    threshold: 0,
                    amount: 20_000,
                    ..Default::default()
                }),
                payment_method: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let wallet = partner.wallet.unwrap();
    assert_eq!(wallet.low_balance_threshold, 5_000);
    assert_eq!(wallet.auto_top_up.unwrap().amount, 20_000);

    h.charge("p1", "c1", "m1", 6_000).await.unwrap(); // 4,000: below the reminder
    h.charge("p1", "c1", "m2", 4_000).await.unwrap(); // used up: re-purchase 20,000
    let reminders = h.events_of("reseller.partner_low_balance", 1).await;
    assert_eq!(reminders.len(), 1);
    assert_eq!(reminders[0].subject, "p1");
    assert_eq!(
        h.events_of("reseller.partner_top_up_succeeded", 1)
            .await
            .len(),
        1
    );
    assert_eq!(h.balance("partner:p1").await, 20_000);
}

#[tokio::test]
async fn a_customer_over_its_monthly_limit_is_refused_and_the_partner_told() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 50_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    let customer = h
        .client
        .clone()
        .set_customer_limit(authed(
            ADMIN_TOKEN,
            pb::SetCustomerLimitRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                monthly_credit_limit: 5_000,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(customer.monthly_credit_limit, 5_000);
    h.charge("p1", "c1", "m1", 4_000).await.unwrap();
    let err = h.charge("p1", "c1", "m2", 1_001).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("limit"), "{}", err.message());
    h.charge("p1", "c1", "m3", 1_000).await.unwrap();
    assert_eq!(h.balance("partner:p1").await, 45_000);
    assert_eq!(
        h.events_of("reseller.customer_limit_reached", 1)
            .await
            .len(),
        1
    );
    let c = h
        .client
        .clone()
        .get_customer(authed(
            ADMIN_TOKEN,
            pb::GetCustomerRequest {
                partner_id: "p1".into(),
                customer_id: "c1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.credits_used_this_month, 5_000);
}

#[tokio::test]
async fn allocated_credits_move_from_the_partner_into_the_customers_own_wallet() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 10_000).await;
    h.add("p1", "c1", BillingMode::CustomerPays).await;
    let allocation = h
        .client
        .clone()
        .allocate_credits(authed(
            ADMIN_TOKEN,
            pb::AllocateCreditsRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                credits: 3_000,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allocation.partner_wallet.unwrap().balance, 7_000);
    assert_eq!(allocation.customer_wallet.unwrap().balance, 3_000);
    let charge = h.charge("p1", "c1", "m1", 2_500).await.unwrap();
    assert_eq!(charge.payer, Payer::Customer as i32);
    assert_eq!(h.balance("customer:p1:c1").await, 500);
    assert_eq!(h.balance("partner:p1").await, 7_000);
}

#[tokio::test]
async fn holds_route_like_charges_and_settle_at_the_wallet_that_holds() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 10_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    let mut c = h.client.clone();
    let held = c
        .reserve_mailing(authed(
            ADMIN_TOKEN,
            pb::ReserveMailingRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                mailing_id: "m1".into(),
                recipients: 4_000,
                ttl_seconds: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.payer_wallet_id, "partner:p1");
    let reservation_id = held.reservation.unwrap().reservation_id;
    // The mode changes while the mailing is scheduled: the hold still settles where it is.
    h.set_mode("p1", "c1", BillingMode::CustomerPays).await;
    let captured = c
        .capture_mailing(authed(
            ADMIN_TOKEN,
            pb::CaptureMailingRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                reservation_id: reservation_id.clone(),
                recipients_sent: 3_500,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(captured.reservation.unwrap().captured_credits, 3_500);
    assert_eq!(h.balance("partner:p1").await, 6_500);
    let err = c
        .release_mailing(authed(
            ADMIN_TOKEN,
            pb::ReleaseMailingRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                reservation_id,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn the_usage_statement_prices_each_customer_at_the_partners_resale_prices() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 50_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    h.add("p1", "c2", BillingMode::PartnerPays).await;
    let mut c = h.client.clone();
    c.set_resale_prices(authed(
        ADMIN_TOKEN,
        pb::SetResalePricesRequest {
            idempotency_key: h.key(),
            partner_id: "p1".into(),
            resale_prices: Some(wpb::CreditPricing {
                mode: wpb::TierMode::Graduated as i32,
                tiers: vec![
                    wpb::PriceTier {
                        first: 1,
                        last: 10_000,
                        unit_price: "0.0125".into(),
                        flat_price: String::new(),
                    },
                    wpb::PriceTier {
                        first: 10_001,
                        last: 0,
                        unit_price: "0.01".into(),
                        flat_price: String::new(),
                    },
                ],
            }),
        },
    ))
    .await
    .unwrap();
    h.charge("p1", "c1", "m1", 5_000).await.unwrap();
    h.charge("p1", "c1", "m2", 7_001).await.unwrap();
    h.charge("p1", "c2", "m1", 100).await.unwrap();
    let now = h.reseller.platform.clock.now();
    use chrono::Datelike;
    let statement = c
        .get_usage_statement(authed(
            ADMIN_TOKEN,
            pb::GetUsageStatementRequest {
                partner_id: "p1".into(),
                year: now.year(),
                month: now.month(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let c1 = &statement.customers[0];
    assert_eq!(
        (
            c1.customer_id.as_str(),
            c1.mailings,
            c1.recipients,
            c1.credits_used
        ),
        ("c1", 2, 12_001, 12_001)
    );
    // 10,000 * 0.0125 + 2,001 * 0.01 = 145.01
    assert_eq!(c1.amount.as_ref().unwrap().amount, "145.01");
    assert_eq!(
        statement.customers[1].amount.as_ref().unwrap().amount,
        "1.25"
    );
    assert_eq!(statement.total.unwrap().amount, "146.26");
    // Another month has nothing.
    let empty = c
        .get_usage_statement(authed(
            ADMIN_TOKEN,
            pb::GetUsageStatementRequest {
                partner_id: "p1".into(),
                year: now.year() - 1,
                month: now.month(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.customers.is_empty());
}
