//! The partner boundary (issue 16): a partner's refused calls change nothing anywhere, its
//! events, idempotency keys and customer ids are its own, and inputs are bounded.

use std::time::Duration;

use chrono::Datelike;

use futures::StreamExt;
use proto::{
    common::v1::{Event, WatchEventsRequest},
    reseller::v1::{self as pb, BillingMode, PartnerFunding},
    wallet::v1 as wpb,
};
use runtime::testing::{ADMIN_TOKEN, authed};
use tonic::Code;

use crate::Harness;

const P1: &str = "partner-one-token";
const P2: &str = "partner-two-token";

impl Harness {
    async fn set_mode_as(
        &self,
        token: &str,
        key: &str,
        partner: &str,
        customer: &str,
        mode: BillingMode,
    ) -> Result<pb::Customer, tonic::Status> {
        self.client
            .clone()
            .set_billing_mode(authed(
                token,
                pb::SetBillingModeRequest {
                    idempotency_key: key.into(),
                    partner_id: partner.into(),
                    customer_id: customer.into(),
                    billing_mode: mode as i32,
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    async fn add_as(
        &self,
        token: &str,
        key: &str,
        partner: &str,
        customer: &str,
        mode: BillingMode,
    ) -> Result<pb::Customer, tonic::Status> {
        self.client
            .clone()
            .add_customer(authed(
                token,
                pb::AddCustomerRequest {
                    idempotency_key: key.into(),
                    partner_id: partner.into(),
                    customer_id: customer.into(),
                    billing_mode: mode as i32,
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Whether the wallet service has a wallet `wallet_id`.
    async fn wallet_exists(&self, wallet_id: &str) -> bool {
        match self
            .wallets
            .clone()
            .get_wallet(authed(
                ADMIN_TOKEN,
                wpb::GetWalletRequest {
                    wallet_id: wallet_id.into(),
                },
            ))
            .await
        {
            Ok(_) => true,
            Err(s) if s.code() == Code::NotFound => false,
            Err(s) => panic!("GetWallet {wallet_id}: {s:?}"),
        }
    }

    /// Every event `token` is shown from the start (waits until `at_least` arrived, at most 10 s).
    async fn events_as(&self, token: &str, at_least: usize) -> Vec<Event> {
        let mut stream = self
            .client
            .clone()
            .watch_events(authed(
                token,
                WatchEventsRequest {
                    after_cursor: 0,
                    types: vec![],
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while out.len() < at_least {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(e))) => out.push(e),
                _ => break,
            }
        }
        while let Ok(Some(Ok(e))) =
            tokio::time::timeout(Duration::from_millis(500), stream.next()).await
        {
            out.push(e);
        }
        out
    }
}

/// Every id a wallet of `customer` could have had, with or without the partner in it.
fn customer_wallet_ids(customer: &str) -> Vec<String> {
    let mut ids = vec![format!("customer:{customer}")];
    ids.extend(["p1", "p2"].map(|p| format!("customer:{p}:{customer}")));
    ids
}

#[tokio::test]
async fn a_refused_set_billing_mode_opens_no_wallet() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.register("p2", "1", PartnerFunding::Prepaid, "").await;
    h.add("p2", "cb1", BillingMode::PartnerPays).await;
    h.add_as(P1, "add-c1", "p1", "c1", BillingMode::PartnerPays)
        .await
        .unwrap();

    // Another partner's customer, and a customer not added yet: NOT_FOUND, and no wallet.
    for customer in ["cb1", "nobody"] {
        let err = h
            .set_mode_as(P1, &h.key(), "p1", customer, BillingMode::CustomerPays)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{customer}: {err:?}");
    }
    // A key already used for another request: ALREADY_EXISTS, and no wallet either.
    let err = h
        .set_mode_as(P1, "add-c1", "p1", "c1", BillingMode::CustomerPays)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // The same for AllocateCredits, which opens a partner-pays customer's wallet.
    let err = h
        .client
        .clone()
        .allocate_credits(authed(
            P1,
            pb::AllocateCreditsRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "cb1".into(),
                credits: 10,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    for customer in ["cb1", "nobody", "c1"] {
        for wallet_id in customer_wallet_ids(customer) {
            assert!(
                !h.wallet_exists(&wallet_id).await,
                "{wallet_id} was opened by a refused call"
            );
        }
    }
    // Refused calls changed nothing here either.
    let c1 = h
        .client
        .clone()
        .get_customer(authed(
            P1,
            pb::GetCustomerRequest {
                partner_id: "p1".into(),
                customer_id: "c1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c1.billing_mode, BillingMode::PartnerPays as i32);
    assert_eq!(c1.wallet_id, "");

    // An allowed switch opens the customer's wallet on its own partner's terms.
    let switched = h
        .set_mode_as(P1, &h.key(), "p1", "c1", BillingMode::CustomerPays)
        .await
        .unwrap();
    assert_eq!(switched.wallet_id, "customer:p1:c1");
    assert!(h.wallet_exists("customer:p1:c1").await);
}

#[tokio::test]
async fn a_partner_bound_token_watches_only_its_own_partners_events() {
    let h = Harness::start().await;
    for p in ["p1", "p2"] {
        h.register(p, "1", PartnerFunding::Prepaid, "").await;
        h.buy(&format!("partner:{p}"), 10_000).await;
        h.client
            .clone()
            .configure_partner_reminder(authed(
                ADMIN_TOKEN,
                pb::ConfigurePartnerReminderRequest {
                    idempotency_key: h.key(),
                    partner_id: p.into(),
                    threshold: 5_000,
                },
            ))
            .await
            .unwrap();
        h.add(p, &format!("c-{p}"), BillingMode::PartnerPays).await;
        h.set_mode(p, &format!("c-{p}"), BillingMode::CustomerPays)
            .await;
        h.set_mode(p, &format!("c-{p}"), BillingMode::PartnerPays)
            .await;
        // Below the reminder: the wallet's low-balance event, relayed for the partner.
        h.charge(p, &format!("c-{p}"), "m1", 6_000).await.unwrap();
    }
    // Everything, for the platform's own token: both partners' relayed reminders included.
    let all = h.events_as(ADMIN_TOKEN, 12).await;
    for p in ["p1", "p2"] {
        assert!(
            all.iter()
                .any(|e| e.r#type == "reseller.partner_low_balance" && e.subject == p),
            "{p}'s reminder: {all:?}"
        );
    }
    // Every reseller event's subject is its partner.
    for e in &all {
        let payload: serde_json::Value = serde_json::from_str(&e.payload_json).unwrap();
        assert_eq!(payload["partner_id"], e.subject.as_str(), "{e:?}");
    }

    for (token, own) in [(P1, "p1"), (P2, "p2")] {
        let seen = h.events_as(token, 6).await;
        let expected: Vec<&Event> = all.iter().filter(|e| e.subject == own).collect();
        assert_eq!(
            seen.iter().map(|e| &e.event_id).collect::<Vec<_>>(),
            expected.iter().map(|e| &e.event_id).collect::<Vec<_>>(),
            "{own} sees exactly its own events"
        );
    }
}

#[tokio::test]
async fn idempotency_keys_are_each_partners_own() {
    let h = Harness::start().await;
    for p in ["p1", "p2"] {
        h.register(p, "1", PartnerFunding::Prepaid, "").await;
        h.buy(&format!("partner:{p}"), 10_000).await;
    }
    // The same key in two partners' hands: two requests.
    let a = h
        .add_as(P1, "same-key", "p1", "c1", BillingMode::PartnerPays)
        .await
        .unwrap();
    let b = h
        .add_as(P2, "same-key", "p2", "c2", BillingMode::PartnerPays)
        .await
        .unwrap();
    assert_eq!((a.partner_id.as_str(), b.partner_id.as_str()), ("p1", "p2"));
    // A replay in the same partner's hands is the first answer.
    assert_eq!(
        h.add_as(P1, "same-key", "p1", "c1", BillingMode::PartnerPays)
            .await
            .unwrap(),
        a
    );
    // The same key for another request of the same partner is still refused.
    let err = h
        .add_as(P1, "same-key", "p1", "c3", BillingMode::PartnerPays)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Sends too, through to the wallet (whose keys derive from the partner's).
    let send = |token: &'static str, partner: &'static str, customer: &'static str| {
        let mut c = h.client.clone();
        async move {
            c.charge_mailing(authed(
                token,
                pb::ChargeMailingRequest {
                    idempotency_key: "send-1".into(),
                    partner_id: partner.into(),
                    customer_id: customer.into(),
                    mailing_id: "m1".into(),
                    recipients: 1_000,
                },
            ))
            .await
            .map(|r| r.into_inner())
        }
    };
    let first = send(P1, "p1", "c1").await.unwrap();
    send(P2, "p2", "c2").await.unwrap();
    // The platform's token acting for p1 replays p1's send.
    assert_eq!(send(ADMIN_TOKEN, "p1", "c1").await.unwrap(), first);
    assert_eq!(h.balance("partner:p1").await, 9_000);
    assert_eq!(h.balance("partner:p2").await, 9_000);

    // The longest key the API takes works the same, through to the wallet, and replays.
    let long = "k".repeat(runtime::idempotency::MAX_KEY_LEN);
    let charge = |token: &'static str, partner: &'static str, customer: &'static str| {
        let mut c = h.client.clone();
        let key = long.clone();
        async move {
            c.charge_mailing(authed(
                token,
                pb::ChargeMailingRequest {
                    idempotency_key: key,
                    partner_id: partner.into(),
                    customer_id: customer.into(),
                    mailing_id: "m2".into(),
                    recipients: 500,
                },
            ))
            .await
            .map(|r| r.into_inner())
        }
    };
    let first = charge(P1, "p1", "c1").await.unwrap();
    assert_eq!(charge(P1, "p1", "c1").await.unwrap(), first);
    charge(P2, "p2", "c2").await.unwrap();
    assert_eq!(h.balance("partner:p1").await, 8_500);
    assert_eq!(h.balance("partner:p2").await, 8_500);
}

#[tokio::test]
async fn customer_ids_are_each_partners_own() {
    let h = Harness::start().await;
    for p in ["p1", "p2"] {
        h.register(p, "1", PartnerFunding::Prepaid, "").await;
        h.buy(&format!("partner:{p}"), 10_000).await;
    }
    // Two partners, one customer id: two customers, neither told of the other.
    let a = h
        .add_as(P1, &h.key(), "p1", "shop", BillingMode::CustomerPays)
        .await
        .unwrap();
    let b = h
        .add_as(P2, &h.key(), "p2", "shop", BillingMode::PartnerPays)
        .await
        .unwrap();
    assert_eq!(a.wallet_id, "customer:p1:shop");
    assert_eq!(b.wallet_id, "");
    // Adding it twice for one partner is still ALREADY_EXISTS.
    let err = h
        .add_as(P1, &h.key(), "p1", "shop", BillingMode::PartnerPays)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Each routes to its own payer and counts against its own cap.
    h.buy("customer:p1:shop", 5_000).await;
    let limit = h
        .client
        .clone()
        .set_customer_limit(authed(
            P2,
            pb::SetCustomerLimitRequest {
                idempotency_key: h.key(),
                partner_id: "p2".into(),
                customer_id: "shop".into(),
                monthly_credit_limit: 3_000,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limit.monthly_credit_limit, 3_000);
    let paid_by_customer = h.charge_as(P1, "p1", "shop", "m1", 2_000).await.unwrap();
    assert_eq!(paid_by_customer.payer_wallet_id, "customer:p1:shop");
    let paid_by_partner = h.charge_as(P2, "p2", "shop", "m1", 2_000).await.unwrap();
    assert_eq!(paid_by_partner.payer_wallet_id, "partner:p2");
    assert_eq!(h.balance("customer:p1:shop").await, 3_000);
    assert_eq!(h.balance("partner:p1").await, 10_000);
    assert_eq!(h.balance("partner:p2").await, 8_000);
    let err = h
        .charge_as(P2, "p2", "shop", "m2", 2_000)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "p2's cap: {err:?}");

    // Each partner's view holds its own customer only.
    for (token, p, used) in [(P1, "p1", 0), (P2, "p2", 2_000)] {
        let c = h
            .client
            .clone()
            .get_customer(authed(
                token,
                pb::GetCustomerRequest {
                    partner_id: p.into(),
                    customer_id: "shop".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (c.partner_id.as_str(), c.credits_used_this_month),
            (p, used)
        );
        let now = h.reseller.platform.clock.now();
        let statement = h
            .client
            .clone()
            .get_usage_statement(authed(
                token,
                pb::GetUsageStatementRequest {
                    partner_id: p.into(),
                    year: now.year(),
                    month: now.month(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(statement.customers.len(), 1, "{statement:?}");
        assert_eq!(statement.customers[0].credits_used, 2_000);
    }
}

#[tokio::test]
async fn register_partner_needs_the_admin_scope() {
    let h = Harness::start().await;
    let err = h
        .client
        .clone()
        .register_partner(authed(
            P1,
            pb::RegisterPartnerRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                currency: "EUR".into(),
                funding: PartnerFunding::Prepaid as i32,
                payment_method: String::new(),
                pricing: Some(crate::pricing()),
                rating: Some(wpb::RatingRule {
                    credits_per_recipient: "1".into(),
                    per_mailing_surcharge: 0,
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(!h.wallet_exists("partner:p1").await);
}

#[tokio::test]
async fn ids_and_quantities_are_bounded() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 10_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    let long_customer = "c".repeat(reseller_billing::domain::MAX_CUSTOMER_ID_LEN + 1);
    let long_partner = "p".repeat(reseller_billing::domain::MAX_EXISTING_PARTNER_ID_LEN + 1);
    for customer in [
        " ",
        "c\u{0}1",
        "c\t1",
        "c 1",
        "c:1",
        "ç1",
        long_customer.as_str(),
    ] {
        let err = h
            .add_as(
                ADMIN_TOKEN,
                &h.key(),
                "p1",
                customer,
                BillingMode::PartnerPays,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{customer:?}: {err:?}");
    }
    let err = h
        .add_as(
            ADMIN_TOKEN,
            &h.key(),
            &long_partner,
            "c2",
            BillingMode::PartnerPays,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A new partner's id must leave room for its customers' wallet ids.
    let err = h
        .client
        .clone()
        .register_partner(authed(
            ADMIN_TOKEN,
            pb::RegisterPartnerRequest {
                idempotency_key: h.key(),
                partner_id: "p".repeat(reseller_billing::domain::MAX_PARTNER_ID_LEN + 1),
                currency: "EUR".into(),
                funding: PartnerFunding::Prepaid as i32,
                payment_method: String::new(),
                pricing: Some(crate::pricing()),
                rating: Some(wpb::RatingRule {
                    credits_per_recipient: "1".into(),
                    per_mailing_surcharge: 0,
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = h
        .charge(
            "p1",
            "c1",
            "m",
            reseller_billing::domain::MAX_RECIPIENTS + 1,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = h
        .client
        .clone()
        .allocate_credits(authed(
            ADMIN_TOKEN,
            pb::AllocateCreditsRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                credits: reseller_billing::domain::MAX_CREDITS.unsigned_abs() + 1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = h
        .client
        .clone()
        .set_customer_limit(authed(
            ADMIN_TOKEN,
            pb::SetCustomerLimitRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                monthly_credit_limit: reseller_billing::domain::MAX_CREDITS.unsigned_abs() + 1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = h
        .client
        .clone()
        .configure_partner_reminder(authed(
            ADMIN_TOKEN,
            pb::ConfigurePartnerReminderRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                threshold: reseller_billing::domain::MAX_CREDITS.unsigned_abs() + 1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = h
        .client
        .clone()
        .list_customers(authed(
            ADMIN_TOKEN,
            pb::ListCustomersRequest {
                partner_id: "p1".into(),
                page_size: 0,
                page_token: "x".repeat(10_000),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(h.balance("partner:p1").await, 10_000);
    let c1 = h
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
    assert_eq!(c1.monthly_credit_limit, 0, "nothing changed");
}
