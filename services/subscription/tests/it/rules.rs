//! One or more tests per rule of DOMAIN.md (S1-S19), named after it, driven by the test clock.

use futures::future::join_all;
use proto::subscription::v1::{self as pb, change::Kind};
use runtime::testing::{ACT_FOR_USER_TOKEN, ADMIN_TOKEN, MUTATE_TOKEN, authed};
use tonic::Code;

use crate::{Harness, admin_user, bank, card, plan_spec, utc};

fn amount(m: &Option<proto::common::v1::Money>) -> String {
    m.as_ref().unwrap().amount.clone()
}

async fn subscribed(h: &Harness, account: &str, contacts: u64) -> pb::Subscription {
    h.subscribe(account, "email", contacts, card("pm_card_ok"))
        .await
        .unwrap()
}

// rule S18
#[tokio::test]
async fn s18_card_subscription_charges_the_first_invoice_and_sends_at_once() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let s = subscribed(&h, "a1", 5_000).await;
    assert_eq!(s.status, pb::SubscriptionStatus::Active as i32);
    assert_eq!(amount(&s.recurring_price), "30.00");
    let inv = h.invoices("a1").await;
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].status, pb::InvoiceStatus::Paid as i32);
    assert_eq!(amount(&inv[0].subtotal), "30.00");
    assert_eq!(amount(&inv[0].vat), "6.30");
    assert_eq!(amount(&inv[0].total), "36.30");
    assert!(h.check("a1", 1_000).await.allowed);
}

// rule S18
#[tokio::test]
async fn s18_bank_transfer_gives_access_but_no_sending_until_the_transfer_is_recorded() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let s = h.subscribe("a1", "email", 5_000, bank()).await.unwrap();
    assert_eq!(s.status, pb::SubscriptionStatus::Active as i32);
    let d = h.check("a1", 1).await;
    assert!(!d.allowed);
    assert_eq!(d.refusal, pb::SendingRefusal::BankTransferUnpaid as i32);
    let inv = h.invoices("a1").await.remove(0);
    assert_eq!(inv.status, pb::InvoiceStatus::Open as i32);
    let mut c = h.subs.clone();
    let wrong = c
        .record_bank_transfer(authed(
            ADMIN_TOKEN,
            pb::RecordBankTransferRequest {
                idempotency_key: h.key(),
                actor: None,
                invoice_id: inv.invoice_id.clone(),
                amount: Some(proto::common::v1::Money {
                    amount: "30.00".into(),
                    currency: "EUR".into(),
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    let paid = c
        .record_bank_transfer(authed(
            ADMIN_TOKEN,
            pb::RecordBankTransferRequest {
                idempotency_key: h.key(),
                actor: None,
                invoice_id: inv.invoice_id.clone(),
                amount: inv.total.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paid.status, pb::InvoiceStatus::Paid as i32);
    assert!(h.check("a1", 1).await.allowed);
    let history = h.get("a1").await.history;
    assert!(history.iter().any(|e| e.action == "bank_transfer_received"));
}

// rule S18
#[tokio::test]
async fn s18_a_declined_card_creates_nothing_and_says_why() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let err = h
        .subscribe("a1", "email", 5_000, card("pm_card_declined"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("declined"), "{}", err.message());
    assert_eq!(
        h.check("a1", 1).await.refusal,
        pb::SendingRefusal::NoSubscription as i32
    );
    // The number stays used by the voided invoice: no gap.
    subscribed(&h, "a2", 1_000).await;
    let numbers: Vec<u64> = h.invoices("a2").await.iter().map(|i| i.number).collect();
    assert_eq!(numbers, vec![2]);
}

// rule S5
#[tokio::test]
async fn s5_only_users_with_billing_permission_see_or_change_billing() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let mut c = h.subs.clone();
    let no_permission = pb::Actor {
        user_id: "u-editor".into(),
        billing_permission: false,
    };
    let req = |actor: pb::Actor, key: &str| pb::SubscribeRequest {
        idempotency_key: key.into(),
        actor: Some(actor),
        account_id: "a1".into(),
        plan_id: "email".into(),
        contacts: 5_000,
        seats: 1,
        add_ons: vec![],
        payment: Some(card("pm_card_ok")),
        vat_rate: String::new(),
    };
    let err = c
        .subscribe(authed(ACT_FOR_USER_TOKEN, req(no_permission.clone(), "s1")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A token without act-for-user may not act for a user at all.
    let err = c
        .subscribe(authed(MUTATE_TOKEN, req(admin_user(), "s2")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c
        .get_subscription(authed(
            ACT_FOR_USER_TOKEN,
            pb::GetSubscriptionRequest {
                actor: Some(no_permission),
                account_id: "a1".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The primary admin may; the history names who did what.
    c.subscribe(authed(ACT_FOR_USER_TOKEN, req(admin_user(), "s3")))
        .await
        .unwrap();
    h.admit("a1", 10).await;
    let s = h.get("a1").await;
    assert_eq!(s.history[0].actor, "user:u-admin");
    assert_eq!(s.history[0].action, "subscribed");
    h.verify("a1").await;
    let s = h.get("a1").await;
    assert_eq!(s.history.last().unwrap().actor, "service:test-admin");
    assert!(s.verified);
}

// rule S1
// rule S11
// rule S12
#[tokio::test]
async fn s1_s11_s12_contacts_beyond_the_tier_wait_pending_and_the_plan_never_upgrades_itself() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    subscribed(&h, "a1", 1_000).await;
    let r = h.admit("a1", 900).await;
    assert_eq!((r.subscribed, r.pending_upgrade), (900, 0));
    let r = h.admit("a1", 250).await;
    assert_eq!((r.subscribed, r.pending_upgrade), (100, 150));
    let usage = r.usage.unwrap();
    assert_eq!(
        (usage.active, usage.pending, usage.limit),
        (1_000, 150, 1_000)
    );
    // S11: nothing upgraded by itself.
    assert_eq!(h.get("a1").await.contacts, 1_000);
    // S1: released (archived, deleted, unsubscribed) contacts stop counting.
    let u = h
        .subs
        .clone()
        .release_contacts(authed(
            ADMIN_TOKEN,
            pb::ReleaseContactsRequest {
                idempotency_key: h.key(),
                actor: None,
                account_id: "a1".into(),
                subscribed: 300,
                pending: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((u.active, u.pending), (700, 150));
    // S12: after an upgrade, pending contacts become subscribed up to the new limit.
    let applied = h.change("a1", Kind::Contacts(2_000)).await.unwrap();
    assert_eq!(applied.contacts_promoted, 150);
    let usage = applied.subscription.unwrap().usage.unwrap();
    assert_eq!((usage.active, usage.pending, usage.limit), (850, 0, 2_000));
    let promoted = h.events_of("subscription.contacts_promoted", 1).await;
    assert!(promoted[0].payload_json.contains("\"count\":150"));
}

// rule S6
// rule S7
// rule S19
#[tokio::test]
async fn s7_slider_upgrade_5000_to_10000_on_day_10_of_a_30_day_month_charges_exactly_the_preview() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.advance_to(utc(2026, 4, 1)).await; // April: 30 days
    subscribed(&h, "a1", 5_000).await;
    h.advance_to(utc(2026, 4, 11)).await; // day 10 elapsed
    let p = h.preview("a1", Kind::Contacts(10_000)).await.unwrap();
    assert_eq!(p.timing, pb::ChangeTiming::Immediate as i32);
    // 30 -> 60 EUR: credit 20.00 for the unused 20 days, charge 40.00; net 20.00 + 21% VAT.
    assert_eq!(amount(&p.subtotal), "20.00");
    assert_eq!(amount(&p.amount_due_today), "24.20");
    assert_eq!(amount(&p.new_recurring_price), "60.00");
    // S6: nothing changed by the preview.
    assert_eq!(h.get("a1").await.contacts, 5_000);
    let applied = h
        .apply("a1", Kind::Contacts(10_000), &p.preview_token)
        .await
        .unwrap();
    let inv = applied.invoice.unwrap();
    assert_eq!(amount(&inv.total), amount(&p.amount_due_today));
    assert_eq!(inv.status, pb::InvoiceStatus::Paid as i32);
    assert_eq!(inv.lines.len(), 2);
    let s = applied.subscription.unwrap();
    assert_eq!(s.contacts, 10_000);
    // The full new price applies from the next cycle.
    assert_eq!(amount(&s.recurring_price), "60.00");
    // The same preview cannot be used twice: the subscription changed since.
    let stale = h
        .apply("a1", Kind::Contacts(20_000), &p.preview_token)
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    // S19: another upgrade one hour before the period ends.
    h.advance_to(utc(2026, 4, 30) + chrono::Duration::hours(23))
        .await;
    let applied = h.change("a1", Kind::AddAddOn("sms".into())).await.unwrap();
    let inv = applied.invoice.unwrap();
    // One hour of 720: the new price's share (0.10) minus the old one's (0.08), each rounded
    // cumulatively.
    assert_eq!(amount(&inv.subtotal), "0.02");
}

// rule S6
#[tokio::test]
async fn s6_a_preview_whose_price_changed_is_refused() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    subscribed(&h, "a1", 5_000).await;
    h.advance(86_400).await;
    let p = h.preview("a1", Kind::Contacts(10_000)).await.unwrap();
    // A forged amount is never charged (the token's signature no longer holds).
    let parts: Vec<&str> = p.preview_token.split('.').collect();
    let forged = format!("{}.{}.1.{}", parts[0], parts[1], parts[3]);
    let err = h
        .apply("a1", Kind::Contacts(10_000), &forged)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Applying a different change with this preview is refused too.
    let err = h
        .apply("a1", Kind::Contacts(20_000), &p.preview_token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // After the preview's lifetime it is refused.
    h.advance(7_200).await;
    let err = h
        .apply("a1", Kind::Contacts(10_000), &p.preview_token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(h.invoices("a1").await.len(), 1);
}

// rule S8
#[tokio::test]
async fn s8_restart_period_plans_credit_the_remainder_and_start_a_new_full_period() {
    let h = Harness::start().await;
    let mut spec = plan_spec("email");
    spec.proration = pb::ProrationPolicy::RestartPeriod as i32;
    h.publish(spec).await;
    h.advance_to(utc(2026, 4, 1)).await;
    subscribed(&h, "a1", 5_000).await;
    h.advance_to(utc(2026, 4, 11)).await;
    let applied = h.change("a1", Kind::Contacts(10_000)).await.unwrap();
    let inv = applied.invoice.unwrap();
    // Credit 20.00 of the old 30.00, a full new period of 60.00: 40.00 net.
    assert_eq!(amount(&inv.subtotal), "40.00");
    let s = applied.subscription.unwrap();
    assert_eq!(
        s.current_period_start.unwrap().seconds,
        utc(2026, 4, 11).timestamp()
    );
    assert_eq!(
        s.current_period_end.unwrap().seconds,
        utc(2026, 5, 11).timestamp()
    );
}

// rule S9
#[tokio::test]
async fn s9_downgrade_floor_27001_active_contacts_refuse_27000_and_allow_28000_next_cycle() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    subscribed(&h, "a1", 30_000).await;
    h.admit("a1", 27_001).await;
    let err = h.preview("a1", Kind::Contacts(27_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("28000"), "{}", err.message());
    let p = h.preview("a1", Kind::Contacts(28_000)).await.unwrap();
    assert_eq!(p.timing, pb::ChangeTiming::NextCycle as i32);
    let applied = h
        .apply("a1", Kind::Contacts(28_000), &p.preview_token)
        .await
        .unwrap();
    assert_eq!(applied.timing, pb::ChangeTiming::NextCycle as i32);
    let s = applied.subscription.unwrap();
    assert_eq!(s.contacts, 30_000, "a downgrade waits for the next cycle");
    assert_eq!(s.scheduled_changes.len(), 1);
    // At the period end the renewal applies it.
    h.advance_to(utc(2026, 2, 1)).await;
    let s = h.wait_for("a1", |s| s.contacts == 28_000).await;
    assert!(s.scheduled_changes.is_empty());
    let inv = h.invoices("a1").await;
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[1].kind, "renewal");
    assert_eq!(amount(&inv[1].subtotal), "150.00");
}

// rule S10
#[tokio::test]
async fn s10_changes_that_are_not_self_serve_become_change_requests_for_staff() {
    let h = Harness::start().await;
    let mut spec = plan_spec("email");
    spec.self_serve = Some(pb::SelfServe::default());
    h.publish(spec).await;
    subscribed(&h, "a1", 5_000).await;
    let applied = h.change("a1", Kind::Contacts(4_000)).await.unwrap();
    assert_eq!(applied.timing, pb::ChangeTiming::ChangeRequest as i32);
    let request = applied.change_request.unwrap();
    assert_eq!(request.status, pb::ChangeRequestStatus::Open as i32);
    assert_eq!(request.filed_by, "user:u-admin");
    assert_eq!(h.get("a1").await.contacts, 5_000);
    assert_eq!(
        h.events_of("subscription.change_request_filed", 1)
            .await
            .len(),
        1
    );
    let mut c = h.subs.clone();
    let open = c
        .list_change_requests(authed(
            ADMIN_TOKEN,
            pb::ListChangeRequestsRequest {
                actor: None,
                account_id: String::new(),
                open_only: true,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .change_requests;
    assert_eq!(open.len(), 1);
    let resolved = c
        .resolve_change_request(authed(
            ADMIN_TOKEN,
            pb::ResolveChangeRequestRequest {
                idempotency_key: h.key(),
                actor: None,
                request_id: request.request_id.clone(),
                approve: true,
                note: "ok".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.status, pb::ChangeRequestStatus::Approved as i32);
    assert_eq!(h.get("a1").await.scheduled_changes.len(), 1);
    // Resolving is staff work: a mutate token may not.
    let err = c
        .resolve_change_request(authed(
            MUTATE_TOKEN,
            pb::ResolveChangeRequestRequest {
                idempotency_key: h.key(),
                actor: None,
                request_id: request.request_id,
                approve: false,
                note: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

// rule S13
#[tokio::test]
async fn s13_cancelling_an_add_on_ends_it_at_the_next_cycle_and_says_when() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    subscribed(&h, "a1", 5_000).await;
    h.change("a1", Kind::AddAddOn("sms".into())).await.unwrap();
    let r = h
        .subs
        .clone()
        .cancel_add_on(authed(
            ADMIN_TOKEN,
            pb::CancelAddOnRequest {
                idempotency_key: h.key(),
                actor: Some(admin_user()),
                account_id: "a1".into(),
                add_on: "sms".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.effective_at.unwrap().seconds, utc(2026, 2, 1).timestamp());
    assert_eq!(r.subscription.unwrap().add_ons, vec!["sms".to_string()]);
    h.advance_to(utc(2026, 2, 1)).await;
    h.wait_for("a1", |s| s.add_ons.is_empty()).await;
}

// rule S13
#[tokio::test]
async fn s13_cancel_keeps_everything_until_the_period_end_then_stops() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    subscribed(&h, "a1", 5_000).await;
    let mut c = h.subs.clone();
    let s = c
        .cancel(authed(
            ADMIN_TOKEN,
            pb::CancelRequest {
                idempotency_key: h.key(),
                actor: Some(admin_user()),
                account_id: "a1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(s.cancel_at_period_end);
    h.advance_to(utc(2026, 1, 31)).await;
    assert!(h.check("a1", 10).await.allowed, "usable until the last day");
    // Resume and cancel again.
    c.resume(authed(
        ADMIN_TOKEN,
        pb::ResumeRequest {
            idempotency_key: h.key(),
            actor: None,
            account_id: "a1".into(),
        },
    ))
    .await
    .unwrap();
    c.cancel(authed(
        ADMIN_TOKEN,
        pb::CancelRequest {
            idempotency_key: h.key(),
            actor: None,
            account_id: "a1".into(),
        },
    ))
    .await
    .unwrap();
    h.advance_to(utc(2026, 2, 1)).await;
    let s = h
        .wait_for("a1", |s| {
            s.status == pb::SubscriptionStatus::Cancelled as i32
        })
        .await;
    assert!(s.history.iter().any(|e| e.action == "subscription_ended"));
    assert_eq!(h.invoices("a1").await.len(), 1, "no renewal");
    assert_eq!(
        h.check("a1", 1).await.refusal,
        pb::SendingRefusal::Cancelled as i32
    );
    assert_eq!(h.events_of("subscription.cancelled", 1).await.len(), 1);
}

// rule S14
#[tokio::test]
async fn s14_a_30_day_trial_sends_200_free_mails_and_no_more() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let s = h.start_trial("a1", "email", 0).await;
    assert_eq!(s.status, pb::SubscriptionStatus::Trialing as i32);
    assert_eq!(
        s.trial_ends_at.unwrap().seconds,
        utc(2026, 1, 31).timestamp()
    );
    let mut c = h.subs.clone();
    let d = c
        .record_mails_sent(authed(
            ADMIN_TOKEN,
            pb::RecordMailsSentRequest {
                idempotency_key: h.key(),
                actor: None,
                account_id: "a1".into(),
                mails: 150,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.trial_mails_left, 50);
    assert!(h.check("a1", 50).await.allowed);
    let d = h.check("a1", 51).await;
    assert_eq!(d.refusal, pb::SendingRefusal::TrialMailCap as i32);
    assert!(h.invoices("a1").await.is_empty(), "a trial costs nothing");
}

// rule S14
// rule S15
// rule S17
#[tokio::test]
async fn s15_a_21_day_trial_with_a_chosen_tier_converts_to_that_tier_at_its_end() {
    let h = Harness::start().await;
    let mut spec = plan_spec("email");
    spec.trial = Some(pb::TrialTerms {
        days: 21,
        contact_cap: 500,
        free_mails: 0,
    });
    h.publish(spec).await;
    h.start_trial("a1", "email", 0).await;
    // S14: at most 500 subscribed contacts during the trial.
    let r = h.admit("a1", 600).await;
    assert_eq!((r.subscribed, r.pending_upgrade), (500, 100));
    // S15: the tier chosen during the trial (with the payment for afterwards).
    let s = h
        .subscribe("a1", "email", 3_000, card("pm_card_ok"))
        .await
        .unwrap();
    assert_eq!(s.status, pb::SubscriptionStatus::Trialing as i32);
    assert_eq!(s.contacts, 3_000);
    assert!(h.invoices("a1").await.is_empty());
    h.verify("a1").await;
    h.advance_to(utc(2026, 1, 19)).await;
    assert_eq!(h.events_of("subscription.trial_ending", 1).await.len(), 1);
    h.advance_to(utc(2026, 1, 22)).await;
    let s = h
        .wait_for("a1", |s| s.status == pb::SubscriptionStatus::Active as i32)
        .await;
    assert_eq!(s.contacts, 3_000);
    // S17: everything the account had stays; the pending contacts now fit.
    let u = s.usage.unwrap();
    assert_eq!((u.active, u.pending, u.limit), (600, 0, 3_000));
    let inv = h.invoices("a1").await;
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].kind, "conversion");
    assert_eq!(amount(&inv[0].subtotal), "18.00");
    // Collected by card by the jobs.
    for _ in 0..50 {
        if h.invoices("a1").await[0].status == pb::InvoiceStatus::Paid as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        h.invoices("a1").await[0].status,
        pb::InvoiceStatus::Paid as i32
    );
    assert_eq!(
        h.events_of("subscription.trial_converted", 1).await.len(),
        1
    );
}

// rule S16
#[tokio::test]
async fn s16_an_unverified_account_loses_access_when_its_trial_ends() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.start_trial("a1", "email", 0).await;
    h.subscribe("a1", "email", 2_000, card("pm_card_ok"))
        .await
        .unwrap();
    h.advance_to(utc(2026, 1, 31)).await;
    let s = h
        .wait_for("a1", |s| {
            s.status == pb::SubscriptionStatus::TrialExpired as i32
        })
        .await;
    assert!(!s.verified);
    let d = h.check("a1", 1).await;
    assert_eq!(d.refusal, pb::SendingRefusal::TrialOverNotVerified as i32);
    assert_eq!(h.events_of("subscription.trial_expired", 1).await.len(), 1);
    // Buying after the trial needs the review first.
    let err = h
        .subscribe("a1", "email", 2_000, card("pm_card_ok"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    h.verify("a1").await;
    let s = h
        .subscribe("a1", "email", 2_000, card("pm_card_ok"))
        .await
        .unwrap();
    assert_eq!(s.status, pb::SubscriptionStatus::Active as i32);
}

// rule S2
#[tokio::test]
async fn s2_a_subscription_sends_without_limit() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    subscribed(&h, "a1", 1_000).await;
    assert!(h.check("a1", 50_000_000).await.allowed);
    let price = h.get("a1").await.recurring_price;
    h.subs
        .clone()
        .record_mails_sent(authed(
            ADMIN_TOKEN,
            pb::RecordMailsSentRequest {
                idempotency_key: h.key(),
                actor: None,
                account_id: "a1".into(),
                mails: 10_000_000,
            },
        ))
        .await
        .unwrap();
    assert_eq!(h.get("a1").await.recurring_price, price, "never costs more");
}

// rule S4
#[tokio::test]
async fn s4_level_seats_and_product_changes() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let mut pro = plan_spec("email-pro");
    pro.level = Some(pb::Level {
        name: "professional".into(),
        rank: 2,
    });
    pro.contact_tiers.as_mut().unwrap().tiers[0].unit_price = "0.010".into();
    h.publish(pro).await;
    let mut bundle = plan_spec("bundle");
    bundle.product = pb::Product::Bundle as i32;
    bundle.contact_tiers.as_mut().unwrap().tiers[0].unit_price = "0.020".into();
    h.publish(bundle).await;
    subscribed(&h, "a1", 5_000).await;
    let a = h.change("a1", Kind::Seats(3)).await.unwrap();
    assert_eq!(a.timing, pb::ChangeTiming::Immediate as i32);
    assert_eq!(a.subscription.unwrap().seats, 3);
    let a = h
        .change("a1", Kind::LevelPlanId("email-pro".into()))
        .await
        .unwrap();
    assert_eq!(a.subscription.unwrap().plan_id, "email-pro");
    let a = h
        .change("a1", Kind::ProductPlanId("bundle".into()))
        .await
        .unwrap();
    assert_eq!(a.subscription.unwrap().plan_id, "bundle");
    // Unbundling is not self-serve on this plan (S10).
    let a = h
        .change("a1", Kind::ProductPlanId("email".into()))
        .await
        .unwrap();
    assert_eq!(a.timing, pb::ChangeTiming::ChangeRequest as i32);
    let wrong = h
        .change("a1", Kind::LevelPlanId("email".into()))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
}

/// Renewal with the wallet as peer: a renewal invoice per period, and the plan's credits (C7)
/// granted once per period, expiring at its end.
#[tokio::test]
async fn renewal_issues_one_invoice_per_period_and_grants_the_monthly_credits() {
    let h = Harness::start_with_wallet().await;
    let (_, wallet) = h.wallet.as_ref().unwrap();
    wallet
        .clone()
        .open_wallet(authed(
            ADMIN_TOKEN,
            proto::wallet::v1::OpenWalletRequest {
                idempotency_key: "w".into(),
                wallet_id: "a1".into(),
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
    h.publish(plan_spec("email")).await;
    subscribed(&h, "a1", 5_000).await;
    let balance = || async {
        wallet
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
            .balance
    };
    for _ in 0..50 {
        if balance().await == 1_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(balance().await, 1_000);
    h.advance_to(utc(2026, 2, 1)).await;
    h.wait_for("a1", |s| {
        s.current_period_end.as_ref().unwrap().seconds == utc(2026, 3, 1).timestamp()
    })
    .await;
    for _ in 0..50 {
        if balance().await == 2_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(balance().await, 2_000);
    // Nothing twice: the jobs run again and again.
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    assert_eq!(balance().await, 2_000);
    let inv = h.invoices("a1").await;
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[1].status, pb::InvoiceStatus::Paid as i32);
    assert_eq!(h.events_of("subscription.renewed", 1).await.len(), 1);
    let issued = h.events_of("subscription.invoice_issued", 2).await;
    assert_eq!(issued.len(), 2);
}

/// A declined renewal: past due, retried, then sending suspended.
#[tokio::test]
async fn a_failing_card_makes_the_subscription_past_due_then_suspended() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.start_trial("a1", "email", 0).await;
    h.subscribe("a1", "email", 1_000, card("pm_card_declined"))
        .await
        .unwrap();
    h.verify("a1").await;
    h.advance_to(utc(2026, 1, 31)).await;
    h.wait_for("a1", |s| s.status == pb::SubscriptionStatus::PastDue as i32)
        .await;
    assert!(
        h.check("a1", 1).await.allowed,
        "past due still sends while retrying"
    );
    // Retries: one day later, then two more days later.
    h.advance_to(utc(2026, 2, 1)).await;
    for _ in 0..50 {
        if h.invoices("a1").await[0].payment_attempts == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(h.invoices("a1").await[0].payment_attempts, 2);
    h.advance_to(utc(2026, 2, 3)).await;
    h.wait_for("a1", |s| {
        s.status == pb::SubscriptionStatus::Suspended as i32
    })
    .await;
    let d = h.check("a1", 1).await;
    assert_eq!(d.refusal, pb::SendingRefusal::PaymentPastDue as i32);
    assert_eq!(h.invoices("a1").await[0].payment_attempts, 3);
    assert_eq!(h.events_of("subscription.payment_failed", 3).await.len(), 3);
}

/// Invoice numbers are consecutive without gaps under concurrent subscribes.
#[tokio::test]
async fn invoice_numbers_are_consecutive_under_concurrent_subscribes() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let calls = (0..12).map(|i| {
        let payment = if i % 2 == 0 {
            card("pm_card_ok")
        } else {
            bank()
        };
        h.subscribe_owned(format!("acct-{i}"), payment)
    });
    let results = join_all(calls).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let mut numbers = Vec::new();
    for i in 0..12 {
        numbers.extend(
            h.invoices(&format!("acct-{i}"))
                .await
                .iter()
                .map(|i| i.number),
        );
    }
    numbers.sort();
    assert_eq!(numbers, (1..=12).collect::<Vec<u64>>());
}

/// A retried Subscribe with the same key returns the first answer and charges once.
#[tokio::test]
async fn a_retried_subscribe_is_answered_once() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let req = pb::SubscribeRequest {
        idempotency_key: "same".into(),
        actor: None,
        account_id: "a1".into(),
        plan_id: "email".into(),
        contacts: 1_000,
        seats: 1,
        add_ons: vec![],
        payment: Some(card("pm_card_ok")),
        vat_rate: String::new(),
    };
    let mut c = h.subs.clone();
    let a = c
        .subscribe(authed(ADMIN_TOKEN, req.clone()))
        .await
        .unwrap()
        .into_inner();
    let b = c
        .subscribe(authed(ADMIN_TOKEN, req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.subscription_id, b.subscription_id);
    assert_eq!(h.invoices("a1").await.len(), 1);
    let mut other = req;
    other.contacts = 2_000;
    let err = c.subscribe(authed(ADMIN_TOKEN, other)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

impl Harness {
    async fn subscribe_owned(
        &self,
        account: String,
        payment: pb::Payment,
    ) -> Result<pb::Subscription, tonic::Status> {
        self.subscribe(&account, "email", 1_000, payment).await
    }
}
