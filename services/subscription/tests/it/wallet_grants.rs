//! The plan's monthly credits (C7) when the account's wallet (wallet id = account id) does not
//! exist yet: nothing is lost, the month waits for the wallet and is granted once it is opened.

use proto::wallet::v1::{GetWalletRequest, LotKind};
use runtime::testing::{ADMIN_TOKEN, authed};
use subscription::service::WALLET_WAIT_RETRY_SECONDS;

use crate::{Harness, card, open_wallet, plan_spec};

// rule C7
#[tokio::test]
async fn c7_credits_for_an_account_without_a_wallet_wait_for_it_and_are_granted_once_it_opens() {
    let h = Harness::start_with_wallet().await;
    let (_, wallet) = h.wallet.as_ref().unwrap();
    h.publish(plan_spec("email")).await;
    h.subscribe("a1", "email", 5_000, card("pm_card_ok"))
        .await
        .unwrap();
    // No wallet "a1" yet: the month is not granted, and one event says it waits.
    let waiting = h
        .events_of("subscription.credits_waiting_for_wallet", 1)
        .await;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert!(
        waiting[0].payload_json.contains("\"wallet_id\":\"a1\""),
        "{}",
        waiting[0].payload_json
    );
    assert!(waiting[0].payload_json.contains("\"credits\":1000"));
    // Passes of the jobs later: still waiting, announced once, nothing recorded as granted.
    h.advance(WALLET_WAIT_RETRY_SECONDS + 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(
        h.events_of("subscription.credits_waiting_for_wallet", 1)
            .await
            .len(),
        1
    );
    assert!(
        h.events_of("subscription.credits_granted", 0)
            .await
            .is_empty()
    );

    // The account opens its wallet: the next retry grants the month, expiring at its end.
    open_wallet(wallet, "a1").await;
    h.advance(WALLET_WAIT_RETRY_SECONDS + 1).await;
    let lots = || async {
        wallet
            .clone()
            .get_wallet(authed(
                ADMIN_TOKEN,
                GetWalletRequest {
                    wallet_id: "a1".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .lots
            .into_iter()
            .filter(|l| l.kind == LotKind::SubscriptionAllowance as i32)
            .collect::<Vec<_>>()
    };
    for _ in 0..100 {
        if !lots().await.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let granted = lots().await;
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert_eq!(granted[0].granted, 1_000);
    let period_end = h.get("a1").await.current_period_end.unwrap().seconds;
    assert_eq!(granted[0].expires_at.as_ref().unwrap().seconds, period_end);
    let events = h.events_of("subscription.credits_granted", 1).await;
    assert_eq!(events.len(), 1);

    // Once: the jobs run again and again.
    h.advance(WALLET_WAIT_RETRY_SECONDS + 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(lots().await.len(), 1);
}

// rule C7
#[tokio::test]
async fn c7_without_a_wallet_peer_the_months_credits_wait_until_the_service_runs_with_one() {
    let h = Harness::start().await;
    h.publish(plan_spec("email")).await;
    h.subscribe("a1", "email", 5_000, card("pm_card_ok"))
        .await
        .unwrap();
    let waiting = h
        .events_of("subscription.credits_waiting_for_wallet", 1)
        .await;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    let Harness { running, db, .. } = h;
    running.stop().await.unwrap();

    // The same database, now with a wallet peer whose wallet "a1" exists: the month is granted.
    let h = Harness::start_with_wallet_on(db).await;
    let (_, wallet) = h.wallet.as_ref().unwrap();
    open_wallet(wallet, "a1").await;
    h.advance(WALLET_WAIT_RETRY_SECONDS + 1).await;
    let granted = h.events_of("subscription.credits_granted", 1).await;
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert!(granted[0].payload_json.contains("\"credits\":1000"));
    let lots = wallet
        .clone()
        .get_wallet(authed(
            ADMIN_TOKEN,
            GetWalletRequest {
                wallet_id: "a1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .lots;
    assert!(
        lots.iter()
            .any(|l| l.kind == LotKind::SubscriptionAllowance as i32 && l.granted == 1_000),
        "{lots:?}"
    );
}
