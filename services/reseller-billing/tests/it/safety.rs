//! Tenant isolation, bad input, idempotency through to the wallet, an unreachable wallet, and
//! the hot partner wallet under many simultaneous customers.

use futures::future::join_all;
use proto::{
    reseller::v1::{self as pb, BillingMode, PartnerFunding},
    wallet::v1 as wpb,
};
use runtime::testing::{ADMIN_TOKEN, authed};
use tonic::Code;

use crate::{Harness, channel, start_reseller};

#[tokio::test]
async fn a_partner_sees_and_acts_only_on_its_own_customers() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.register("p2", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 10_000).await;
    h.buy("partner:p2", 10_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    h.add("p2", "c2", BillingMode::PartnerPays).await;

    // p1's token cannot act for p2, nor reach p2's customer through p1.
    let err = h
        .charge_as("partner-one-token", "p2", "c2", "m", 10)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .charge_as("partner-one-token", "p1", "c2", "m", 10)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let listed = h
        .client
        .clone()
        .list_customers(authed(
            "partner-one-token",
            pb::ListCustomersRequest {
                partner_id: "p1".into(),
                page_size: 0,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .customers
            .iter()
            .map(|c| c.customer_id.as_str())
            .collect::<Vec<_>>(),
        ["c1"]
    );

    // A charge for p1's customer never touches p2's wallet.
    h.charge_as("partner-one-token", "p1", "c1", "m", 1_000)
        .await
        .unwrap();
    assert_eq!(h.balance("partner:p1").await, 9_000);
    assert_eq!(h.balance("partner:p2").await, 10_000);
    // Customer ids are each partner's own: p2 may have a `c1` too, and is told nothing of p1's.
    let c1 = h
        .client
        .clone()
        .add_customer(authed(
            ADMIN_TOKEN,
            pb::AddCustomerRequest {
                idempotency_key: h.key(),
                partner_id: "p2".into(),
                customer_id: "c1".into(),
                billing_mode: BillingMode::PartnerPays as i32,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c1.partner_id, "p2");
}

#[tokio::test]
async fn bad_input_gets_the_right_code_and_changes_nothing() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 10_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    assert_eq!(
        h.charge("nope", "c1", "m", 10).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        h.charge("p1", "nobody", "m", 10).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        h.charge("p1", "c1", "m", 0).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        h.charge("p1", "c1", "", 10).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        h.charge("p1", "c:1", "m", 10).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    h.client
        .clone()
        .suspend_customer(authed(
            ADMIN_TOKEN,
            pb::SuspendCustomerRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                suspended: true,
            },
        ))
        .await
        .unwrap();
    let err = h.charge("p1", "c1", "m", 10).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("suspended"));
    let mut c = h.client.clone();
    let bad_partner =
        |currency: &str, funding: PartnerFunding, method: &str| pb::RegisterPartnerRequest {
            idempotency_key: format!("r-{currency}-{method}"),
            partner_id: "p9".into(),
            currency: currency.into(),
            funding: funding as i32,
            payment_method: method.into(),
            pricing: Some(crate::pricing()),
            rating: Some(wpb::RatingRule {
                credits_per_recipient: "1".into(),
                per_mailing_surcharge: 0,
            }),
        };
    for req in [
        bad_partner("XXX", PartnerFunding::Prepaid, ""),
        bad_partner("EUR", PartnerFunding::OnDemand, ""),
        bad_partner("EUR", PartnerFunding::Unspecified, ""),
        bad_partner("EUR", PartnerFunding::Prepaid, "pm_unknown"),
    ] {
        let err = c
            .register_partner(authed(ADMIN_TOKEN, req.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
    }
    let err = c
        .get_partner(authed(
            ADMIN_TOKEN,
            pb::GetPartnerRequest {
                partner_id: "p9".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(h.balance("partner:p1").await, 10_000);
}

#[tokio::test]
async fn a_retried_charge_debits_once() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 10_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;
    let req = |recipients| pb::ChargeMailingRequest {
        idempotency_key: "send-1".into(),
        partner_id: "p1".into(),
        customer_id: "c1".into(),
        mailing_id: "m1".into(),
        recipients,
    };
    let mut c = h.client.clone();
    let a = c
        .charge_mailing(authed(ADMIN_TOKEN, req(1_000)))
        .await
        .unwrap()
        .into_inner();
    let b = c
        .charge_mailing(authed(ADMIN_TOKEN, req(1_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a, b);
    assert_eq!(h.balance("partner:p1").await, 9_000);
    let err = c
        .charge_mailing(authed(ADMIN_TOKEN, req(2_000)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

/// The wallet is down: UNAVAILABLE and nothing debited. A crash between the services (the wallet
/// debited, this service never heard) is completed by a retry with the same key, once.
#[tokio::test]
async fn an_unreachable_wallet_fails_fast_and_a_retry_after_a_crash_between_the_services_debits_once()
 {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 10_000).await;
    h.add("p1", "c1", BillingMode::PartnerPays).await;

    // A second replica of this service whose wallet peer is a closed port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cut_off = start_reseller(&h.db.share(), &format!("http://{closed}"), "").await;
    let mut cut = proto::reseller::v1::reseller_billing_client::ResellerBillingClient::new(
        channel(cut_off.addr).await,
    );
    let req = || pb::ChargeMailingRequest {
        idempotency_key: "send-x".into(),
        partner_id: "p1".into(),
        customer_id: "c1".into(),
        mailing_id: "m1".into(),
        recipients: 1_000,
    };
    let err = cut
        .charge_mailing(authed(ADMIN_TOKEN, req()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(h.balance("partner:p1").await, 10_000, "nothing debited");

    // Now the wallet got the debit (as if the reply was lost in a crash between the services):
    // the wallet call with the derived key (the caller's, in its partner's space).
    h.wallets
        .clone()
        .charge_mailing(authed(
            ADMIN_TOKEN,
            wpb::ChargeMailingRequest {
                idempotency_key: "rs:p1:send-x:send".into(),
                wallet_id: "partner:p1".into(),
                mailing_id: "m1".into(),
                recipients: 1_000,
            },
        ))
        .await
        .unwrap();
    assert_eq!(h.balance("partner:p1").await, 9_000);
    // The retry through a healthy replica completes the same send, without debiting again.
    let done = h
        .client
        .clone()
        .charge_mailing(authed(ADMIN_TOKEN, req()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.credits, 1_000);
    assert_eq!(h.balance("partner:p1").await, 9_000);
    cut_off.stop().await.unwrap();
}

/// Many customers of one partner sending at the same moment all hit one wallet: exact.
#[tokio::test]
async fn many_customers_at_once_on_one_partner_wallet_stay_exact() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 20_000).await;
    for i in 0..8 {
        h.add("p1", &format!("c{i}"), BillingMode::PartnerPays)
            .await;
    }
    let calls = (0..40).map(|i| {
        let mut c = h.client.clone();
        async move {
            c.charge_mailing(authed(
                ADMIN_TOKEN,
                pb::ChargeMailingRequest {
                    idempotency_key: format!("hot-{i}"),
                    partner_id: "p1".into(),
                    customer_id: format!("c{}", i % 8),
                    mailing_id: format!("m{i}"),
                    recipients: 1_000,
                },
            ))
            .await
        }
    });
    let results = join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::FailedPrecondition))
        .count();
    assert_eq!((ok, refused), (20, 20));
    assert_eq!(h.balance("partner:p1").await, 0);
}
