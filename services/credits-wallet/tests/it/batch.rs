//! Group commit (issue 7): sends applied together in one transaction answer exactly as they
//! would alone, and concurrent sends on one wallet share transactions.

use std::sync::Arc;

use credits_wallet::service::send_rules::Spend;
use prost::Message;
use proto::wallet::v1 as pb;
use runtime::{
    idempotency::IdempotencyKey,
    testing::{ADMIN_TOKEN, authed},
};
use shared::SimulatedGateway;
use tonic::{Code, Status};

use crate::{Harness, rules::on_demand};

fn charge(key: &str, wallet: &str, mailing: &str, recipients: u64) -> pb::ChargeMailingRequest {
    pb::ChargeMailingRequest {
        idempotency_key: key.into(),
        wallet_id: wallet.into(),
        mailing_id: mailing.into(),
        recipients,
    }
}

fn send(r: &pb::ChargeMailingRequest) -> (IdempotencyKey, String, Spend) {
    (
        IdempotencyKey::new("ChargeMailing", &r.idempotency_key, r).unwrap(),
        r.wallet_id.clone(),
        Spend::Charge {
            mailing_id: r.mailing_id.clone(),
            recipients: r.recipients,
        },
    )
}

/// Runs `requests` as one batch on `platform` (its clock decides) and returns each charge's
/// balance after it; every one must succeed.
async fn balances_after(
    platform: runtime::server::Platform,
    requests: &[pb::ChargeMailingRequest],
) -> Vec<i64> {
    let wallets =
        credits_wallet::service::Wallets::new(platform, Arc::new(SimulatedGateway::new()));
    wallets
        .spend_together(requests.iter().map(send).collect())
        .await
        .iter()
        .map(|a| pb::MailingCharge::decode(a.as_ref().unwrap().as_slice()).unwrap())
        .map(|c| c.balance_after)
        .collect()
}

fn code(r: &Result<Vec<u8>, Status>) -> Code {
    r.as_ref().map_or_else(Status::code, |_| Code::Ok)
}

#[tokio::test]
async fn a_batch_answers_every_kind_of_send_as_it_would_alone() {
    let h = Harness::start().await;
    h.open("a", "1", 0).await;
    h.grant("a", 100).await;
    h.open("od", "1", 0).await;
    on_demand(&h, "od", "pm_card_ok").await;
    // A charge answered before the batch: its key replays inside the batch.
    let earlier = charge("batch-earlier", "a", "m0", 5);
    let first = h
        .client
        .clone()
        .charge_mailing(authed(ADMIN_TOKEN, earlier.clone()))
        .await
        .unwrap()
        .into_inner();

    let requests = [
        charge("batch-1", "a", "m1", 30), // paid from the balance: 95 - 30 = 65 left
        charge("batch-2", "a", "m2", 70), // sees batch-1's debit: 65 < 70, refused
        charge("batch-3", "a", "m3", 35), // 65 - 35 = 30 left
        earlier.clone(),                  // replay of the first answer
        charge("batch-earlier", "a", "other", 5), // same key, other request: ALREADY_EXISTS
        charge("batch-4", "nope", "m4", 1), // no such wallet
        charge("batch-5", "od", "m5", 20), // on demand: buys alone, outside the batch
        charge("batch-1", "a", "m1", 30), // a twin inside the batch: replays k-1
    ];
    let gateway = Arc::new(SimulatedGateway::new());
    let wallets =
        credits_wallet::service::Wallets::new(h.running.platform.clone(), gateway.clone());
    let answers: Vec<Result<Vec<u8>, Status>> = wallets
        .spend_together(requests.iter().map(send).collect())
        .await
        .into_iter()
        .map(|r| r.map_err(Status::from))
        .collect();
    let codes: Vec<Code> = answers.iter().map(code).collect();
    assert_eq!(
        codes,
        vec![
            Code::Ok,
            Code::FailedPrecondition,
            Code::Ok,
            Code::Ok,
            Code::AlreadyExists,
            Code::NotFound,
            Code::Ok,
            Code::Ok,
        ]
    );
    let decode =
        |i: usize| pb::MailingCharge::decode(answers[i].as_ref().unwrap().as_slice()).unwrap();
    assert_eq!((decode(0).balance_after, decode(2).balance_after), (65, 30));
    assert_eq!(
        decode(3),
        first,
        "a replay inside a batch is the first answer"
    );
    assert_eq!(
        decode(7),
        decode(0),
        "a twin inside a batch replays the first"
    );
    assert_eq!((decode(6).credits_bought, decode(6).balance_after), (20, 0));

    // Every answer is stored under its key: a retry through gRPC gets the same.
    for (i, r) in requests.iter().enumerate().take(3) {
        let again = h
            .client
            .clone()
            .charge_mailing(authed(ADMIN_TOKEN, r.clone()))
            .await;
        match &answers[i] {
            Ok(bytes) => assert_eq!(
                again.unwrap().into_inner(),
                pb::MailingCharge::decode(bytes.as_slice()).unwrap()
            ),
            Err(e) => {
                let s = again.unwrap_err();
                assert_eq!(s.code(), Code::FailedPrecondition);
                assert_eq!(
                    s.message(),
                    e.message(),
                    "the refusal is replayed as recorded"
                );
            }
        }
    }
    assert_eq!(h.wallet("a").await.balance, 30);
    let mailings: Vec<String> = h
        .ledger("a")
        .await
        .into_iter()
        .filter(|e| e.kind == pb::LedgerEntryKind::Mailing as i32)
        .map(|e| e.reference)
        .collect();
    assert_eq!(mailings, ["mailing:m0", "mailing:m1", "mailing:m3"]);
    h.assert_ledger_balances("a").await;
    h.assert_ledger_balances("od").await;
}

#[tokio::test]
async fn concurrent_sends_on_one_wallet_share_transactions_and_lose_nothing() {
    let h = Harness::start().await;
    h.open("hot", "1", 0).await;
    h.grant("hot", 1_000).await;
    let calls = 96;
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let mut client = h.client.clone();
            let r = charge(&format!("hot-{i}"), "hot", &format!("m{i}"), 10);
            tokio::spawn(async move { client.charge_mailing(authed(ADMIN_TOKEN, r)).await })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::FailedPrecondition => refused += 1,
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!((ok, refused), (100.min(calls), calls - 100.min(calls)));
    let metrics = &h.running.platform.metrics;
    let batches = metrics.group_commit_batches.get();
    let sends = metrics.group_commit_mutations.get();
    assert_eq!(sends, calls as u64, "every send was answered by a batch");
    assert!(
        batches < sends,
        "{sends} concurrent sends took {batches} transactions: none shared"
    );
    assert_eq!(h.wallet("hot").await.balance, 1_000 - 10 * ok as i64);
    h.assert_ledger_balances("hot").await;
}

#[tokio::test]
async fn concurrent_captures_of_one_hold_capture_it_once_and_holds_balance() {
    let h = Harness::start().await;
    h.open("w", "1", 0).await;
    h.grant("w", 1_000).await;
    let reserve = |key: String, mailing: &str| pb::ReserveCreditsRequest {
        idempotency_key: key,
        wallet_id: "w".into(),
        mailing_id: mailing.into(),
        recipients: 30,
        ttl_seconds: 0,
    };
    let hold = h
        .client
        .clone()
        .reserve_credits(authed(ADMIN_TOKEN, reserve("hold-once".into(), "m0")))
        .await
        .unwrap()
        .into_inner();

    // 16 captures of the same hold under different keys, at once: one captures it.
    let captures: Vec<_> = (0..16)
        .map(|i| {
            let mut client = h.client.clone();
            let r = pb::CaptureReservationRequest {
                idempotency_key: format!("capture-{i}"),
                wallet_id: "w".into(),
                reservation_id: hold.reservation_id.clone(),
                recipients_sent: 20,
            };
            tokio::spawn(async move { client.capture_reservation(authed(ADMIN_TOKEN, r)).await })
        })
        .collect();
    let mut captured = 0;
    for t in captures {
        match t.await.unwrap() {
            Ok(r) => {
                captured += 1;
                assert_eq!(r.into_inner().captured_credits, 20);
            }
            Err(s) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                assert!(
                    s.message().contains("captured, not active"),
                    "{}",
                    s.message()
                );
            }
        }
    }
    assert_eq!(captured, 1, "a hold is captured once");
    assert_eq!(
        h.running.platform.metrics.group_commit_alone.get(),
        0,
        "no batch failed (a second capture in one batch is refused, not left to the invariant)"
    );

    // 32 senders reserve then capture at once: every hold is released into its debit.
    let pairs: Vec<_> = (0..32)
        .map(|i| {
            let mut client = h.client.clone();
            let r = reserve(format!("pair-r-{i}"), &format!("m{i}"));
            tokio::spawn(async move {
                let held = client
                    .reserve_credits(authed(ADMIN_TOKEN, r))
                    .await?
                    .into_inner();
                client
                    .capture_reservation(authed(
                        ADMIN_TOKEN,
                        pb::CaptureReservationRequest {
                            idempotency_key: format!("pair-c-{i}"),
                            wallet_id: "w".into(),
                            reservation_id: held.reservation_id,
                            recipients_sent: 25,
                        },
                    ))
                    .await
            })
        })
        .collect();
    for t in pairs {
        assert_eq!(t.await.unwrap().unwrap().into_inner().captured_credits, 25);
    }
    let w = h.wallet("w").await;
    assert_eq!((w.balance, w.held), (1_000 - 20 - 32 * 25, 0));
    h.assert_ledger_balances("w").await;
}

/// A batch reads the month's automatic purchases only of wallets with automatic top-up on, and
/// counts them against the monthly cap as a send alone would: no second purchase past it.
#[tokio::test]
async fn a_batch_counts_the_months_automatic_purchases_against_the_cap() {
    let h = Harness::start().await;
    h.open("plain", "1", 0).await;
    h.grant("plain", 100).await;
    h.open("capped", "1", 0).await;
    h.grant("capped", 100).await;
    let top_up = pb::AutoTopUp {
        mode: pb::AutoTopUpMode::Fixed as i32,
        threshold: 50,
        amount: 500,
        monthly_cap: 500,
        ..Default::default()
    };
    h.auto_top_up("capped", top_up, "pm_card_ok").await;
    // 40 left, at most 50: this month's one purchase of 500.
    h.charge("capped", "m0", 60).await.unwrap();
    h.wait_for("capped", |w| w.balance == 540).await;

    let requests = [
        charge("cap-1", "plain", "m1", 30),
        charge("cap-2", "capped", "m2", 500), // 40 left again, and the cap is reached
    ];
    assert_eq!(
        balances_after(h.running.platform.clone(), &requests).await,
        [70, 40]
    );
    let capped = h.wallet("capped").await;
    assert_eq!(
        (capped.balance, capped.auto_top_up_bought_this_month),
        (40, 500),
        "no purchase past the monthly cap"
    );
    h.assert_ledger_balances("capped").await;
}

/// A batch reads the lapsed holds only of wallets that hold credits, and lets them go before
/// its sends, as a send alone does. The batch runs on a clock two minutes ahead of the
/// service's, so that the service's own sweep has not lapsed the hold first.
#[tokio::test]
async fn a_batch_lets_lapsed_holds_go_before_its_sends() {
    let h = Harness::start().await;
    h.open("held", "1", 0).await;
    h.grant("held", 100).await;
    h.open("plain", "1", 0).await;
    h.grant("plain", 100).await;
    let hold = h.reserve("held", "m0", 80, 60).await.unwrap();

    let mut later = h.running.platform.clone();
    later.clock = runtime::clock::ServiceClock::test(
        h.running.platform.clock.now() + chrono::Duration::minutes(2),
    );
    let requests = [
        charge("lapse-1", "plain", "m1", 30),
        charge("lapse-2", "held", "m2", 90), // only if the 80 held are free again
    ];
    assert_eq!(balances_after(later, &requests).await, [70, 10]);
    let held = h.wallet("held").await;
    assert_eq!((held.balance, held.held), (10, 0));
    let expired = h.events_of("wallet.reservation_expired", 1).await;
    assert_eq!(expired.len(), 1);
    assert!(
        expired[0].payload_json.contains(&hold.reservation_id),
        "the hold lapsed"
    );
    h.assert_ledger_balances("held").await;
}
