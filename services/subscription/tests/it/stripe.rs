//! Invoices paid through Stripe: the service configured with `payment_provider = "stripe"`
//! against a local Stripe (localstripe, see `runtime::testing::localstripe`), the real adapter
//! over HTTP. Skipped with a message when no local Stripe can be had, unless
//! `BILLING_TEST_STRIPE=required`.

use proto::subscription::v1 as pb;
use runtime::testing::{TestDatabase, localstripe};
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
