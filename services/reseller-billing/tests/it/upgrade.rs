//! The upgrade that scoped idempotency keys by partner (migration 20261205000000): a retry that
//! straddles it gets its first answer and is debited once, whatever its first try left behind.

use std::borrow::Cow;

use prost::Message;
use proto::{
    reseller::v1::{self as pb, BillingMode, PartnerFunding},
    wallet::v1 as wpb,
};
use runtime::{
    db::{Db, Migrations},
    testing::{self, ADMIN_TOKEN, TestDatabase, authed},
};

use crate::{Harness, channel, pricing, start_reseller};

const P1: &str = "partner-one-token";
const P2: &str = "partner-two-token";
/// The first migration after which keys are each partner's own.
const SCOPED_KEYS: i64 = 20261205000000;

/// The database of `db` as the service before the upgrade left it, migrated that far.
async fn before_the_upgrade(db: &TestDatabase) -> Db {
    let mut migrations: Migrations = reseller_billing::migrations();
    for m in [&mut migrations.sqlite, &mut migrations.postgres] {
        let before: Vec<_> = m
            .migrations
            .iter()
            .filter(|m| m.version < SCOPED_KEYS)
            .cloned()
            .collect();
        m.migrations = Cow::Owned(before);
    }
    Db::connect_url(&db.url, &db.schema, 2, &migrations)
        .await
        .unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn add_request(key: &str, partner: &str, customer: &str) -> pb::AddCustomerRequest {
    pb::AddCustomerRequest {
        idempotency_key: key.into(),
        partner_id: partner.into(),
        customer_id: customer.into(),
        billing_mode: BillingMode::PartnerPays as i32,
    }
}

#[tokio::test]
async fn an_answer_stored_under_a_bare_key_before_the_upgrade_answers_only_its_own_retry() {
    let h = Harness::start().await;
    for p in ["p1", "p2"] {
        h.register(p, "1", PartnerFunding::Prepaid, "").await;
    }
    let mut client = h.client.clone();
    let first = client
        .add_customer(authed(P1, add_request("add-1", "p1", "c1")))
        .await
        .unwrap()
        .into_inner();
    // The row as the service stored it before keys were scoped: under the bare key.
    let db = Db::connect_url(&h.db.url, &h.db.schema, 1, &reseller_billing::migrations())
        .await
        .unwrap();
    let moved = sqlx::query(
        "UPDATE idempotency_keys SET idempotency_key = 'add-1' WHERE idempotency_key = 'p1:add-1'",
    )
    .execute(db.pool())
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(moved, 1);
    db.close().await;

    // p1's retry gets its first answer (not "customer exists", not a second execution).
    let retried = client
        .add_customer(authed(P1, add_request("add-1", "p1", "c1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried, first);
    // p2's own request with the same key text is p2's: executed, not p1's answer.
    let theirs = client
        .add_customer(authed(P2, add_request("add-1", "p2", "c2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (theirs.partner_id.as_str(), theirs.customer_id.as_str()),
        ("p2", "c2")
    );
    // (A bare-key row cannot tell whose it was: one that is not this very request is
    // ignored, so reusing a key across the upgrade for another request is not refused.)
}

#[tokio::test]
async fn a_send_pending_at_the_upgrade_is_debited_once_by_its_retry_naming_an_old_long_id() {
    let db = TestDatabase::fresh();
    let wallet_db = db.sibling("wallet");
    let wallet = runtime::server::start(
        &credits_wallet::SPEC,
        testing::config(&credits_wallet::DEFAULTS, &wallet_db),
        credits_wallet::routes,
    )
    .await
    .unwrap();
    let mut wallets =
        wpb::credits_wallet_client::CreditsWalletClient::new(channel(wallet.addr).await);
    let rating = wpb::RatingRule {
        credits_per_recipient: "1".into(),
        per_mailing_surcharge: 0,
    };
    wallets
        .open_wallet(authed(
            ADMIN_TOKEN,
            wpb::OpenWalletRequest {
                idempotency_key: "open".into(),
                wallet_id: "partner:p1".into(),
                currency: "EUR".into(),
                pricing: Some(pricing()),
                rating: Some(rating.clone()),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    wallets
        .grant_credits(authed(
            ADMIN_TOKEN,
            wpb::GrantCreditsRequest {
                idempotency_key: "grant".into(),
                wallet_id: "partner:p1".into(),
                credits: 10_000,
                kind: wpb::LotKind::Promotional as i32,
                expires_at: None,
                reference: "test".into(),
            },
        ))
        .await
        .unwrap();

    // Before the upgrade: p1 and its customer (with an id longer than a new customer's may be,
    // as ids were then), and a send of 1,000 recipients that the service routed and asked of
    // the wallet (under the key of that time) but did not record.
    let customer = "c".repeat(reseller_billing::domain::MAX_EXISTING_CUSTOMER_ID_LEN);
    assert!(customer.len() > reseller_billing::domain::MAX_CUSTOMER_ID_LEN);
    let old = before_the_upgrade(&db).await;
    sqlx::query(
        "INSERT INTO partners (partner_id, currency, funding, payment_method, wallet_id, \
         pricing, rating, resale_prices, created_at_us) \
         VALUES ('p1', 'EUR', 'prepaid', '', 'partner:p1', $1, $2, '', 0)",
    )
    .bind(hex(&pricing().encode_to_vec()))
    .bind(hex(&rating.encode_to_vec()))
    .execute(old.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO customers (customer_id, partner_id, billing_mode, suspended, \
         monthly_limit, wallet_id, created_at_us) \
         VALUES ($1, 'p1', 'partner_pays', 0, 0, $2, 0)",
    )
    .bind(&customer)
    .bind(format!("customer:{customer}"))
    .execute(old.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO routed (idempotency_key, kind, partner_id, customer_id, payer, \
         payer_wallet_id, mailing_id, recipients, credits, status, created_at_us) \
         VALUES ('send-1', 'charge', 'p1', $1, 'partner', 'partner:p1', 'm1', 1000, 1000, \
         'pending', 0)",
    )
    .bind(&customer)
    .execute(old.pool())
    .await
    .unwrap();
    old.close().await;
    let first_try = wallets
        .charge_mailing(authed(
            ADMIN_TOKEN,
            wpb::ChargeMailingRequest {
                idempotency_key: "rs:send-1:send".into(),
                wallet_id: "partner:p1".into(),
                mailing_id: "m1".into(),
                recipients: 1_000,
            },
        ))
        .await
        .unwrap()
        .into_inner();

    // The upgraded service; the platform retries the send with its key.
    let reseller = start_reseller(
        &db,
        &format!("http://{}", wallet.addr),
        "partner|p1:partner-one-token",
    )
    .await;
    let mut client =
        pb::reseller_billing_client::ResellerBillingClient::new(channel(reseller.addr).await);
    let send = |customer_id: String, recipients: u64| {
        authed(
            P1,
            pb::ChargeMailingRequest {
                idempotency_key: "send-1".into(),
                partner_id: "p1".into(),
                customer_id,
                mailing_id: "m1".into(),
                recipients,
            },
        )
    };
    // The key for another send is refused, not completed with this one's routing.
    for (other, recipients) in [("c1".to_string(), 1_000), (customer.clone(), 999)] {
        let err = client
            .charge_mailing(send(other, recipients))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    }
    let retried = client
        .charge_mailing(send(customer.clone(), 1_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.charge.unwrap().charge_id, first_try.charge_id);
    let balance = wallets
        .get_wallet(authed(
            ADMIN_TOKEN,
            wpb::GetWalletRequest {
                wallet_id: "partner:p1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .balance;
    assert_eq!(balance, 9_000, "debited once");
    let (a, b) = tokio::join!(reseller.stop(), wallet.stop());
    a.unwrap();
    b.unwrap();
}
