//! The subscription process killed with SIGKILL while its renewal batch runs (once while renewal
//! invoices are issued, once while they are collected by card), each time restarted on
//! the same database (same SQLite file, same PostgreSQL schema): every subscription is renewed
//! exactly once (one renewal invoice, one `renewed` history entry and event, the period moved
//! once), every renewal invoice is collected, invoice numbers run 1..=2N without a gap or a
//! repeat, and every account's wallet got each month's credits exactly once.
//!
//! The subscription service runs as a real process (`CARGO_BIN_EXE_subscription`) so the kill is
//! a real one: no drain, transactions and card payments cut off. The wallet it grants credits in
//! runs in the test process on its own database (a sibling file or schema), as a peer reached
//! over gRPC; it is not killed.

use std::{
    net::TcpListener,
    process::Stdio,
    time::{Duration, Instant},
};

use futures::future::join_all;
use proto::{
    common::v1::{AdvanceTimeRequest, test_clock_client::TestClockClient},
    subscription::v1::{
        self as pb, catalog_client::CatalogClient, subscriptions_client::SubscriptionsClient,
    },
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::{
    db::Db,
    testing::{self, ADMIN_TOKEN, TestDatabase, authed},
};
use sqlx::Row;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{admin_user, card, open_wallet, plan_spec, utc};

/// Monthly card subscriptions renewed in one batch.
const SUBSCRIPTIONS: usize = 120;
/// The plan's monthly credits (`plan_spec`).
const MONTHLY_CREDITS: i64 = 1_000;
/// Renewals issued (then collected) before each kill: a quarter of the batch.
const KILL_AT: i64 = (SUBSCRIPTIONS / 4) as i64;

/// A subscription service process; killed when dropped.
struct Process(std::process::Child);

impl Process {
    /// SIGKILL (what `Child::kill` sends on unix), then waits until the process is gone.
    fn kill_now(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Starts the subscription binary on `db`, its wallet peer at `wallet`, with the test clock;
/// waits until it is healthy.
async fn spawn_subscription(
    db: &TestDatabase,
    wallet: std::net::SocketAddr,
    clock_start: Option<chrono::DateTime<chrono::Utc>>,
) -> (Process, Channel) {
    let port = free_port();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_subscription"));
    if let Some(at) = clock_start {
        command.env("SUBSCRIPTION_TEST_CLOCK_START", at.to_rfc3339());
    }
    let child = command
        .env("SUBSCRIPTION_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("SUBSCRIPTION_METRICS_ADDR", "off")
        .env("SUBSCRIPTION_DATABASE_URL", &db.url)
        .env("SUBSCRIPTION_DATABASE_SCHEMA", &db.schema)
        .env("SUBSCRIPTION_TEST_CLOCK", "true")
        .env(
            "SUBSCRIPTION_TOKENS",
            format!("test:{ADMIN_TOKEN}:read+mutate+admin+act-for-user"),
        )
        .env("SUBSCRIPTION_PEER_WALLET_URL", format!("http://{wallet}"))
        .env("SUBSCRIPTION_PEER_WALLET_TOKEN", ADMIN_TOKEN)
        .env("SUBSCRIPTION_LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let process = Process(child);
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await
            && HealthClient::new(ch.clone())
                .check(HealthCheckRequest::default())
                .await
                .is_ok()
        {
            return (process, ch);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("subscription on port {port} never became healthy");
}

async fn advance_to(channel: &Channel, to: chrono::DateTime<chrono::Utc>) {
    TestClockClient::new(channel.clone())
        .advance_time(authed(
            ADMIN_TOKEN,
            AdvanceTimeRequest {
                to: Some(prost_types::Timestamp {
                    seconds: to.timestamp(),
                    nanos: 0,
                }),
            },
        ))
        .await
        .unwrap();
}

/// (renewal invoices, of which paid), read straight from the database.
async fn renewals(db: &Db) -> (i64, i64) {
    let row = sqlx::query(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status = 'paid' THEN 1 ELSE 0 END), 0) \
         FROM invoices WHERE kind = 'renewal'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    (row.get(0), row.get(1))
}

async fn count(db: &Db, sql: &str) -> i64 {
    sqlx::query(sql).fetch_one(db.pool()).await.unwrap().get(0)
}

/// Polls the database and kills `process` with SIGKILL as soon as `ready` holds for
/// (renewal invoices, of which paid); returns what was committed once it was gone.
async fn kill_when(
    process: &mut Process,
    view: &Db,
    ready: impl Fn((i64, i64)) -> bool,
) -> (i64, i64) {
    let started = Instant::now();
    loop {
        if ready(renewals(view).await) {
            process.kill_now();
            return renewals(view).await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the batch never got there: {:?}",
            renewals(view).await
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn account(i: usize) -> String {
    format!("acct-{i:03}")
}

async fn invoices(subs: &mut SubscriptionsClient<Channel>, account: &str) -> Vec<pb::Invoice> {
    subs.list_invoices(authed(
        ADMIN_TOKEN,
        pb::ListInvoicesRequest {
            actor: None,
            account_id: account.into(),
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .invoices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_service_killed_mid_renewal_renews_each_subscription_exactly_once() {
    runtime::telemetry::init(runtime::config::LogFormat::Text, "error");
    let started = Instant::now();
    let db = TestDatabase::fresh();
    let wallet_db = db.sibling("wallet");
    let wallet = runtime::server::start(
        &credits_wallet::SPEC,
        testing::config(&credits_wallet::DEFAULTS, &wallet_db),
        credits_wallet::routes,
    )
    .await
    .unwrap();
    let wallet_client = CreditsWalletClient::new(
        Channel::from_shared(format!("http://{}", wallet.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let (mut first, channel) = spawn_subscription(&db, wallet.addr, None).await;
    // The test's own view of the subscription database (migrations already applied).
    let view = Db::connect_url(&db.url, &db.schema, 2, &subscription::migrations())
        .await
        .unwrap();

    CatalogClient::new(channel.clone())
        .publish_plan(authed(
            ADMIN_TOKEN,
            pb::PublishPlanRequest {
                idempotency_key: "plan".into(),
                plan: Some(plan_spec("email")),
            },
        ))
        .await
        .unwrap();
    let subs = SubscriptionsClient::new(channel.clone());
    for chunk in (0..SUBSCRIPTIONS).collect::<Vec<_>>().chunks(12) {
        join_all(chunk.iter().map(|&i| {
            let (wallet_client, mut subs) = (wallet_client.clone(), subs.clone());
            async move {
                let account = account(i);
                open_wallet(&wallet_client, &account).await;
                subs.subscribe(authed(
                    ADMIN_TOKEN,
                    pb::SubscribeRequest {
                        idempotency_key: format!("sub-{account}"),
                        actor: Some(admin_user()),
                        account_id: account.clone(),
                        plan_id: "email".into(),
                        contacts: 1_000,
                        seats: 1,
                        add_ons: vec![],
                        payment: Some(card("pm_card_ok")),
                        vat_rate: "0.21".into(),
                    },
                ))
                .await
                .unwrap();
            }
        }))
        .await;
    }
    assert_eq!(renewals(&view).await, (0, 0));
    // January's credits are granted by the jobs after Subscribe; wait for all of them (a month
    // the jobs missed entirely is not granted late, by design).
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(
        &view,
        "SELECT COUNT(*) FROM subscriptions WHERE allowance_cycle < cycle",
    )
    .await
        > 0
    {
        assert!(Instant::now() < deadline, "January's credits never granted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Past every period end: the jobs start the renewal batch at once. The first kill lands
    // while renewal invoices are being issued, the second (after a restart) while they are
    // being collected by card; each time the whole batch is not done yet.
    let renew_at = utc(2026, 2, 1) + chrono::Duration::seconds(1);
    let batch_started = Instant::now();
    advance_to(&channel, renew_at).await;
    let issuing = kill_when(&mut first, &view, |(issued, _)| issued >= KILL_AT).await;
    let issuing_ms = batch_started.elapsed().as_millis();
    assert!(
        (issuing.1 as usize) < SUBSCRIPTIONS,
        "the first kill landed before the batch had collected every renewal ({issuing:?})"
    );

    // Restart on the same database, the clock continuing where it stood (a test clock starts
    // at 2026-01-01 unless told otherwise; a real clock does not go back).
    let (mut second, _) = spawn_subscription(&db.share(), wallet.addr, Some(renew_at)).await;
    // Renewals are collected in batches: one transaction records a whole batch's payments, so
    // there is no point "part way through collecting" to wait for. The second process is killed
    // as soon as it serves, while it claims and charges what the first left behind.
    let collecting = kill_when(&mut second, &view, |_| true).await;
    let (_third, channel) = spawn_subscription(&db.share(), wallet.addr, Some(renew_at)).await;
    let mut subs = SubscriptionsClient::new(channel.clone());
    // Generous bounds: liveness on a loaded machine, not a timing assertion.
    let deadline = Instant::now() + Duration::from_secs(60);
    while renewals(&view).await != (SUBSCRIPTIONS as i64, SUBSCRIPTIONS as i64) {
        assert!(
            Instant::now() < deadline,
            "renewals never completed: {:?}",
            renewals(&view).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the jobs run again a few times: nothing may be renewed or granted twice.
    for hours in 1..=3 {
        advance_to(&channel, renew_at + chrono::Duration::hours(hours)).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }

    // The month's credits are granted after the renewals are paid, in batches of their own:
    // give the jobs time (a liveness bound, moving the clock to wake them), then count.
    let mut wallet_client = wallet_client;
    let grants_deadline = Instant::now() + Duration::from_secs(60);
    let mut hours = 3;
    loop {
        let mut short = 0;
        for i in 0..SUBSCRIPTIONS {
            let entries = wallet_client
                .list_ledger_entries(authed(
                    ADMIN_TOKEN,
                    wpb::ListLedgerEntriesRequest {
                        wallet_id: account(i),
                        page_size: 500,
                        page_token: String::new(),
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .entries;
            if entries.len() < 2 {
                short += 1;
            }
        }
        if short == 0 || Instant::now() > grants_deadline {
            break;
        }
        hours += 1;
        advance_to(&channel, renew_at + chrono::Duration::hours(hours)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Exactly once, per subscription.
    let mut numbers = Vec::new();
    let mut grants_lost = 0;
    let mut grants_doubled = 0;
    let mut wrong_balances = Vec::new();
    for i in 0..SUBSCRIPTIONS {
        let account = account(i);
        let inv = invoices(&mut subs, &account).await;
        assert_eq!(
            inv.len(),
            2,
            "{account}: first invoice and one renewal: {inv:?}"
        );
        assert_eq!(inv[1].kind, "renewal", "{account}: {inv:?}");
        for invoice in &inv {
            assert_eq!(
                invoice.status,
                pb::InvoiceStatus::Paid as i32,
                "{account}: {invoice:?}"
            );
        }
        numbers.extend(inv.iter().map(|i| i.number));
        let s = subs
            .get_subscription(authed(
                ADMIN_TOKEN,
                pb::GetSubscriptionRequest {
                    actor: Some(admin_user()),
                    account_id: account.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            s.current_period_end.unwrap().seconds,
            utc(2026, 3, 1).timestamp(),
            "{account}: the period moved once"
        );
        assert_eq!(
            s.history.iter().filter(|e| e.action == "renewed").count(),
            1,
            "{account}: renewed once"
        );
        // January's and February's credits, each once.
        let ledger = wallet_client
            .list_ledger_entries(authed(
                ADMIN_TOKEN,
                wpb::ListLedgerEntriesRequest {
                    wallet_id: account.clone(),
                    page_size: 500,
                    page_token: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .entries;
        let granted: i64 = ledger.iter().map(|e| e.delta).sum();
        match ledger.len() {
            2 => {}
            n if n < 2 => grants_lost += 2 - n,
            n => grants_doubled += n - 2,
        }
        if granted != 2 * MONTHLY_CREDITS {
            let refs: Vec<String> = ledger.into_iter().map(|e| e.reference).collect();
            wrong_balances.push((account, granted, refs));
        }
    }
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=2 * SUBSCRIPTIONS as u64).collect::<Vec<_>>(),
        "invoice numbers consecutive, without a gap or a repeat"
    );
    let renewed_events = count(
        &view,
        "SELECT COUNT(*) FROM outbox WHERE event_type = 'subscription.renewed'",
    )
    .await;
    assert_eq!(
        renewed_events, SUBSCRIPTIONS as i64,
        "one renewed event each"
    );
    let report = wallet_client
        .verify_ledger(authed(ADMIN_TOKEN, wpb::VerifyLedgerRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.violations, [], "the wallet's books after the crash");

    eprintln!(
        "subscription crash test [{:?}]: {SUBSCRIPTIONS} monthly card subscriptions; SIGKILL \
         {issuing_ms} ms into the renewal batch with {} renewal invoices issued ({} collected), \
         restart, SIGKILL again with {} issued ({} collected), restart; 2 kills, 2 restarts; \
         after: {SUBSCRIPTIONS} renewed once each, invoice numbers 1..={} without gaps or \
         repeats, {renewed_events} renewed events, wallet grants lost: {grants_lost}, doubled: \
         {grants_doubled}; VerifyLedger: {} wallets, {} entries, {} violations; {} ms in all",
        testing::backend(),
        issuing.0,
        issuing.1,
        collecting.0,
        collecting.1,
        2 * SUBSCRIPTIONS,
        report.wallets_checked,
        report.entries_checked,
        report.violations_total,
        started.elapsed().as_millis(),
    );
    assert_eq!(grants_lost, 0, "every month's credits granted");
    assert_eq!(grants_doubled, 0, "no month's credits granted twice");
    assert_eq!(
        wrong_balances,
        [],
        "each wallet holds two months of credits"
    );
    view.close().await;
    wallet.stop().await.unwrap();
}
