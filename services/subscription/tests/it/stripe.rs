//! Invoices paid through Stripe: the service configured with `payment_provider = "stripe"`
//! against a local Stripe (localstripe, see `runtime::testing::localstripe`), the real adapter
//! over HTTP. Skipped with a message when no local Stripe can be had, unless
//! `BILLING_TEST_STRIPE=required`.

use proto::subscription::v1 as pb;
use runtime::testing::{TestDatabase, localstripe, stripe_events};
use tonic::Code;

use crate::{Harness, card, payments::debit, plan_spec};

async fn stripe_service() -> Option<(Harness, String)> {
    let url = localstripe::url()?;
    let h = Harness::start_with(&localstripe::settings(&url), None, TestDatabase::fresh()).await;
    Some((h, url))
}

fn minor_units(m: Option<&proto::common::v1::Money>) -> i64 {
    m.unwrap().amount.replace('.', "").parse().unwrap()
}

// rule S18: paying by card gives access and sending at once
#[tokio::test]
async fn s18_a_card_subscription_invoice_is_paid_through_stripe_for_its_exact_total() {
    let Some((h, url)) = stripe_service().await else {
        return;
    };
    h.publish(plan_spec("email")).await;
    let token = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    let s = h
        .subscribe("a1", "email", 5_000, card(&token))
        .await
        .unwrap();
    assert_eq!(s.status, pb::SubscriptionStatus::Active as i32);
    let invoice = h.invoices("a1").await.remove(0);
    assert_eq!(
        invoice.status,
        pb::InvoiceStatus::Paid as i32,
        "{invoice:?}"
    );
    assert!(h.check("a1", 1_000).await.allowed);
    let customer = token.split(':').next().unwrap();
    let intents = localstripe::payment_intents_of(&url, customer).await;
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(intents[0]["amount"], minor_units(invoice.total.as_ref()));
    assert_eq!(intents[0]["currency"], "eur");
    assert_eq!(intents[0]["status"], "succeeded");
    assert_eq!(h.events_of("subscription.invoice_paid", 1).await.len(), 1);
}

// rule S18
#[tokio::test]
async fn s18_a_card_declined_by_stripe_is_refused_and_subscribes_nothing() {
    let Some((h, url)) = stripe_service().await else {
        return;
    };
    h.publish(plan_spec("email")).await;
    let token = localstripe::customer_with_card(&url, localstripe::CARD_DECLINED).await;
    let err = h
        .subscribe("a1", "email", 5_000, card(&token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("declined"), "{}", err.message());
    assert_eq!(
        h.check("a1", 1).await.refusal,
        pb::SendingRefusal::NoSubscription as i32
    );
    for invoice in h.invoices("a1").await {
        assert_ne!(
            invoice.status,
            pb::InvoiceStatus::Paid as i32,
            "{invoice:?}"
        );
    }
}

// rule S18: by bank (direct debit), sending waits for nothing, but a returned debit stops it
#[tokio::test]
async fn s18_a_sepa_debit_through_stripe_that_fails_later_reopens_the_invoice() {
    let Some((h, url)) = stripe_service().await else {
        return;
    };
    h.publish(plan_spec("email")).await;
    // A simulator token is not a Stripe payment method.
    let err = h
        .subscribe("a1", "email", 5_000, debit("pm_sepa_ok"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("cus_<id>:pm_<id>"),
        "{}",
        err.message()
    );

    let mandate = localstripe::customer_with_sepa(&url, localstripe::IBAN_FAILS_LATER).await;
    let s = h
        .subscribe("a1", "email", 5_000, debit(&mandate))
        .await
        .unwrap();
    assert_eq!(s.status, pb::SubscriptionStatus::Active as i32);
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Pending as i32
    );
    // localstripe fails the debit half a second later; the jobs poll the PaymentIntent.
    let s = h
        .wait_for("a1", |s| s.status == pb::SubscriptionStatus::PastDue as i32)
        .await;
    assert!(
        s.history
            .iter()
            .any(|e| e.action == "direct_debit_returned")
    );
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Open as i32
    );
    assert!(!h.check("a1", 1).await.allowed);
    // A card saved on Stripe then pays the open invoice.
    let token = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    let r = h.update_payment("a1", card(&token)).await.unwrap();
    assert_eq!(r.invoices[0].status, pb::InvoiceStatus::Paid as i32);
    assert!(h.check("a1", 1).await.allowed);
}

// ---- webhooks ----------------------------------------------------------------------------------

const WEBHOOK_SECRET: &str = "whsec_billing_suite_test";

async fn deliver(h: &Harness, payload: &[u8], secret: &str) -> (u16, String) {
    stripe_events::deliver(h.running.metrics_addr.unwrap(), payload, secret, None).await
}

// rule S18
#[tokio::test]
async fn s18_a_payment_failed_webhook_returns_a_pending_debit_once_and_a_forged_one_changes_nothing()
 {
    let Some(url) = localstripe::url() else {
        return;
    };
    // localstripe fails the debit half a second after creating it; through the front the
    // jobs' polling keeps seeing it processing, so only the webhook returns it.
    let front = localstripe::Front::start(&url).await;
    front.keep_payments_processing();
    let settings = format!(
        "{}stripe_webhook_secret = \"{WEBHOOK_SECRET}\"\n",
        localstripe::settings(&front.url)
    );
    let h = Harness::start_with(&settings, None, TestDatabase::fresh()).await;
    h.publish(plan_spec("email")).await;
    let mandate = localstripe::customer_with_sepa(&url, localstripe::IBAN_FAILS_LATER).await;
    h.subscribe("a1", "email", 5_000, debit(&mandate))
        .await
        .unwrap();
    let intents = localstripe::payment_intents_of(&url, mandate.split(':').next().unwrap()).await;
    let key = intents[0]["metadata"]["billing_key"]
        .as_str()
        .unwrap()
        .to_string();
    let event = serde_json::json!({
        "id": format!("evt_{key}"), "object": "event", "type": "payment_intent.payment_failed",
        "data": {"object": {
            "id": intents[0]["id"], "object": "payment_intent", "metadata": {"billing_key": key},
            "last_payment_error": {"code": "charge_exceeds_source_limit"},
        }},
    })
    .to_string()
    .into_bytes();

    // Signed with another secret: refused, the invoice stays pending.
    assert_eq!(
        deliver(&h, &event, "whsec_forged").await,
        (400, "invalid signature".into())
    );
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Pending as i32
    );
    // The genuine delivery returns the debit before answering.
    assert_eq!(
        deliver(&h, &event, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Open as i32
    );
    assert_eq!(
        h.get("a1").await.status,
        pb::SubscriptionStatus::PastDue as i32
    );
    assert_eq!(
        deliver(&h, &event, WEBHOOK_SECRET).await,
        (200, "already applied".into())
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let s = h.get("a1").await;
    let returns = s
        .history
        .iter()
        .filter(|e| e.action == "direct_debit_returned")
        .count();
    assert_eq!(returns, 1, "returned once: {:?}", s.history);
    assert_eq!(
        h.events_of("subscription.payment_returned", 1).await.len(),
        1
    );
}

// ---- refunds and disputes ----------------------------------------------------------------------

/// A service paying through localstripe with the webhook endpoint served, and account `a1`
/// subscribed by card: (harness, localstripe's URL, the first invoice, its PaymentIntent's id).
async fn paid_by_card_with_webhooks() -> Option<(Harness, String, pb::Invoice, String)> {
    let url = localstripe::url()?;
    // Through the front, which honours Idempotency-Key as Stripe does (localstripe does not):
    // the reopened invoice's collection by UpdatePaymentMethod and by the jobs may race with
    // the same key, and Stripe makes one PaymentIntent of them.
    let front = localstripe::Front::start(&url).await;
    let settings = format!(
        "{}stripe_webhook_secret = \"{WEBHOOK_SECRET}\"\n",
        localstripe::settings(&front.url)
    );
    let h = Harness::start_with(&settings, None, TestDatabase::fresh()).await;
    h.publish(plan_spec("email")).await;
    let token = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    h.subscribe("a1", "email", 5_000, card(&token))
        .await
        .unwrap();
    let invoice = h.invoices("a1").await.remove(0);
    assert_eq!(invoice.status, pb::InvoiceStatus::Paid as i32);
    let intents = localstripe::payment_intents_of(&url, token.split(':').next().unwrap()).await;
    assert_eq!(intents.len(), 1, "{intents:?}");
    let pi = intents[0]["id"].as_str().unwrap().to_string();
    Some((h, url, invoice, pi))
}

// rule S18: a refund is the platform's decision: the invoice says so, the subscription goes on
#[tokio::test]
async fn s18_a_full_refund_webhook_marks_the_invoice_refunded_once_and_leaves_the_subscription_alone()
 {
    let Some((h, _, invoice, pi)) = paid_by_card_with_webhooks().await else {
        return;
    };
    let total = minor_units(invoice.total.as_ref());
    let refund = stripe_events::refund("evt_refund_1", &pi, total, total);
    assert_eq!(
        deliver(&h, &refund, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Refunded as i32
    );
    let s = h.get("a1").await;
    assert_eq!(s.status, pb::SubscriptionStatus::Active as i32);
    assert!(h.check("a1", 1_000).await.allowed);
    let events = h.events_of("subscription.invoice_refunded", 1).await;
    assert_eq!(events.len(), 1);
    let payload: serde_json::Value = serde_json::from_str(&events[0].payload_json).unwrap();
    assert_eq!(payload["invoice_id"], invoice.invoice_id);
    assert_eq!(payload["amount"], invoice.total.as_ref().unwrap().amount);

    // Delivered again: recorded once, applied once.
    assert_eq!(
        deliver(&h, &refund, WEBHOOK_SECRET).await,
        (200, "already applied".into())
    );
    // A dispute after the refund has nothing left to take back.
    let dispute = stripe_events::dispute("evt_dispute_1", &pi, total);
    assert_eq!(
        deliver(&h, &dispute, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Refunded as i32
    );
    assert_eq!(
        h.get("a1").await.status,
        pb::SubscriptionStatus::Active as i32
    );
    assert_eq!(
        h.events_of("subscription.invoice_refunded", 1).await.len(),
        1
    );
    assert!(
        h.events_of("subscription.payment_returned", 0)
            .await
            .is_empty()
    );
}

// rule S18: a disputed card payment is money taken back, as a returned direct debit
#[tokio::test]
async fn s18_a_dispute_reopens_the_invoice_and_stops_sending_until_a_new_card_pays_it() {
    let Some((h, url, invoice, pi)) = paid_by_card_with_webhooks().await else {
        return;
    };
    let total = minor_units(invoice.total.as_ref());
    let dispute = stripe_events::dispute("evt_dispute_1", &pi, total);
    assert_eq!(
        deliver(&h, &dispute, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    let reopened = h.invoices("a1").await.remove(0);
    assert_eq!(reopened.status, pb::InvoiceStatus::Open as i32);
    assert!(reopened.returned_at.is_some());
    let s = h.get("a1").await;
    assert_eq!(s.status, pb::SubscriptionStatus::PastDue as i32);
    assert!(s.history.iter().any(|e| e.action == "payment_disputed"));
    assert!(!h.check("a1", 1).await.allowed);
    let events = h.events_of("subscription.payment_returned", 1).await;
    assert!(
        events[0].payload_json.contains(r#""reason":"disputed""#),
        "{}",
        events[0].payload_json
    );
    assert_eq!(
        deliver(&h, &dispute, WEBHOOK_SECRET).await,
        (200, "already applied".into())
    );

    // A new card pays the reopened invoice: one new PaymentIntent for its total.
    let token = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    let r = h.update_payment("a1", card(&token)).await.unwrap();
    assert_eq!(r.invoices[0].status, pb::InvoiceStatus::Paid as i32);
    assert!(h.check("a1", 1).await.allowed);
    let intents = localstripe::payment_intents_of(&url, token.split(':').next().unwrap()).await;
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(intents[0]["amount"], total);

    // A late refund of the first, disputed PaymentIntent does not touch the invoice the new
    // card paid.
    let refund = stripe_events::refund("evt_refund_1", &pi, total, total);
    assert_eq!(
        deliver(&h, &refund, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Paid as i32
    );
    assert!(
        h.events_of("subscription.invoice_refunded", 0)
            .await
            .is_empty()
    );
}

// rule S18
#[tokio::test]
async fn s18_a_partial_refund_changes_no_invoice_and_says_how_much_came_back() {
    let Some((h, _, invoice, pi)) = paid_by_card_with_webhooks().await else {
        return;
    };
    let total = minor_units(invoice.total.as_ref());
    let refund = stripe_events::refund("evt_refund_1", &pi, total, 100);
    assert_eq!(
        deliver(&h, &refund, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    let events = h.events_of("subscription.payment_partly_reversed", 1).await;
    let payload: serde_json::Value = serde_json::from_str(&events[0].payload_json).unwrap();
    assert_eq!(payload["reversed_amount"], "1.00");
    assert_eq!(payload["reason"], "refunded");
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Paid as i32
    );
    assert_eq!(
        h.get("a1").await.status,
        pb::SubscriptionStatus::Active as i32
    );
}

// rule S18: a dispute the platform wins is the payment back: the reopened invoice is paid again
#[tokio::test]
async fn s18_a_dispute_won_pays_the_reopened_invoice_again_once_and_sending_resumes() {
    let Some((h, _, invoice, pi)) = paid_by_card_with_webhooks().await else {
        return;
    };
    let total = minor_units(invoice.total.as_ref());
    // Stripe does not promise order: a closing before its dispute waits for it.
    let won = stripe_events::dispute_closed("evt_dispute_won", &pi, total, "won");
    assert_eq!(
        deliver(&h, &won, WEBHOOK_SECRET).await,
        (500, "not applied".into())
    );
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Paid as i32
    );
    let dispute = stripe_events::dispute("evt_dispute_1", &pi, total);
    assert_eq!(
        deliver(&h, &dispute, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    assert_eq!(
        h.get("a1").await.status,
        pb::SubscriptionStatus::PastDue as i32
    );
    assert!(!h.check("a1", 1).await.allowed);

    assert_eq!(
        deliver(&h, &won, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    let paid = h.invoices("a1").await.remove(0);
    assert_eq!(paid.status, pb::InvoiceStatus::Paid as i32);
    assert!(paid.returned_at.is_none(), "{paid:?}");
    assert!(paid.paid_at.is_some());
    let s = h.get("a1").await;
    assert_eq!(s.status, pb::SubscriptionStatus::Active as i32);
    assert!(s.history.iter().any(|e| e.action == "dispute_won"));
    assert!(h.check("a1", 1).await.allowed);
    let events = h.events_of("subscription.payment_reinstated", 1).await;
    assert_eq!(events.len(), 1);
    let payload: serde_json::Value = serde_json::from_str(&events[0].payload_json).unwrap();
    assert_eq!(payload["invoice_id"], invoice.invoice_id);

    // Delivered again: nothing more.
    assert_eq!(
        deliver(&h, &won, WEBHOOK_SECRET).await,
        (200, "already applied".into())
    );
    assert_eq!(
        h.events_of("subscription.payment_reinstated", 1)
            .await
            .len(),
        1
    );
}

// rule S18: a lost dispute leaves the money with the customer: the invoice stays open
#[tokio::test]
async fn s18_a_lost_dispute_leaves_the_invoice_open_and_sending_stopped() {
    let Some((h, _, invoice, pi)) = paid_by_card_with_webhooks().await else {
        return;
    };
    let total = minor_units(invoice.total.as_ref());
    let dispute = stripe_events::dispute("evt_dispute_1", &pi, total);
    assert_eq!(
        deliver(&h, &dispute, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    let lost = stripe_events::dispute_closed("evt_dispute_lost", &pi, total, "lost");
    assert_eq!(
        deliver(&h, &lost, WEBHOOK_SECRET).await,
        (200, "applied".into())
    );
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Open as i32
    );
    assert_eq!(
        h.get("a1").await.status,
        pb::SubscriptionStatus::PastDue as i32
    );
    assert!(!h.check("a1", 1).await.allowed);
    assert!(
        h.events_of("subscription.payment_reinstated", 0)
            .await
            .is_empty()
    );
}
