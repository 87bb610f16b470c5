//! What a user reads: money amounts with the currency's minor unit, events that say what is
//! true, and preview tokens that say what is wrong with them.

use proto::{
    common::v1::Money,
    subscription::v1::{self as pb, change::Kind},
};
use runtime::testing::{ADMIN_TOKEN, authed};
use tonic::Code;

use crate::{Harness, admin_user, card, plan_spec};

/// Every amount shows exactly the two decimals of EUR.
fn assert_cents(what: &str, m: &Option<Money>) {
    let m = m.as_ref().unwrap_or_else(|| panic!("{what} is missing"));
    assert_eq!(m.currency, "EUR", "{what}");
    let decimals = m.amount.split_once('.').map(|(_, d)| d.len());
    assert_eq!(decimals, Some(2), "{what} = {:?}", m.amount);
}

#[tokio::test]
async fn every_amount_of_a_preview_and_an_invoice_has_the_currencys_minor_unit() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    // No VAT (e.g. reverse charge): the invoice's VAT is zero.
    let s = h
        .subs
        .clone()
        .subscribe(authed(
            ADMIN_TOKEN,
            pb::SubscribeRequest {
                idempotency_key: h.key(),
                actor: Some(admin_user()),
                account_id: "a1".into(),
                plan_id: "email".into(),
                contacts: 5_000,
                seats: 1,
                add_ons: vec![],
                payment: Some(card("pm_card_ok")),
                vat_rate: "0".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_cents("recurring_price", &s.recurring_price);
    let inv = &h.invoices("a1").await[0];
    assert_eq!(inv.vat.as_ref().unwrap().amount, "0.00");
    for (what, m) in [
        ("subtotal", &inv.subtotal),
        ("vat", &inv.vat),
        ("total", &inv.total),
    ] {
        assert_cents(what, m);
    }
    for l in &inv.lines {
        assert_cents("line", &l.amount);
    }
    // A downgrade (next cycle): nothing due today, shown as "0.00" like the invoice's zero.
    let p = h.preview("a1", Kind::Contacts(1_000)).await.unwrap();
    assert_eq!(p.vat.as_ref().unwrap().amount, "0.00");
    assert_eq!(p.amount_due_today.as_ref().unwrap().amount, "0.00");
    for (what, m) in [
        ("subtotal", &p.subtotal),
        ("vat", &p.vat),
        ("amount_due_today", &p.amount_due_today),
        ("new_recurring_price", &p.new_recurring_price),
    ] {
        assert_cents(what, m);
    }
    // An upgrade (today, prorated) too.
    h.advance(86_400).await;
    let p = h.preview("a1", Kind::Contacts(10_000)).await.unwrap();
    for (what, m) in [
        ("subtotal", &p.subtotal),
        ("vat", &p.vat),
        ("amount_due_today", &p.amount_due_today),
        ("new_recurring_price", &p.new_recurring_price),
    ] {
        assert_cents(what, m);
    }
    for l in &p.lines {
        assert_cents("line", &l.amount);
    }
}

#[tokio::test]
async fn a_card_subscribe_reports_its_invoice_issued_open_then_paid() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.subscribe("a1", "email", 5_000, card("pm_card_ok"))
        .await
        .unwrap();
    let inv = &h.invoices("a1").await[0];
    assert_eq!(inv.status, pb::InvoiceStatus::Paid as i32);
    let issued = h.events_of("subscription.invoice_issued", 1).await;
    let paid = h.events_of("subscription.invoice_paid", 1).await;
    assert_eq!(issued.len(), 1);
    assert_eq!(paid.len(), 1, "the paid invoice has no invoice_paid event");
    // Issued open before the charge, then paid: the stream ends on what is true.
    assert!(issued[0].payload_json.contains("\"status\":\"open\""));
    assert!(issued[0].cursor < paid[0].cursor);
    for e in [&issued[0], &paid[0]] {
        assert!(
            e.payload_json
                .contains(&format!("\"invoice_id\":\"{}\"", inv.invoice_id)),
            "{}",
            e.payload_json
        );
    }
    // The event carries the amount as the invoice shows it.
    assert!(issued[0].payload_json.contains("\"total\":\"36.30\""));
}

#[tokio::test]
async fn a_direct_debit_subscribe_reports_its_invoice_issued_then_payment_pending() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.subscribe(
        "a1",
        "email",
        5_000,
        pb::Payment {
            kind: pb::PaymentKind::DirectDebit as i32,
            payment_method: "pm_sepa_ok".into(),
        },
    )
    .await
    .unwrap();
    let issued = h.events_of("subscription.invoice_issued", 1).await;
    let pending = h.events_of("subscription.invoice_payment_pending", 1).await;
    assert_eq!(pending.len(), 1);
    assert!(issued[0].cursor < pending[0].cursor);
}

// rule S6
#[tokio::test]
async fn s6_a_tampered_preview_token_is_invalid_and_an_outdated_one_is_stale() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.subscribe("a1", "email", 5_000, card("pm_card_ok"))
        .await
        .unwrap();
    h.subscribe("a2", "email", 5_000, card("pm_card_ok"))
        .await
        .unwrap();
    h.advance(86_400).await;
    let up = Kind::Contacts(10_000);
    let p = h.preview("a1", up.clone()).await.unwrap();
    let token = p.preview_token.clone();
    let (body, signature) = token.rsplit_once('.').unwrap();
    let (rest, _amount) = body.rsplit_once('.').unwrap();
    let flipped = {
        let mut s = signature.to_string();
        let last = if s.ends_with('0') { "1" } else { "0" };
        s.pop();
        s + last
    };
    for tampered in [
        format!("{rest}.1.{signature}"),       // a cheaper amount
        format!("{body}.{flipped}"),           // a forged signature
        body.to_string(),                      // no signature
        format!("{body}.{}", &signature[..2]), // a signature cut to its first byte
        "garbage".to_string(),
        format!("{token}.1"),
    ] {
        let err = h.apply("a1", up.clone(), &tampered).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{tampered}: {err:?}");
        assert!(
            err.message()
                .contains("preview token is malformed or was not issued by this service"),
            "{tampered}: {}",
            err.message()
        );
    }
    // Another account's genuine token is not this account's.
    let err = h.apply("a2", up.clone(), &token).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Genuine but outdated: the subscription changed since (FAILED_PRECONDITION, stale).
    h.change("a1", Kind::AddAddOn("sms".into())).await.unwrap();
    let err = h.apply("a1", up.clone(), &token).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("stale"), "{}", err.message());
    // Nothing was charged for any of them.
    assert_eq!(h.invoices("a1").await.len(), 2);
}
