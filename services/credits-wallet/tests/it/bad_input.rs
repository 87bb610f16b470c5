//! Bad input gets the right code and changes nothing.

use proto::wallet::v1 as pb;
use runtime::testing::{ADMIN_TOKEN, MUTATE_TOKEN, READ_TOKEN, authed};
use tonic::Code;

use crate::Harness;

#[tokio::test]
async fn bad_requests_are_refused_with_the_right_code_and_change_nothing() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 1_000).await;
    let mut c = h.client.clone();
    let charge = |key: &str, wallet: &str, mailing: &str, recipients| pb::ChargeMailingRequest {
        idempotency_key: key.into(),
        wallet_id: wallet.into(),
        mailing_id: mailing.into(),
        recipients,
    };
    let cases = [
        (charge("k1", "nope", "m", 10), Code::NotFound),
        (charge("k2", "w1", "m", 0), Code::InvalidArgument),
        (charge("k3", "w1", "m", 100_000_001), Code::InvalidArgument),
        (charge("", "w1", "m", 10), Code::InvalidArgument),
        (charge("k4", "w1", "", 10), Code::InvalidArgument),
        (charge("k5", "", "m", 10), Code::InvalidArgument),
        (charge("k6", "w 1", "m", 10), Code::InvalidArgument),
    ];
    for (req, code) in cases {
        let err = c
            .charge_mailing(authed(ADMIN_TOKEN, req.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
    }

    let purchase = |credits, method: &str| pb::PurchaseCreditsRequest {
        idempotency_key: format!("p-{credits}-{method}"),
        wallet_id: "w1".into(),
        credits,
        payment_method: method.into(),
        expires_at: None,
        expected_amount: None,
    };
    for (req, code) in [
        (purchase(0, "pm_card_ok"), Code::InvalidArgument),
        (purchase(10, "pm_bitcoin"), Code::InvalidArgument),
        (purchase(10, ""), Code::InvalidArgument), // nothing on file
        (
            purchase(2_000_000_000_000, "pm_card_ok"),
            Code::InvalidArgument,
        ),
    ] {
        let err = c
            .purchase_credits(authed(ADMIN_TOKEN, req.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
    }
    let mut bad_price = purchase(1_000, "pm_card_ok");
    bad_price.expected_amount = Some(proto::common::v1::Money {
        amount: "9.99".into(),
        currency: "EUR".into(),
    });
    let err = c
        .purchase_credits(authed(ADMIN_TOKEN, bad_price))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let open = |currency: &str, rate: &str| pb::OpenWalletRequest {
        idempotency_key: format!("o-{currency}-{rate}"),
        wallet_id: "w2".into(),
        currency: currency.into(),
        pricing: Some(crate::standard_pricing()),
        rating: Some(pb::RatingRule {
            credits_per_recipient: rate.into(),
            per_mailing_surcharge: 0,
        }),
        signup_credits: 0,
        signup_credits_expire_at: None,
    };
    for req in [
        open("XXX", "1"),
        open("EUR", "0"),
        open("EUR", "-1"),
        open("EUR", "1e3"),
        open("EUR", "abc"),
    ] {
        let err = c
            .open_wallet(authed(ADMIN_TOKEN, req.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
    }
    let mut gap = open("EUR", "1");
    gap.pricing.as_mut().unwrap().tiers[1].first = 10_005;
    let err = c.open_wallet(authed(ADMIN_TOKEN, gap)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("gap"), "{}", err.message());

    let err = c
        .adjust_credits(authed(
            ADMIN_TOKEN,
            pb::AdjustCreditsRequest {
                idempotency_key: "a1".into(),
                wallet_id: "w1".into(),
                delta: -5,
                reason: "  ".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Nothing changed.
    let w = h.wallet("w1").await;
    assert_eq!(w.balance, 1_000);
    assert_eq!(h.ledger("w1").await.len(), 1);
    let err = c
        .get_wallet(authed(
            ADMIN_TOKEN,
            pb::GetWalletRequest {
                wallet_id: "w2".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn scopes_are_enforced_per_rpc() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    let mut c = h.client.clone();
    let err = c
        .charge_mailing(authed(
            READ_TOKEN,
            pb::ChargeMailingRequest {
                idempotency_key: "k".into(),
                wallet_id: "w1".into(),
                mailing_id: "m".into(),
                recipients: 1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c
        .adjust_credits(authed(
            MUTATE_TOKEN,
            pb::AdjustCreditsRequest {
                idempotency_key: "k".into(),
                wallet_id: "w1".into(),
                delta: 5,
                reason: "goodwill".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    c.get_wallet(authed(
        READ_TOKEN,
        pb::GetWalletRequest {
            wallet_id: "w1".into(),
        },
    ))
    .await
    .unwrap();
    let change = c
        .adjust_credits(authed(
            ADMIN_TOKEN,
            pb::AdjustCreditsRequest {
                idempotency_key: "k".into(),
                wallet_id: "w1".into(),
                delta: 5,
                reason: "goodwill".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(change.entry.unwrap().description, "goodwill");
}

#[tokio::test]
async fn the_statement_pages_through_every_entry() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    for _ in 0..5 {
        h.grant("w1", 10).await;
    }
    let mut c = h.client.clone();
    let page = |token: String| pb::ListLedgerEntriesRequest {
        wallet_id: "w1".into(),
        page_size: 2,
        page_token: token,
    };
    let first = c
        .list_ledger_entries(authed(ADMIN_TOKEN, page(String::new())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.entries.len(), 2);
    let second = c
        .list_ledger_entries(authed(ADMIN_TOKEN, page(first.next_page_token)))
        .await
        .unwrap()
        .into_inner();
    let third = c
        .list_ledger_entries(authed(ADMIN_TOKEN, page(second.next_page_token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(third.entries.len(), 1);
    assert!(third.next_page_token.is_empty());
    assert_eq!(third.entries[0].sequence, 5);
    assert_eq!(third.entries[0].balance_after, 50);
    let err = c
        .list_ledger_entries(authed(ADMIN_TOKEN, page("zzz".into())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
