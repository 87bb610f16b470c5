use proto::common::v1::{Money, WatchEventsRequest};
use runtime::idempotency::{Claimed, IdempotencyError, IdempotencyKey};
use tonic::{Code, Status};

use crate::fresh_db;

fn request(amount: &str) -> Money {
    Money {
        amount: amount.into(),
        currency: "EUR".into(),
    }
}

#[tokio::test]
async fn a_retry_replays_the_first_response_and_a_changed_request_is_refused() {
    let (db, _t) = fresh_db().await;
    let key = IdempotencyKey::new("Charge", "key-1", &request("10.00")).unwrap();

    let mut tx = db.begin_write().await.unwrap();
    assert!(matches!(
        key.claim::<WatchEventsRequest>(&mut tx).await.unwrap(),
        Claimed::New
    ));
    let response = WatchEventsRequest {
        after_cursor: 7,
        types: vec![],
    };
    key.record(&mut tx, &response, 1).await.unwrap();
    tx.commit().await.unwrap();

    let mut tx = db.begin_write().await.unwrap();
    match key.claim::<WatchEventsRequest>(&mut tx).await.unwrap() {
        Claimed::Replay(Ok(r)) => assert_eq!(r, response),
        other => panic!("expected a replay, got {other:?}"),
    }
    let changed = IdempotencyKey::new("Charge", "key-1", &request("11.00")).unwrap();
    let err = changed
        .claim::<WatchEventsRequest>(&mut tx)
        .await
        .unwrap_err();
    assert!(matches!(err, IdempotencyError::Mismatch { .. }));
    assert_eq!(Status::from(err).code(), Code::AlreadyExists);
    let other_op = IdempotencyKey::new("Refund", "key-1", &request("10.00")).unwrap();
    assert!(other_op.claim::<WatchEventsRequest>(&mut tx).await.is_err());
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_stored_refusal_is_replayed() {
    let (db, _t) = fresh_db().await;
    let key = IdempotencyKey::new("Charge", "key-2", &request("10.00")).unwrap();
    let refusal = Status::failed_precondition("insufficient credits: short by 5");
    let mut tx = db.begin_write().await.unwrap();
    key.record_status(&mut tx, &refusal, 1).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = db.begin_write().await.unwrap();
    match key.claim::<WatchEventsRequest>(&mut tx).await.unwrap() {
        Claimed::Replay(Err(s)) => {
            assert_eq!(s.code(), Code::FailedPrecondition);
            assert_eq!(s.message(), refusal.message());
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn keys_must_be_present_and_printable() {
    for bad in ["", "has space", &"k".repeat(256)] {
        let err = IdempotencyKey::new("Charge", bad, &request("1")).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
    }
}

#[tokio::test]
async fn old_keys_are_swept_after_retention() {
    let (db, _t) = fresh_db().await;
    let key = IdempotencyKey::new("Charge", "old", &request("1")).unwrap();
    let mut tx = db.begin_write().await.unwrap();
    key.record(&mut tx, &request("1"), 100).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(runtime::idempotency::sweep(&db, 50).await.unwrap(), 0);
    assert_eq!(runtime::idempotency::sweep(&db, 101).await.unwrap(), 1);
}
