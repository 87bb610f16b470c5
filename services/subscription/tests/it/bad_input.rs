//! Bounded inputs (issue 16): every quantity, price, rate, code and free text has a limit
//! (`shared::limits`); a request beyond it is refused with `INVALID_ARGUMENT` naming the field,
//! quotes client values cut to 64 characters, and changes nothing.

use proto::subscription::v1 as pb;
use runtime::testing::{ADMIN_TOKEN, authed};
use tonic::Code;

use crate::{Harness, admin_user, card, plan_spec};

/// Asserts an `INVALID_ARGUMENT` whose message names `field` and stays short.
#[track_caller]
fn assert_invalid(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let status = r.expect_err("must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(field),
        "message should name {field}: {:?}",
        status.message()
    );
    assert!(
        status.message().len() < 400,
        "message echoes the input: {} bytes",
        status.message().len()
    );
}

fn subscribe_req(h: &Harness, account: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        idempotency_key: h.key(),
        actor: Some(admin_user()),
        account_id: account.into(),
        plan_id: "email".into(),
        contacts: 5_000,
        seats: 1,
        add_ons: vec![],
        payment: Some(card("pm_card_ok")),
        vat_rate: "0.21".into(),
    }
}

async fn subscribe(
    h: &Harness,
    req: pb::SubscribeRequest,
) -> Result<pb::Subscription, tonic::Status> {
    h.subs
        .clone()
        .subscribe(authed(ADMIN_TOKEN, req))
        .await
        .map(|r| r.into_inner())
}

async fn publish(h: &Harness, spec: pb::PlanSpec) -> Result<pb::Plan, tonic::Status> {
    h.catalog
        .clone()
        .publish_plan(authed(
            ADMIN_TOKEN,
            pb::PublishPlanRequest {
                idempotency_key: h.key(),
                plan: Some(spec),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

/// Nothing was subscribed, charged or invoiced for `account`.
async fn nothing_happened(h: &Harness, account: &str) {
    let got = h
        .subs
        .clone()
        .get_subscription(authed(
            ADMIN_TOKEN,
            pb::GetSubscriptionRequest {
                actor: Some(admin_user()),
                account_id: account.into(),
            },
        ))
        .await;
    assert_eq!(got.map(|_| ()).unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn seats_beyond_the_limit_or_zero_are_refused_before_any_charge() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    for seats in [u32::MAX, shared::limits::MAX_SEATS + 1, 0] {
        let mut req = subscribe_req(&h, "acct-seats");
        req.seats = seats;
        assert_invalid(subscribe(&h, req).await, "seats");
    }
    nothing_happened(&h, "acct-seats").await;

    // The limit itself is accepted, and changes are bounded the same way.
    let mut req = subscribe_req(&h, "acct-seats");
    req.seats = 2;
    subscribe(&h, req).await.unwrap();
    for seats in [u32::MAX, 0] {
        let change = pb::change::Kind::Seats(seats);
        assert_invalid(h.preview("acct-seats", change).await, "seats");
    }
}

#[tokio::test]
async fn duplicate_and_oversized_add_ons_are_refused_not_merged_or_echoed() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let mut req = subscribe_req(&h, "acct-addons");
    req.add_ons = vec!["sms".into(), "sms".into()];
    assert_invalid(subscribe(&h, req).await, "add_ons");

    let huge = "x".repeat(10_000);
    let mut req = subscribe_req(&h, "acct-addons");
    req.add_ons = vec![huge.clone()];
    assert_invalid(subscribe(&h, req).await, "add_ons");

    let mut req = subscribe_req(&h, "acct-addons");
    req.add_ons = vec!["sms".into(); shared::limits::MAX_ADD_ONS + 1];
    assert_invalid(subscribe(&h, req).await, "add_ons");
    nothing_happened(&h, "acct-addons").await;

    // An unknown but short code is quoted whole; a long one cut.
    let mut req = subscribe_req(&h, "acct-addons");
    req.add_ons = vec!["fax".into()];
    let status = subscribe(&h, req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("\"fax\""), "{status:?}");

    subscribe(&h, subscribe_req(&h, "acct-addons"))
        .await
        .unwrap();
    for change in [
        pb::change::Kind::AddAddOn(huge.clone()),
        pb::change::Kind::RemoveAddOn(huge.clone()),
    ] {
        assert_invalid(h.preview("acct-addons", change).await, "add_on");
    }
    let cancel = h
        .subs
        .clone()
        .cancel_add_on(authed(
            ADMIN_TOKEN,
            pb::CancelAddOnRequest {
                idempotency_key: h.key(),
                actor: Some(admin_user()),
                account_id: "acct-addons".into(),
                add_on: huge,
            },
        ))
        .await;
    assert_invalid(cancel, "add_on");
}

#[tokio::test]
async fn prices_and_rates_with_a_sign_or_excess_precision_are_refused() {
    let h = Harness::start().await;
    let mut bad_plans: Vec<(pb::PlanSpec, &str)> = vec![];
    for price in ["-0", "0.0000000001", "0.001", "-1", "1000000.01", "1e3"] {
        let mut s = plan_spec("p");
        s.seat_price = price.into();
        bad_plans.push((s, "plan.seat_price"));
        let mut s = plan_spec("p");
        s.add_ons[0].price = price.into();
        bad_plans.push((s, "plan.add_ons.price"));
    }
    for price in ["-0", "0.0000000001"] {
        let mut s = plan_spec("p");
        s.contact_tiers.as_mut().unwrap().tiers[0].unit_price = price.into();
        bad_plans.push((s, "unit_price"));
    }
    for (spec, field) in bad_plans {
        let shown = format!("{spec:?}");
        let r = publish(&h, spec).await;
        assert!(r.is_err(), "accepted: {shown}");
        assert_invalid(r, field);
    }

    h.publish(plan_spec("email")).await;
    for rate in ["-0", "0.0000000001", "-0.1", "1", "0.21e0"] {
        let mut req = subscribe_req(&h, "acct-vat");
        req.vat_rate = rate.into();
        assert_invalid(subscribe(&h, req).await, "vat_rate");
    }
    nothing_happened(&h, "acct-vat").await;
}

#[tokio::test]
async fn free_text_with_controls_bidi_or_excess_length_is_refused() {
    let h = Harness::start().await;
    let evil = [
        "Pro\u{202E}nalp",
        "Pro\u{2066}x\u{2069}",
        "Pro\u{0}",
        "Pro\nplan",
        "Pro\u{1b}[31m",
    ];
    for text in evil {
        let mut s = plan_spec("p");
        s.name = text.into();
        assert_invalid(publish(&h, s).await, "plan.name");
        let mut s = plan_spec("p");
        s.level.as_mut().unwrap().name = text.into();
        assert_invalid(publish(&h, s).await, "plan.level.name");
        let mut s = plan_spec("p");
        s.add_ons[0].name = text.into();
        assert_invalid(publish(&h, s).await, "plan.add_ons.name");
    }
    let mut s = plan_spec("p");
    s.name = "x".repeat(shared::limits::MAX_NAME_LEN + 1);
    assert_invalid(publish(&h, s).await, "plan.name");
    let mut s = plan_spec("p");
    s.add_ons[0].code = "x".repeat(10_000);
    assert_invalid(publish(&h, s).await, "plan.add_ons.code");
    let mut s = plan_spec("p");
    s.included_seats = u32::MAX;
    assert_invalid(publish(&h, s).await, "plan.included_seats");
    let mut s = plan_spec("p");
    s.slider.as_mut().unwrap().max = 1_000_000_000;
    s.slider.as_mut().unwrap().step = 1_000;
    assert_invalid(publish(&h, s).await, "plan.slider");
    let mut s = plan_spec("p");
    s.monthly_credits = u64::MAX / 2;
    assert_invalid(publish(&h, s).await, "plan.monthly_credits");
    let mut s = plan_spec("p");
    s.add_ons = (0..=shared::limits::MAX_ADD_ONS)
        .map(|i| pb::AddOn {
            code: format!("a{i}"),
            name: String::new(),
            price: "1".into(),
        })
        .collect();
    assert_invalid(publish(&h, s).await, "plan.add_ons");
}

#[tokio::test]
async fn blank_or_nul_user_ids_are_refused() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    for user in [" ", "u\u{0}1", "u 1", "\u{202E}u", &"u".repeat(10_000)] {
        let mut req = subscribe_req(&h, "acct-user");
        req.actor = Some(pb::Actor {
            user_id: user.into(),
            billing_permission: true,
        });
        assert_invalid(subscribe(&h, req).await, "actor.user_id");
    }
    nothing_happened(&h, "acct-user").await;
}

#[tokio::test]
async fn other_quantities_and_amounts_are_bounded() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let mut req = subscribe_req(&h, "acct-q");
    req.contacts = u64::MAX;
    assert_invalid(subscribe(&h, req).await, "contacts");
    subscribe(&h, subscribe_req(&h, "acct-q")).await.unwrap();
    let change = pb::change::Kind::Contacts(u64::MAX);
    assert_invalid(h.preview("acct-q", change).await, "contacts");
    let change = pb::change::Kind::LevelPlanId("p".repeat(10_000));
    assert_invalid(h.preview("acct-q", change).await, "change.level_plan_id");
    let note = h
        .subs
        .clone()
        .resolve_change_request(authed(
            ADMIN_TOKEN,
            pb::ResolveChangeRequestRequest {
                idempotency_key: h.key(),
                actor: Some(admin_user()),
                request_id: "r1".into(),
                approve: true,
                note: "ok\u{202E}".into(),
            },
        ))
        .await;
    assert_invalid(note, "note");
    let invoices = h.invoices("acct-q").await;
    let transfer = |amount: &str| pb::RecordBankTransferRequest {
        idempotency_key: h.key(),
        actor: Some(admin_user()),
        invoice_id: invoices[0].invoice_id.clone(),
        amount: Some(proto::common::v1::Money {
            amount: amount.into(),
            currency: "EUR".into(),
        }),
    };
    for amount in ["-0", "0.001", "-5", "1000000000000.01"] {
        let r = h
            .subs
            .clone()
            .record_bank_transfer(authed(ADMIN_TOKEN, transfer(amount)))
            .await;
        assert_invalid(r, "amount");
    }
}
