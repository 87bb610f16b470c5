//! Holds: reserve when a mailing is scheduled, capture what was sent, release the rest; holds
//! lapse on their own.

use proto::wallet::v1 as pb;
use runtime::testing::{ADMIN_TOKEN, authed};
use tonic::Code;

use crate::Harness;

async fn reserve(h: &Harness, recipients: u64, ttl: u32) -> Result<pb::Reservation, tonic::Status> {
    h.reserve("w1", "m1", recipients, ttl).await
}

#[tokio::test]
async fn a_hold_protects_credits_and_capture_debits_what_was_sent() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    let r = reserve(&h, 2_000, 0).await.unwrap();
    assert_eq!(r.status, pb::ReservationStatus::Active as i32);
    let w = h.wallet("w1").await;
    assert_eq!((w.balance, w.held, w.available), (3_000, 2_000, 1_000));
    // Held credits cannot be spent by another send.
    let err = h.charge("w1", "other", 1_500).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let captured = h
        .client
        .clone()
        .capture_reservation(authed(
            ADMIN_TOKEN,
            pb::CaptureReservationRequest {
                idempotency_key: h.key(),
                wallet_id: "w1".into(),
                reservation_id: r.reservation_id.clone(),
                recipients_sent: 1_800,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(captured.status, pb::ReservationStatus::Captured as i32);
    assert_eq!(captured.captured_credits, 1_800);
    let w = h.wallet("w1").await;
    assert_eq!((w.balance, w.held, w.available), (1_200, 0, 1_200));
    let again = h
        .client
        .clone()
        .release_reservation(authed(
            ADMIN_TOKEN,
            pb::ReleaseReservationRequest {
                idempotency_key: h.key(),
                wallet_id: "w1".into(),
                reservation_id: r.reservation_id,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    h.assert_ledger_balances("w1").await;
}

#[tokio::test]
async fn a_released_hold_gives_everything_back() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    let r = reserve(&h, 2_000, 0).await.unwrap();
    let released = h
        .client
        .clone()
        .release_reservation(authed(
            ADMIN_TOKEN,
            pb::ReleaseReservationRequest {
                idempotency_key: h.key(),
                wallet_id: "w1".into(),
                reservation_id: r.reservation_id,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.status, pb::ReservationStatus::Released as i32);
    let w = h.wallet("w1").await;
    assert_eq!((w.balance, w.held, w.available), (3_000, 0, 3_000));
}

#[tokio::test]
async fn a_hold_lapses_on_its_own_at_its_expiry() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    let r = reserve(&h, 2_000, 3_600).await.unwrap();
    h.advance(3_601).await;
    let w = h.wait_for("w1", |w| w.held == 0).await;
    assert_eq!(w.available, 3_000);
    let lapsed = h.events_of("wallet.reservation_expired", 1).await;
    assert_eq!(lapsed.len(), 1);
    assert!(lapsed[0].payload_json.contains(&r.reservation_id));
    let err = h
        .client
        .clone()
        .capture_reservation(authed(
            ADMIN_TOKEN,
            pb::CaptureReservationRequest {
                idempotency_key: h.key(),
                wallet_id: "w1".into(),
                reservation_id: r.reservation_id,
                recipients_sent: 10,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("expired"), "{}", err.message());
}

#[tokio::test]
async fn a_hold_beyond_the_available_balance_is_refused() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 1_000).await;
    let err = reserve(&h, 2_000, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("short by 1000"), "{}", err.message());
    assert_eq!(h.wallet("w1").await.held, 0);
}

#[tokio::test]
async fn a_transfer_moves_credits_between_wallets_atomically_keeping_their_expiry() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.open("w2", "1", 0).await;
    let expires = h.running.platform.clock.now() + chrono::Duration::days(10);
    h.client
        .clone()
        .grant_credits(authed(
            ADMIN_TOKEN,
            pb::GrantCreditsRequest {
                idempotency_key: h.key(),
                wallet_id: "w1".into(),
                credits: 1_000,
                kind: pb::LotKind::Promotional as i32,
                expires_at: Some(runtime::convert::timestamp(expires)),
                reference: String::new(),
            },
        ))
        .await
        .unwrap();
    let transfer = |credits| pb::TransferCreditsRequest {
        idempotency_key: format!("t-{credits}"),
        from_wallet_id: "w1".into(),
        to_wallet_id: "w2".into(),
        credits,
        reason: "allocation".into(),
    };
    let mut c = h.client.clone();
    let t = c
        .transfer_credits(authed(ADMIN_TOKEN, transfer(400)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.from_wallet.unwrap().balance, 600);
    let to = t.to_wallet.unwrap();
    assert_eq!(to.balance, 400);
    assert_eq!(
        to.lots[0].expires_at.as_ref().unwrap().seconds,
        expires.timestamp()
    );
    let err = c
        .transfer_credits(authed(ADMIN_TOKEN, transfer(700)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(h.wallet("w1").await.balance, 600);
    assert_eq!(h.wallet("w2").await.balance, 400);
    h.assert_ledger_balances("w1").await;
    h.assert_ledger_balances("w2").await;
}
