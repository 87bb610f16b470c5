//! A wallet process killed with SIGKILL in the middle of 64 concurrent callers, then restarted on
//! the same database (same SQLite file, same PostgreSQL schema): every acknowledged call is in
//! the ledger, every unacknowledged call retried with its idempotency key completes exactly once,
//! every acknowledged call replays its first answer, and `VerifyLedger` finds nothing wrong.
//!
//! Half the wallets are prepaid (charges and card purchases), half on demand (each charge buys
//! its credits through the gateway first), so the kill also lands between the transactions of
//! a payment: purchase recorded `processing`, gateway called, outcome not yet applied.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use proto::wallet::v1::{self as pb, credits_wallet_client::CreditsWalletClient};
use runtime::testing::{self, ADMIN_TOKEN, TestDatabase, authed};
use sqlx::Row;
use tonic::{Code, Status, transport::Channel};

use crate::concurrency::spawn_replica;

const CALLERS: usize = 64;
const PREPAID: [&str; 4] = ["pre-0", "pre-1", "pre-2", "pre-3"];
const ON_DEMAND: [&str; 4] = ["dem-0", "dem-1", "dem-2", "dem-3"];
const PREPAID_GRANT: i64 = 10_000_000;
/// Recipients per mailing; at one credit each, the credits a charge debits.
const RECIPIENTS: i64 = 10;
/// Credits per card purchase.
const BOUGHT: i64 = 100;
const KILL_AFTER: Duration = Duration::from_millis(150);
const MIN_ACKED_BEFORE_KILL: usize = 16;

#[derive(Debug, Clone)]
enum Call {
    Charge(pb::ChargeMailingRequest),
    Purchase(pb::PurchaseCreditsRequest),
}

#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Charge(pb::MailingCharge),
    Purchase(pb::Purchase),
}

impl Call {
    fn wallet(&self) -> &str {
        match self {
            Call::Charge(r) => &r.wallet_id,
            Call::Purchase(r) => &r.wallet_id,
        }
    }
}

/// Caller `c`'s `i`-th call: on demand wallets are charged; prepaid wallets alternate a charge
/// and a card purchase. Keys and mailing ids are unique per call.
fn call(c: usize, i: usize) -> Call {
    let key = format!("crash-{c}-{i}");
    if c % 2 == 1 {
        return Call::Charge(pb::ChargeMailingRequest {
            idempotency_key: key,
            wallet_id: ON_DEMAND[(c / 2) % ON_DEMAND.len()].into(),
            mailing_id: format!("m-{c}-{i}"),
            recipients: RECIPIENTS as u64,
        });
    }
    let wallet = PREPAID[(c / 2) % PREPAID.len()].to_string();
    if i.is_multiple_of(2) {
        Call::Charge(pb::ChargeMailingRequest {
            idempotency_key: key,
            wallet_id: wallet,
            mailing_id: format!("m-{c}-{i}"),
            recipients: RECIPIENTS as u64,
        })
    } else {
        Call::Purchase(pb::PurchaseCreditsRequest {
            idempotency_key: key,
            wallet_id: wallet,
            credits: BOUGHT as u64,
            payment_method: "pm_card_ok".into(),
            expires_at: None,
            expected_amount: None,
        })
    }
}

async fn send(client: &mut CreditsWalletClient<Channel>, call: &Call) -> Result<Answer, Status> {
    match call {
        Call::Charge(r) => client
            .charge_mailing(authed(ADMIN_TOKEN, r.clone()))
            .await
            .map(|a| Answer::Charge(a.into_inner())),
        Call::Purchase(r) => client
            .purchase_credits(authed(ADMIN_TOKEN, r.clone()))
            .await
            .map(|a| Answer::Purchase(a.into_inner())),
    }
}

/// Retries a call until it completes (a payment whose outcome is not known yet answers
/// UNAVAILABLE; the restarted process reconciles it).
async fn complete(client: &mut CreditsWalletClient<Channel>, call: &Call) -> Answer {
    let mut last = None;
    for _ in 0..50 {
        match send(client, call).await {
            Ok(a) => return a,
            Err(s) if s.code() == Code::Unavailable => last = Some(s),
            Err(s) => panic!("retry of {call:?} failed: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("retry of {call:?} never completed: {last:?}");
}

/// Every ledger entry's reference of `wallet`, counted, through ListLedgerEntries.
async fn references(
    client: &mut CreditsWalletClient<Channel>,
    wallet: &str,
) -> (HashMap<String, usize>, usize) {
    let mut counts = HashMap::new();
    let mut entries = 0;
    let mut token = String::new();
    loop {
        let page = client
            .list_ledger_entries(authed(
                ADMIN_TOKEN,
                pb::ListLedgerEntriesRequest {
                    wallet_id: wallet.into(),
                    page_size: 500,
                    page_token: token,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        entries += page.entries.len();
        for e in page.entries {
            *counts.entry(e.reference).or_insert(0) += 1;
        }
        if page.next_page_token.is_empty() {
            return (counts, entries);
        }
        token = page.next_page_token;
    }
}

async fn open_wallets(client: &mut CreditsWalletClient<Channel>) {
    for w in PREPAID.iter().chain(&ON_DEMAND) {
        client
            .open_wallet(authed(
                ADMIN_TOKEN,
                pb::OpenWalletRequest {
                    idempotency_key: format!("open-{w}"),
                    wallet_id: (*w).into(),
                    currency: "EUR".into(),
                    pricing: Some(crate::standard_pricing()),
                    rating: Some(pb::RatingRule {
                        credits_per_recipient: "1".into(),
                        per_mailing_surcharge: 0,
                    }),
                    signup_credits: 0,
                    signup_credits_expire_at: None,
                },
            ))
            .await
            .unwrap();
    }
    for w in PREPAID {
        client
            .grant_credits(authed(
                ADMIN_TOKEN,
                pb::GrantCreditsRequest {
                    idempotency_key: format!("grant-{w}"),
                    wallet_id: w.into(),
                    credits: PREPAID_GRANT as u64,
                    kind: pb::LotKind::Promotional as i32,
                    expires_at: None,
                    reference: String::new(),
                },
            ))
            .await
            .unwrap();
    }
    for w in ON_DEMAND {
        client
            .set_funding_mode(authed(
                ADMIN_TOKEN,
                pb::SetFundingModeRequest {
                    idempotency_key: format!("fund-{w}"),
                    wallet_id: w.into(),
                    funding_mode: pb::FundingMode::OnDemand as i32,
                    payment_method: "pm_card_ok".into(),
                },
            ))
            .await
            .unwrap();
    }
}

/// Purchases the kill left between their transactions, read straight from the database.
async fn purchases_left_processing(db: &TestDatabase) -> i64 {
    let (pool, _) = credits_wallet::verify::connect_read_only(&db.url, &db.schema)
        .await
        .unwrap();
    let n = sqlx::query("SELECT COUNT(*) FROM purchases WHERE status = 'processing'")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_killed_mid_flight_loses_no_acknowledged_call_and_retries_complete_once() {
    let started = Instant::now();
    let db = TestDatabase::fresh();
    let (mut first, channel) = spawn_replica(&db).await;
    let mut client = CreditsWalletClient::new(channel);
    open_wallets(&mut client).await;

    // The storm: each caller issues calls one after another until one fails.
    let killed = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let storm_started = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let mut client = client.clone();
            let (killed, acked) = (killed.clone(), acked.clone());
            tokio::spawn(async move {
                let mut log: Vec<(Call, Option<Answer>)> = Vec::new();
                for i in 0.. {
                    if killed.load(Ordering::SeqCst) {
                        break;
                    }
                    let call = call(c, i);
                    let answer = send(&mut client, &call).await.ok();
                    let failed = answer.is_none();
                    if !failed {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    log.push((call, answer));
                    if failed {
                        break;
                    }
                }
                log
            })
        })
        .collect();
    tokio::time::sleep(KILL_AFTER).await;
    // A floor, so the kill always finds some calls answered and others in flight.
    while acked.load(Ordering::SeqCst) < MIN_ACKED_BEFORE_KILL
        && storm_started.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill_now();
    let killed_at = storm_started.elapsed();
    killed.store(true, Ordering::SeqCst);
    let log: Vec<(Call, Option<Answer>)> = join_all(callers)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    let issued = log.len();
    let acknowledged: Vec<(&Call, &Answer)> = log
        .iter()
        .filter_map(|(c, a)| Some((c, a.as_ref()?)))
        .collect();
    let unacknowledged: Vec<&Call> = log
        .iter()
        .filter(|(_, a)| a.is_none())
        .map(|(c, _)| c)
        .collect();
    let half_done = purchases_left_processing(&db).await;

    // Restart on the same database, on a new port.
    let (_second, channel) = spawn_replica(&db.share()).await;
    let mut client = CreditsWalletClient::new(channel);

    // Every acknowledged call is in the ledger, once.
    let mut before = HashMap::new();
    for w in PREPAID.iter().chain(&ON_DEMAND) {
        before.insert(*w, references(&mut client, w).await.0);
    }
    let reference = |call: &Call, answer: &Answer| match (call, answer) {
        (Call::Charge(r), _) => format!("mailing:{}", r.mailing_id),
        (Call::Purchase(_), Answer::Purchase(p)) => format!("purchase:{}", p.purchase_id),
        (Call::Purchase(_), Answer::Charge(_)) => unreachable!("a purchase answered as a charge"),
    };
    let mut lost = 0;
    for (call, answer) in &acknowledged {
        if let Answer::Purchase(p) = answer {
            assert_eq!(p.status, pb::PurchaseStatus::Succeeded as i32, "{p:?}");
        }
        let found = before[call.wallet()]
            .get(&reference(call, answer))
            .copied()
            .unwrap_or(0);
        assert!(found <= 1, "{call:?} is in the ledger {found} times");
        if found == 0 {
            lost += 1;
        }
    }
    let committed_unacked = unacknowledged
        .iter()
        .filter(|c| match c {
            Call::Charge(r) => {
                before[c.wallet()].contains_key(&format!("mailing:{}", r.mailing_id))
            }
            Call::Purchase(_) => false,
        })
        .count();

    // Retries with the same keys complete; acknowledged calls replay their first answer.
    let retried = join_all(unacknowledged.iter().map(|call| {
        let mut client = client.clone();
        async move { ((*call).clone(), complete(&mut client, call).await) }
    }))
    .await;
    let mut replayed_identical = 0;
    for (call, answer) in &acknowledged {
        assert_eq!(
            &send(&mut client, call).await.unwrap(),
            *answer,
            "a retry of an acknowledged call replays its answer"
        );
        replayed_identical += 1;
    }

    // Exactly once: each call's entry once; nothing else in any ledger; balances add up.
    let finals: Vec<(Call, Answer)> = acknowledged
        .iter()
        .map(|(c, a)| ((*c).clone(), (*a).clone()))
        .chain(retried)
        .collect();
    let mut after = HashMap::new();
    let mut entries_total = 0;
    for w in PREPAID.iter().chain(&ON_DEMAND) {
        let (refs, n) = references(&mut client, w).await;
        entries_total += n;
        after.insert(*w, (refs, n));
    }
    let mut duplicates = 0;
    let mut per_wallet: HashMap<&str, (i64, i64)> = HashMap::new();
    for (call, answer) in &finals {
        let (refs, _) = &after[call.wallet()];
        let n = refs.get(&reference(call, answer)).copied().unwrap_or(0);
        assert!(n >= 1, "{call:?} completed but is not in the ledger");
        duplicates += n - 1;
        let counts = per_wallet.entry(call.wallet()).or_default();
        match call {
            Call::Charge(_) => counts.0 += 1,
            Call::Purchase(_) => counts.1 += 1,
        }
    }
    assert_eq!(duplicates, 0, "no call is in the ledger twice");
    for w in PREPAID.iter().chain(&ON_DEMAND) {
        let (charges, purchases) = per_wallet.get(w).copied().unwrap_or_default();
        let (expected_entries, expected_balance) = if PREPAID.contains(w) {
            (
                1 + charges + purchases,
                PREPAID_GRANT - RECIPIENTS * charges + BOUGHT * purchases,
            )
        } else {
            // On demand: each charge buys exactly its credits and spends them.
            (2 * charges, 0)
        };
        assert_eq!(after[w].1 as i64, expected_entries, "entries of {w}");
        let wallet = client
            .get_wallet(authed(
                ADMIN_TOKEN,
                pb::GetWalletRequest {
                    wallet_id: (*w).into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(wallet.balance, expected_balance, "balance of {w}");
    }

    let report = client
        .verify_ledger(authed(ADMIN_TOKEN, pb::VerifyLedgerRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.violations, [], "VerifyLedger after the crash");
    assert_eq!(report.entries_checked, entries_total as u64);

    eprintln!(
        "crash test [{:?}]: {CALLERS} callers, {issued} calls issued, SIGKILL after {} ms \
         ({} acknowledged, {} unacknowledged of which {committed_unacked} charges had committed, \
         {half_done} purchases left processing); 1 kill, 1 restart; {} retries completed, \
         {replayed_identical} acknowledged calls replayed identically; records lost: {lost}, \
         duplicates: {duplicates}; VerifyLedger: {} wallets, {} entries, {} purchases, \
         {} violations; {} ms in all",
        testing::backend(),
        killed_at.as_millis(),
        acknowledged.len(),
        unacknowledged.len(),
        unacknowledged.len(),
        report.wallets_checked,
        report.entries_checked,
        report.purchases_checked,
        report.violations_total,
        started.elapsed().as_millis(),
    );
    assert_eq!(lost, 0, "no acknowledged call was lost");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "bounded in time"
    );
}
