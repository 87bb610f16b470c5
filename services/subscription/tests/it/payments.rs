//! Payments whose outcome comes later: card payments with an unknown outcome finished by the
//! jobs, direct debits that settle or come back, a new payment method for an unpaid
//! subscription, and the monthly credits of yearly plans (S5, S7, S18, C7).

use proto::subscription::v1::{self as pb, change::Kind};
use runtime::testing::{ACT_FOR_USER_TOKEN, ADMIN_TOKEN, authed};
use tonic::Code;

use crate::{Harness, admin_user, card, plan_spec, utc};

pub fn debit(token: &str) -> pb::Payment {
    pb::Payment {
        kind: pb::PaymentKind::DirectDebit as i32,
        payment_method: token.into(),
    }
}

fn subscribe_request(key: &str, account: &str, payment: pb::Payment) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        idempotency_key: key.into(),
        actor: Some(admin_user()),
        account_id: account.into(),
        plan_id: "email".into(),
        contacts: 5_000,
        seats: 1,
        add_ons: vec![],
        payment: Some(payment),
        vat_rate: "0.21".into(),
    }
}

fn update_request(
    key: &str,
    account: &str,
    payment: pb::Payment,
) -> pb::UpdatePaymentMethodRequest {
    pb::UpdatePaymentMethodRequest {
        idempotency_key: key.into(),
        actor: Some(admin_user()),
        account_id: account.into(),
        payment: Some(payment),
    }
}

impl Harness {
    pub async fn update_payment(
        &self,
        account: &str,
        payment: pb::Payment,
    ) -> Result<pb::UpdatePaymentMethodResponse, tonic::Status> {
        self.subs
            .clone()
            .update_payment_method(authed(
                ACT_FOR_USER_TOKEN,
                update_request(&self.key(), account, payment),
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Polls ListInvoices until `pred` holds for the account's invoices (background jobs).
    pub async fn wait_invoices(
        &self,
        account: &str,
        pred: impl Fn(&[pb::Invoice]) -> bool,
    ) -> Vec<pb::Invoice> {
        for _ in 0..100 {
            let inv = self.invoices(account).await;
            if pred(&inv) {
                return inv;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let inv = self.invoices(account).await;
        panic!("invoices never reached the condition: {inv:?}");
    }
}

fn status(s: &pb::Subscription) -> pb::SubscriptionStatus {
    pb::SubscriptionStatus::try_from(s.status).unwrap()
}

// rule S18
#[tokio::test]
async fn s18_a_timed_out_card_subscribe_is_finished_once_by_the_jobs_and_renewals_follow() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let req = subscribe_request("sub-1", "a1", card("pm_card_timeout"));
    let mut c = h.subs.clone();
    let err = c
        .subscribe(authed(ADMIN_TOKEN, req.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // The money may be taken: nothing is sent until the outcome is known.
    assert_eq!(
        status(&h.get("a1").await),
        pb::SubscriptionStatus::Incomplete
    );
    assert_eq!(
        h.check("a1", 1).await.refusal,
        pb::SendingRefusal::PaymentPending as i32
    );
    // The client never retries: after the grace time the jobs ask the gateway again with the
    // same key and apply the outcome.
    h.advance(120).await;
    let s = h
        .wait_for("a1", |s| s.status == pb::SubscriptionStatus::Active as i32)
        .await;
    assert!(s.history.iter().any(|e| e.action == "subscribed"));
    let inv = h.invoices("a1").await;
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].status, pb::InvoiceStatus::Paid as i32);
    assert_eq!(inv[0].payment_attempts, 1);
    assert!(h.check("a1", 1_000).await.allowed);
    // A late retry with the same key gets the same subscription, and nothing is paid twice.
    let again = c
        .subscribe(authed(ADMIN_TOKEN, req))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.subscription_id, s.subscription_id);
    assert_eq!(h.invoices("a1").await.len(), 1);
    // More job runs change nothing.
    h.advance(3_600).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    assert_eq!(h.events_of("subscription.started", 1).await.len(), 1);
    // Renewals are not held back: the next period is invoiced and collected (its own attempt
    // times out first and is asked again with the same key).
    h.advance_to(utc(2026, 2, 1)).await;
    let inv = h
        .wait_invoices("a1", |i| {
            i.len() == 2 && i[1].status == pb::InvoiceStatus::Paid as i32
        })
        .await;
    assert_eq!(inv[1].kind, "renewal");
    assert_eq!(inv[1].payment_attempts, 1);
    // Each invoice paid once: the first (finished by the jobs) and the renewal.
    let paid = h.events_of("subscription.invoice_paid", 2).await;
    assert_eq!(paid.len(), 2, "{paid:?}");
    for i in &inv {
        let id = format!("\"invoice_id\":\"{}\"", i.invoice_id);
        assert_eq!(
            paid.iter().filter(|e| e.payload_json.contains(&id)).count(),
            1,
            "invoice {} is paid once",
            i.number
        );
    }
}

// rule S6
// rule S7
#[tokio::test]
async fn s7_a_timed_out_upgrade_payment_is_applied_once_by_the_jobs_as_previewed() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.advance_to(utc(2026, 4, 1)).await;
    h.subscribe("a1", "email", 5_000, card("pm_card_timeout"))
        .await
        .unwrap_err();
    h.advance(120).await;
    h.wait_for("a1", |s| s.status == pb::SubscriptionStatus::Active as i32)
        .await;
    h.advance_to(utc(2026, 4, 11)).await;
    let p = h.preview("a1", Kind::Contacts(10_000)).await.unwrap();
    let key = h.key();
    let req = pb::ApplyChangeRequest {
        idempotency_key: key,
        actor: Some(admin_user()),
        account_id: "a1".into(),
        change: Some(pb::Change {
            kind: Some(Kind::Contacts(10_000)),
        }),
        preview_token: p.preview_token.clone(),
    };
    let mut c = h.subs.clone();
    let err = c
        .apply_change(authed(ADMIN_TOKEN, req.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // S6: nothing changed yet, and nothing else may change meanwhile.
    assert_eq!(h.get("a1").await.contacts, 5_000);
    let busy = h.preview("a1", Kind::Seats(2)).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition);
    h.advance(120).await;
    let s = h.wait_for("a1", |s| s.contacts == 10_000).await;
    assert!(s.history.iter().any(|e| e.action == "upgraded"));
    let inv = h.invoices("a1").await;
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[1].kind, "change");
    assert_eq!(inv[1].status, pb::InvoiceStatus::Paid as i32);
    assert_eq!(
        inv[1].total, p.amount_due_today,
        "charged what was previewed"
    );
    // The client's late retry gets the applied change, not a second one.
    let again = c
        .apply_change(authed(ADMIN_TOKEN, req))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.invoice.unwrap().invoice_id, inv[1].invoice_id);
    assert_eq!(h.invoices("a1").await.len(), 2);
    assert_eq!(h.events_of("subscription.upgraded", 1).await.len(), 1);
    // And the period still renews.
    h.advance_to(utc(2026, 5, 1)).await;
    let inv = h
        .wait_invoices("a1", |i| {
            i.len() == 3 && i[2].status == pb::InvoiceStatus::Paid as i32
        })
        .await;
    assert_eq!(inv[2].kind, "renewal");
}

// rule S18
// rule C9
#[tokio::test]
async fn s18_a_direct_debit_sends_at_once_and_its_invoice_is_pending_until_it_settles() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    // A mandate is not a card.
    let err = h
        .subscribe("a1", "email", 5_000, card("pm_sepa_ok"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let s = h
        .subscribe("a1", "email", 5_000, debit("pm_sepa_ok"))
        .await
        .unwrap();
    assert_eq!(status(&s), pb::SubscriptionStatus::Active);
    assert_eq!(s.payment.unwrap().kind, pb::PaymentKind::DirectDebit as i32);
    // Card-like access and sending at once; the invoice is not paid yet.
    assert!(h.check("a1", 1_000).await.allowed);
    let inv = h.invoices("a1").await.remove(0);
    assert_eq!(inv.status, pb::InvoiceStatus::Pending as i32);
    assert!(inv.paid_at.is_none());
    h.advance(2 * 86_400).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Pending as i32
    );
    // The bank settles three days after the request.
    h.advance(86_400).await;
    let inv = h
        .wait_invoices("a1", |i| i[0].status == pb::InvoiceStatus::Paid as i32)
        .await;
    assert!(inv[0].paid_at.is_some());
    let s = h.get("a1").await;
    assert!(s.history.iter().any(|e| e.action == "direct_debit_settled"));
    assert_eq!(status(&s), pb::SubscriptionStatus::Active);
    assert_eq!(h.events_of("subscription.invoice_paid", 1).await.len(), 1);
    // Renewals are debited the same way.
    h.advance_to(utc(2026, 2, 1)).await;
    h.wait_invoices("a1", |i| {
        i.len() == 2 && i[1].status == pb::InvoiceStatus::Pending as i32
    })
    .await;
    assert!(h.check("a1", 1).await.allowed);
}

// rule S18
// rule S5
#[tokio::test]
async fn s18_a_returned_direct_debit_reopens_the_invoice_and_stops_sending_until_a_new_method_pays()
{
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.subscribe("a1", "email", 5_000, debit("pm_sepa_returned"))
        .await
        .unwrap();
    assert!(h.check("a1", 1).await.allowed);
    h.advance(3 * 86_400).await;
    let s = h
        .wait_for("a1", |s| s.status == pb::SubscriptionStatus::PastDue as i32)
        .await;
    assert!(
        s.history
            .iter()
            .any(|e| e.action == "direct_debit_returned")
    );
    let inv = h.invoices("a1").await.remove(0);
    assert_eq!(inv.status, pb::InvoiceStatus::Open as i32, "unpaid again");
    assert!(inv.returned_at.is_some());
    let d = h.check("a1", 1).await;
    assert!(!d.allowed);
    assert_eq!(d.refusal, pb::SendingRefusal::PaymentReturned as i32);
    let returned = h.events_of("subscription.payment_returned", 1).await;
    assert_eq!(returned.len(), 1);
    assert!(returned[0].payload_json.contains(&inv.invoice_id));
    // The mandate is not debited again by itself.
    h.advance(86_400).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(h.invoices("a1").await[0].payment_attempts, 1);
    // A new card collects the open invoice at once and sending resumes.
    let r = h.update_payment("a1", card("pm_card_ok")).await.unwrap();
    let s = r.subscription.unwrap();
    assert_eq!(status(&s), pb::SubscriptionStatus::Active);
    assert_eq!(s.payment.unwrap().kind, pb::PaymentKind::Card as i32);
    assert_eq!(r.invoices.len(), 1);
    assert_eq!(r.invoices[0].status, pb::InvoiceStatus::Paid as i32);
    assert!(h.check("a1", 1).await.allowed);
}

// rule S5
#[tokio::test]
async fn s5_update_payment_method_collects_the_open_invoice_of_a_suspended_subscription() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.start_trial("a1", "email", 0).await;
    h.subscribe("a1", "email", 1_000, card("pm_card_declined"))
        .await
        .unwrap();
    h.verify("a1").await;
    for day in [utc(2026, 1, 31), utc(2026, 2, 1), utc(2026, 2, 3)] {
        h.advance_to(day).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    h.wait_for("a1", |s| {
        s.status == pb::SubscriptionStatus::Suspended as i32
    })
    .await;
    assert_eq!(
        h.check("a1", 1).await.refusal,
        pb::SendingRefusal::PaymentPastDue as i32
    );
    let mut c = h.subs.clone();
    // S5: only users with billing permission.
    let mut req = update_request("upd-0", "a1", card("pm_card_ok"));
    req.actor = Some(pb::Actor {
        user_id: "u-editor".into(),
        billing_permission: false,
    });
    let err = c
        .update_payment_method(authed(ACT_FOR_USER_TOKEN, req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let bad = c
        .update_payment_method(authed(
            ACT_FOR_USER_TOKEN,
            update_request("upd-1", "a1", card("pm_nope")),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let req = update_request("upd-2", "a1", card("pm_card_ok"));
    let r = c
        .update_payment_method(authed(ACT_FOR_USER_TOKEN, req.clone()))
        .await
        .unwrap()
        .into_inner();
    let s = r.subscription.clone().unwrap();
    assert_eq!(status(&s), pb::SubscriptionStatus::Active);
    assert_eq!(r.invoices.len(), 1);
    assert_eq!(r.invoices[0].status, pb::InvoiceStatus::Paid as i32);
    assert_eq!(r.invoices[0].payment_attempts, 4);
    assert!(h.check("a1", 1).await.allowed, "sending restored");
    let changed = s
        .history
        .iter()
        .find(|e| e.action == "payment_method_changed")
        .unwrap();
    assert_eq!(changed.actor, "user:u-admin");
    // A retry with the same key answers the same and charges nothing more.
    let again = c
        .update_payment_method(authed(ACT_FOR_USER_TOKEN, req))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, r);
    assert_eq!(h.invoices("a1").await[0].payment_attempts, 4);
    assert_eq!(
        h.events_of("subscription.payment_method_changed", 1)
            .await
            .len(),
        1
    );
}

// rule C7
#[tokio::test]
async fn c7_a_yearly_plan_grants_the_monthly_credits_every_month_each_expiring_at_its_end() {
    let h = Harness::start_with_wallet().await;
    let (_, wallet) = h.wallet.as_ref().unwrap();
    crate::open_wallet(wallet, "a1").await;
    let mut spec = plan_spec("email");
    spec.interval = pb::Interval::Year as i32;
    h.publish(spec).await;
    h.advance_to(utc(2026, 1, 31)).await;
    h.subscribe("a1", "email", 5_000, card("pm_card_ok"))
        .await
        .unwrap();
    let expiries = || async {
        let mut e: Vec<i64> = wallet
            .clone()
            .get_wallet(authed(
                ADMIN_TOKEN,
                proto::wallet::v1::GetWalletRequest {
                    wallet_id: "a1".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .lots
            .iter()
            .filter(|l| l.kind == proto::wallet::v1::LotKind::SubscriptionAllowance as i32)
            .map(|l| {
                assert_eq!(l.granted, 1_000);
                l.expires_at.as_ref().unwrap().seconds
            })
            .collect();
        e.sort();
        e
    };
    let wait_lots = |n: usize| async move {
        for _ in 0..100 {
            if expiries().await.len() >= n {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        expiries().await
    };
    // Month 1 of the year: 31 Jan .. 28 Feb (clamped), counted from the anchor.
    assert_eq!(wait_lots(1).await, vec![utc(2026, 2, 28).timestamp()]);
    // Later in the same month: nothing more.
    h.advance_to(utc(2026, 2, 20)).await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(expiries().await.len(), 1);
    // Month 2: 28 Feb .. 31 Mar.
    h.advance_to(utc(2026, 3, 1)).await;
    assert_eq!(
        wait_lots(2).await,
        vec![utc(2026, 2, 28).timestamp(), utc(2026, 3, 31).timestamp()]
    );
    // Month 3: 31 Mar .. 30 Apr.
    h.advance_to(utc(2026, 4, 15)).await;
    assert_eq!(
        wait_lots(3).await,
        vec![
            utc(2026, 2, 28).timestamp(),
            utc(2026, 3, 31).timestamp(),
            utc(2026, 4, 30).timestamp()
        ]
    );
    // Idempotent per month, and a yearly plan is still invoiced once a year.
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    assert_eq!(expiries().await.len(), 3);
    assert_eq!(h.invoices("a1").await.len(), 1);
    let granted = h.events_of("subscription.credits_granted", 3).await;
    assert_eq!(granted.len(), 3);
    assert!(granted[2].payload_json.contains("\"month\":2"));
}
