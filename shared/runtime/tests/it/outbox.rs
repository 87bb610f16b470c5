use std::sync::Arc;

use futures::{StreamExt, future::join_all};
use proto::common::v1::WatchEventsRequest;
use runtime::{
    clock::ServiceClock,
    metrics::Metrics,
    outbox::{self, Outbox},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::fresh_db;

#[tokio::test]
async fn events_commit_with_their_change_and_stream_in_order_from_a_cursor() {
    let (db, _t) = fresh_db().await;
    let clock = ServiceClock::test(chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap());
    let outbox = Outbox::new(db.clone(), clock, Metrics::new("test"));

    let mut tx = db.begin_write().await.unwrap();
    for i in 0..3 {
        outbox::append(
            &mut tx,
            "thing.happened",
            &format!("s{i}"),
            &json!({"i": i}),
            1,
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    // A rolled-back change leaves no event.
    let mut tx = db.begin_write().await.unwrap();
    outbox::append(&mut tx, "thing.happened", "ghost", &json!({}), 1)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = db.begin_write().await.unwrap();
    outbox::append(&mut tx, "other.happened", "s3", &json!({"i": 3}), 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    assert_eq!(outbox.relay_once().await.unwrap(), 4);
    assert_eq!(
        outbox.relay_once().await.unwrap(),
        0,
        "nothing numbered twice"
    );

    let shutdown = CancellationToken::new();
    let all: Vec<_> = outbox
        .watch(WatchEventsRequest::default(), shutdown.clone())
        .take(4)
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(
        all.iter().map(|e| e.cursor).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(all[0].subject, "s0");
    assert_eq!(all[3].r#type, "other.happened");
    assert!(all.iter().all(|e| e.subject != "ghost"));

    // Resume after cursor 2, only one type.
    let resumed: Vec<_> = outbox
        .watch(
            WatchEventsRequest {
                after_cursor: 2,
                types: vec!["thing.happened".into()],
            },
            shutdown.clone(),
        )
        .take(1)
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(resumed[0].cursor, 3);
    assert_eq!(resumed[0].subject, "s2");

    // One subject only: the others are skipped.
    let own: Vec<_> = outbox
        .watch_subject(
            WatchEventsRequest::default(),
            Some("s1".into()),
            shutdown.clone(),
        )
        .take(1)
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!((own[0].cursor, own[0].subject.as_str()), (2, "s1"));
    shutdown.cancel();
}

#[tokio::test]
async fn a_watcher_receives_events_committed_after_it_started() {
    let (db, _t) = fresh_db().await;
    let outbox = Outbox::new(db.clone(), ServiceClock::system(), Metrics::new("test"));
    let shutdown = CancellationToken::new();
    let relay = outbox.spawn_relay(shutdown.clone());
    let mut stream = outbox.watch(WatchEventsRequest::default(), shutdown.clone());
    let mut tx = db.begin_write().await.unwrap();
    outbox::append(&mut tx, "late", "x", &json!({}), 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    outbox.poke();
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.r#type, "late");
    shutdown.cancel();
    relay.await.unwrap();
}

/// Many writers at once, two relays racing (as two replicas would): every event gets exactly
/// one cursor and the cursors are 1..=N without a gap.
#[tokio::test]
async fn concurrent_writers_and_relays_give_gapless_unique_cursors() {
    let (db, _t) = fresh_db().await;
    let metrics = Metrics::new("test");
    let a = Outbox::new(db.clone(), ServiceClock::system(), Arc::clone(&metrics));
    let b = Outbox::new(db.clone(), ServiceClock::system(), metrics);
    let writers = (0..50).map(|i| {
        let db = db.clone();
        tokio::spawn(async move {
            let mut tx = db.begin_write().await.unwrap();
            outbox::append(&mut tx, "w", &i.to_string(), &json!({}), 1)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        })
    });
    let relays = (0..6).map(|i| {
        let o = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move { o.relay_once().await.unwrap() })
    });
    let (w, r) = futures::join!(join_all(writers), join_all(relays));
    w.into_iter().for_each(|x| x.unwrap());
    let mut numbered: u64 = r.into_iter().map(|x| x.unwrap()).sum();
    numbered += a.relay_once().await.unwrap();
    assert_eq!(numbered, 50);
    let shutdown = CancellationToken::new();
    let cursors: Vec<u64> = a
        .watch(WatchEventsRequest::default(), shutdown.clone())
        .take(50)
        .map(|e| e.unwrap().cursor)
        .collect()
        .await;
    assert_eq!(cursors, (1..=50).collect::<Vec<u64>>());
    shutdown.cancel();
}
