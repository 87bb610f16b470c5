//! Renewal batches driven directly on two replicas of the use cases sharing one database (each
//! with its own pool, test clock and gateway simulator, and no background jobs), after the
//! subscriptions were made through a real server that is then stopped: small batches, so the
//! replicas interleave; every subscription is claimed and renewed once, invoice numbers stay
//! consecutive (also when a batch fails and is rolled back), each card renewal is charged once
//! and each month of credits granted once.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use proto::wallet::v1::{self as w, credits_wallet_client::CreditsWalletClient};
use runtime::{
    Platform,
    clock::ServiceClock,
    db::Db,
    metrics::Metrics,
    outbox::Outbox,
    testing::{self, ADMIN_TOKEN, TestDatabase, authed},
};
use shared::SimulatedGateway;
use sqlx::Row;
use subscription::{
    model::InvoiceStatus,
    service::{RenewalBatch, Subscriptions},
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{Harness, bank, card, open_wallet, plan_spec};

/// A replica of the use cases on `db` at `now`, granting credits through `wallet` (a URL).
async fn replica(db: &TestDatabase, now: DateTime<Utc>, wallet: Option<&str>) -> Subscriptions {
    let peer = wallet.map_or(String::new(), |url| {
        format!("[peers.wallet]\nurl = \"{url}\"\ntoken = \"{ADMIN_TOKEN}\"\n")
    });
    let config = testing::config_with(&subscription::DEFAULTS, db, &peer);
    let pool = Db::connect(&config, &subscription::migrations())
        .await
        .unwrap();
    let clock = ServiceClock::test(now);
    let metrics = Metrics::new("subscription");
    let wallet = config.peer("wallet").ok().map(|p| {
        CreditsWalletClient::new(
            runtime::client::peer_channel(p, std::time::Duration::from_secs(5)).unwrap(),
        )
    });
    let platform = Platform {
        config: Arc::new(config),
        outbox: Outbox::new(pool.clone(), clock.clone(), metrics.clone()),
        db: pool,
        clock,
        metrics,
        shutdown: CancellationToken::new(),
        http_routes: Default::default(),
    };
    Subscriptions::new(platform, Arc::new(SimulatedGateway::new()), wallet)
}

/// What the job does: batches of `limit` until one comes back short, each batch's charges and
/// grants after its commit. Returns how many subscriptions this replica claimed.
async fn renew_until_done(cases: &Subscriptions, limit: i64) -> usize {
    let mut claimed = 0;
    loop {
        let RenewalBatch {
            claimed: n,
            to_collect,
            renewed,
        } = cases.renew_batch(limit).await.unwrap();
        claimed += n;
        cases.collect_issued(to_collect).await.unwrap();
        cases.grant_many(renewed).await.unwrap();
        if (n as i64) < limit {
            return claimed;
        }
    }
}

/// `(number, account, kind, status, attempts)` of an invoice.
type InvoiceRow = (i64, String, String, String, i64);

/// Every invoice, by number.
async fn all_invoices(db: &Db) -> Vec<InvoiceRow> {
    sqlx::query(
        "SELECT number, account_id, kind, status, payment_attempts FROM invoices ORDER BY number",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            r.get::<String, _>(1),
            r.get::<String, _>(2),
            r.get::<String, _>(3),
            r.get(4),
        )
    })
    .collect()
}

async fn balance(wallet: &CreditsWalletClient<Channel>, account: &str) -> i64 {
    wallet
        .clone()
        .get_wallet(authed(
            ADMIN_TOKEN,
            w::GetWalletRequest {
                wallet_id: account.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .balance
}

/// A pool of our own on the shared database, to read what the replicas wrote.
async fn reader(db: &TestDatabase) -> Db {
    Db::connect_url(&db.url, &db.schema, 2, &subscription::migrations())
        .await
        .unwrap()
}

fn after(period_end_seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(period_end_seconds + 1, 0).unwrap()
}

#[tokio::test]
async fn two_replicas_renewing_in_small_batches_claim_renew_charge_and_credit_each_subscription_once()
 {
    let h = Harness::start_with_wallet().await;
    let (wallet_server, wallet) = h.wallet.as_ref().unwrap();
    let wallet_url = format!("http://{}", wallet_server.addr);
    let wallet = wallet.clone();
    h.publish(plan_spec("email")).await;
    let n = 45;
    let accounts: Vec<String> = (0..n).map(|i| format!("acct-{i}")).collect();
    for account in &accounts {
        open_wallet(&wallet, account).await;
    }
    let subscribes = accounts.iter().enumerate().map(|(i, account)| {
        let payment = if i % 5 == 0 {
            bank()
        } else {
            card("pm_card_ok")
        };
        h.subscribe(account, "email", 1_000, payment)
    });
    let subs = futures::future::join_all(subscribes).await;
    assert!(subs.iter().all(|s| s.is_ok()), "{subs:?}");
    let period_end = subs[0]
        .as_ref()
        .unwrap()
        .current_period_end
        .unwrap()
        .seconds;
    // The first month's credits, granted by the server's jobs, before it stops.
    for account in &accounts {
        for _ in 0..100 {
            if balance(&wallet, account).await == 1_000 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(balance(&wallet, account).await, 1_000, "{account}");
    }
    // Keeps the wallet serving (and the SQLite files alive) while the server stops.
    let Harness {
        running,
        db,
        wallet: _wallet,
        ..
    } = h;
    running.stop().await.unwrap();

    let at = after(period_end);
    let a = replica(&db.share(), at, Some(&wallet_url)).await;
    let b = replica(&db.share(), at, Some(&wallet_url)).await;
    let (by_a, by_b) = futures::join!(renew_until_done(&a, 4), renew_until_done(&b, 4));
    assert_eq!(
        by_a + by_b,
        n,
        "each subscription claimed once, by one replica"
    );
    let (again_a, again_b) = futures::join!(renew_until_done(&a, 4), renew_until_done(&b, 4));
    assert_eq!((again_a, again_b), (0, 0), "nothing is due any more");

    let read = reader(&db).await;
    let invoices = all_invoices(&read).await;
    let numbers: Vec<i64> = invoices.iter().map(|i| i.0).collect();
    assert_eq!(
        numbers,
        (1..=2 * n as i64).collect::<Vec<_>>(),
        "consecutive, no gap, no repeat"
    );
    let mut per_account: BTreeMap<&str, Vec<&InvoiceRow>> = BTreeMap::new();
    for i in &invoices {
        per_account.entry(i.1.as_str()).or_default().push(i);
    }
    for (k, account) in accounts.iter().enumerate() {
        let inv = &per_account[account.as_str()];
        let kinds: Vec<&str> = inv.iter().map(|i| i.2.as_str()).collect();
        assert_eq!(kinds, ["subscribe", "renewal"], "{account}");
        let renewal = inv[1];
        if k % 5 == 0 {
            assert_eq!(
                (renewal.3.as_str(), renewal.4),
                (InvoiceStatus::Open.as_str(), 0),
                "{account}: a bank transfer is not charged"
            );
        } else {
            assert_eq!(
                (renewal.3.as_str(), renewal.4),
                (InvoiceStatus::Paid.as_str(), 1),
                "{account}: charged once"
            );
        }
        assert_eq!(
            balance(&wallet, account).await,
            2_000,
            "{account}: one month of credits per cycle"
        );
    }
    let renewed: Vec<i64> = sqlx::query(
        "SELECT COUNT(*) FROM subscription_history WHERE action = 'renewed' \
         GROUP BY subscription_id",
    )
    .fetch_all(read.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    assert_eq!(renewed, vec![1; n], "one renewal per subscription");
    let events = |event_type: &'static str| {
        let read = read.clone();
        async move {
            sqlx::query("SELECT COUNT(*) FROM outbox WHERE event_type = $1")
                .bind(event_type)
                .fetch_one(read.pool())
                .await
                .unwrap()
                .get::<i64, _>(0)
        }
    };
    assert_eq!(events("subscription.renewed").await, n as i64);
    assert_eq!(events("subscription.credits_granted").await, 2 * n as i64);
}

#[tokio::test]
async fn a_failed_renewal_batch_gives_back_its_invoice_numbers_and_the_others_still_renew() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    let mut period_end = 0;
    for i in 0..6 {
        let s = h
            .subscribe(&format!("acct-{i}"), "email", 1_000, card("pm_card_ok"))
            .await
            .unwrap();
        period_end = s.current_period_end.unwrap().seconds;
    }
    let Harness { running, db, .. } = h;
    running.stop().await.unwrap();
    let read = reader(&db).await;
    // A subscription whose plan version is gone: renewing it fails inside the batch (after
    // those before it took their numbers), so the whole batch rolls back.
    sqlx::query("UPDATE subscriptions SET plan_version = 99 WHERE account_id = 'acct-2'")
        .execute(read.pool())
        .await
        .unwrap();
    let a = replica(&db.share(), after(period_end), None).await;
    let batch = a.renew_batch(50).await.unwrap();
    assert_eq!(
        batch.claimed, 5,
        "the others renewed one by one; acct-2 left"
    );
    let invoices = all_invoices(&read).await;
    assert_eq!(
        invoices.iter().map(|i| i.0).collect::<Vec<_>>(),
        (1..=11).collect::<Vec<_>>(),
        "the rolled-back range was taken again: no gap"
    );
    assert!(
        invoices
            .iter()
            .all(|i| i.1 != "acct-2" || i.2 == "subscribe")
    );
    sqlx::query("UPDATE subscriptions SET plan_version = 1 WHERE account_id = 'acct-2'")
        .execute(read.pool())
        .await
        .unwrap();
    let batch = a.renew_batch(50).await.unwrap();
    assert_eq!(batch.claimed, 1);
    assert_eq!(batch.to_collect.len(), 1);
    let invoices = all_invoices(&read).await;
    let last = invoices.last().unwrap();
    assert_eq!(
        (last.0, last.1.as_str(), last.2.as_str()),
        (12, "acct-2", "renewal")
    );
    assert_eq!(a.renew_batch(50).await.unwrap().claimed, 0);
}
