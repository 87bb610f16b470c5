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

/// Asserts an `INVALID_ARGUMENT` whose message names `field` and does not echo a long input.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, field: &str) {
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

// Issue 16: limits of `shared::limits`; refusals name the field and quote at most 64 characters.
#[tokio::test]
async fn prices_rates_and_amounts_with_a_sign_or_excess_precision_are_refused() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    let mut c = h.client.clone();
    let open = |pricing: pb::CreditPricing, rate: &str| pb::OpenWalletRequest {
        idempotency_key: h.key(),
        wallet_id: "w2".into(),
        currency: "EUR".into(),
        pricing: Some(pricing),
        rating: Some(pb::RatingRule {
            credits_per_recipient: rate.into(),
            per_mailing_surcharge: 0,
        }),
        signup_credits: 0,
        signup_credits_expire_at: None,
    };
    for price in ["-0", "0.0000000001", "-0.01", "1000000.5"] {
        let mut p = crate::standard_pricing();
        p.tiers[0].unit_price = price.into();
        assert_invalid(
            c.open_wallet(authed(ADMIN_TOKEN, open(p, "1"))).await,
            "price",
        );
    }
    for flat in ["-0", "0.001"] {
        let mut p = crate::standard_pricing();
        p.tiers[0].flat_price = flat.into();
        assert_invalid(
            c.open_wallet(authed(ADMIN_TOKEN, open(p, "1"))).await,
            "price",
        );
    }
    for rate in ["-0", "0.0000000001"] {
        let r = c
            .open_wallet(authed(ADMIN_TOKEN, open(crate::standard_pricing(), rate)))
            .await;
        assert_invalid(r, "credits_per_recipient");
    }
    for amount in ["-0", "0.001", "-10.00"] {
        let req = pb::PurchaseCreditsRequest {
            idempotency_key: h.key(),
            wallet_id: "w1".into(),
            credits: 1_000,
            payment_method: "pm_card_ok".into(),
            expires_at: None,
            expected_amount: Some(proto::common::v1::Money {
                amount: amount.into(),
                currency: "EUR".into(),
            }),
        };
        assert_invalid(
            c.purchase_credits(authed(ADMIN_TOKEN, req)).await,
            "expected_amount",
        );
    }
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
    assert_eq!(h.wallet("w1").await.balance, 0);
}

#[tokio::test]
async fn free_text_is_bounded_and_free_of_controls_and_long_values_are_not_echoed() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.open("w2", "1", 0).await;
    h.grant("w1", 100).await;
    let mut c = h.client.clone();
    let evil = [
        "goodwill\u{202E}",
        "good\u{2067}will",
        "good\u{0}will",
        "good\nwill",
    ];
    for reason in evil {
        let adjust = pb::AdjustCreditsRequest {
            idempotency_key: h.key(),
            wallet_id: "w1".into(),
            delta: 5,
            reason: reason.into(),
        };
        assert_invalid(
            c.adjust_credits(authed(ADMIN_TOKEN, adjust)).await,
            "reason",
        );
        let transfer = pb::TransferCreditsRequest {
            idempotency_key: h.key(),
            from_wallet_id: "w1".into(),
            to_wallet_id: "w2".into(),
            credits: 5,
            reason: reason.into(),
        };
        assert_invalid(
            c.transfer_credits(authed(ADMIN_TOKEN, transfer)).await,
            "reason",
        );
        let grant = pb::GrantCreditsRequest {
            idempotency_key: h.key(),
            wallet_id: "w1".into(),
            credits: 5,
            kind: pb::LotKind::Promotional as i32,
            expires_at: None,
            reference: reason.into(),
        };
        assert_invalid(
            c.grant_credits(authed(ADMIN_TOKEN, grant)).await,
            "reference",
        );
    }
    // Long values: refused as INVALID_ARGUMENT with a short message (not RESOURCE_EXHAUSTED).
    let huge = "x".repeat(10_000);
    let r = c
        .get_wallet(authed(
            ADMIN_TOKEN,
            pb::GetWalletRequest {
                wallet_id: huge.clone(),
            },
        ))
        .await;
    assert_invalid(r, "wallet_id");
    let open = pb::OpenWalletRequest {
        idempotency_key: h.key(),
        wallet_id: "w3".into(),
        currency: huge.clone(),
        pricing: Some(crate::standard_pricing()),
        rating: Some(pb::RatingRule {
            credits_per_recipient: "1".into(),
            per_mailing_surcharge: 0,
        }),
        signup_credits: 0,
        signup_credits_expire_at: None,
    };
    assert_invalid(c.open_wallet(authed(ADMIN_TOKEN, open)).await, "currency");
    let purchase = pb::PurchaseCreditsRequest {
        idempotency_key: h.key(),
        wallet_id: "w1".into(),
        credits: 10,
        payment_method: huge.clone(),
        expires_at: None,
        expected_amount: None,
    };
    assert_invalid(
        c.purchase_credits(authed(ADMIN_TOKEN, purchase)).await,
        "payment_method",
    );
    let mut p = crate::standard_pricing();
    p.tiers[0].unit_price = huge;
    let open = pb::OpenWalletRequest {
        idempotency_key: h.key(),
        wallet_id: "w3".into(),
        currency: "EUR".into(),
        pricing: Some(p),
        rating: None,
        signup_credits: 0,
        signup_credits_expire_at: None,
    };
    assert_invalid(c.open_wallet(authed(ADMIN_TOKEN, open)).await, "price");
    // Nothing changed.
    assert_eq!(h.wallet("w1").await.balance, 100);
    assert_eq!(h.ledger("w1").await.len(), 1);
}
