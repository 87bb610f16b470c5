//! Two replicas of the service on one database, each with its own jobs: invoice numbers stay
//! consecutive, and every period is renewed and invoiced once.

use futures::future::join_all;
use proto::subscription::v1 as pb;

use crate::{Harness, bank, card, plan_spec, utc};

#[tokio::test]
async fn two_replicas_on_one_database_number_invoices_without_gaps_and_renew_each_period_once() {
    let a = Harness::start().await;
    let b = Harness::start_on(a.db.share()).await;
    a.publish(plan_spec("email")).await;
    let accounts: Vec<String> = (0..12).map(|i| format!("acct-{i}")).collect();
    // Concurrent subscribes, alternating replicas and payment kinds.
    let calls = accounts.iter().enumerate().map(|(i, account)| {
        let replica = if i % 2 == 0 { &a } else { &b };
        let payment = if i % 3 == 0 {
            bank()
        } else {
            card("pm_card_ok")
        };
        async move { replica.subscribe(account, "email", 1_000, payment).await }
    });
    let results = join_all(calls).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    // Both replicas' jobs see every period end at once.
    let to = utc(2026, 2, 1);
    futures::join!(a.advance_to(to), b.advance_to(to));
    for account in &accounts {
        a.wait_invoices(account, |i| i.len() == 2).await;
    }
    // Let both replicas' jobs run again and again.
    for _ in 0..3 {
        let later = a.now() + chrono::Duration::hours(1);
        futures::join!(a.advance_to(later), b.advance_to(later));
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    }
    let mut numbers = Vec::new();
    for account in &accounts {
        let inv = b.invoices(account).await;
        assert_eq!(inv.len(), 2, "{account}: one renewal, not two: {inv:?}");
        assert_eq!(inv[1].kind, "renewal");
        numbers.extend(inv.iter().map(|i| i.number));
        let s = a.get(account).await;
        assert_eq!(
            s.current_period_end.unwrap().seconds,
            utc(2026, 3, 1).timestamp()
        );
        assert_eq!(
            s.history.iter().filter(|e| e.action == "renewed").count(),
            1
        );
    }
    numbers.sort();
    assert_eq!(
        numbers,
        (1..=24).collect::<Vec<u64>>(),
        "consecutive, no gap, no repeat"
    );
    // Card renewals are collected once, by whichever replica got there first.
    for (i, account) in accounts.iter().enumerate() {
        if i % 3 != 0 {
            let inv = a
                .wait_invoices(account, |inv| {
                    inv[1].status == pb::InvoiceStatus::Paid as i32
                })
                .await;
            assert_eq!(inv[1].payment_attempts, 1);
        }
    }
    assert_eq!(a.events_of("subscription.renewed", 12).await.len(), 12);
    // 8 card subscribes paid by their call, then their 8 renewals.
    assert_eq!(b.events_of("subscription.invoice_paid", 16).await.len(), 16);
}
