//! Group commit (issue 7): routed sends arriving together share transactions, and a customer's
//! cap still holds send by send inside a batch.

use proto::reseller::v1::{self as pb, BillingMode, PartnerFunding};
use runtime::testing::{ADMIN_TOKEN, authed};
use tonic::Code;

use crate::Harness;

#[tokio::test]
async fn concurrent_sends_share_transactions_and_a_cap_holds_inside_a_batch() {
    let h = Harness::start().await;
    h.register("p1", "1", PartnerFunding::Prepaid, "").await;
    h.buy("partner:p1", 50_000).await;
    for c in ["capped", "c2", "c3", "c4", "c5"] {
        h.add("p1", c, BillingMode::PartnerPays).await;
    }
    h.client
        .clone()
        .set_customer_limit(authed(
            ADMIN_TOKEN,
            pb::SetCustomerLimitRequest {
                idempotency_key: h.key(),
                partner_id: "p1".into(),
                customer_id: "capped".into(),
                monthly_credit_limit: 500,
            },
        ))
        .await
        .unwrap();

    // 40 sends of 50 credits for the capped customer (room for 10) and 40 of 10 credits over
    // four uncapped customers, all at once.
    let requests: Vec<pb::ChargeMailingRequest> = (0..80)
        .map(|i| {
            let (customer, recipients) = if i % 2 == 0 {
                ("capped".to_string(), 50)
            } else {
                (format!("c{}", 2 + (i / 2) % 4), 10)
            };
            pb::ChargeMailingRequest {
                idempotency_key: format!("send-{i}"),
                partner_id: "p1".into(),
                customer_id: customer,
                mailing_id: format!("m{i}"),
                recipients,
            }
        })
        .collect();
    let tasks: Vec<_> = requests
        .iter()
        .cloned()
        .map(|r| {
            let mut client = h.client.clone();
            tokio::spawn(async move { client.charge_mailing(authed(ADMIN_TOKEN, r)).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let capped_ok = (0..80).step_by(2).filter(|&i| answers[i].is_ok()).count();
    assert_eq!(
        capped_ok, 10,
        "the cap of 500 credits admits exactly 10 sends of 50"
    );
    for i in (0..80).step_by(2) {
        if let Err(s) = &answers[i] {
            assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
            assert!(s.message().contains("limit"), "{}", s.message());
        }
    }
    assert!(
        (1..80).step_by(2).all(|i| answers[i].is_ok()),
        "uncapped customers are never refused"
    );
    assert_eq!(
        h.balance("partner:p1").await,
        50_000 - 10 * 50 - 40 * 10,
        "the partner paid exactly the sends that went through"
    );
    assert_eq!(
        h.events_of("reseller.customer_limit_reached", 30)
            .await
            .len(),
        30
    );

    // Every answer, success or refusal, replays under its key.
    for (r, first) in requests.iter().zip(&answers).take(12) {
        let again = h
            .client
            .clone()
            .charge_mailing(authed(ADMIN_TOKEN, r.clone()))
            .await;
        match (first, again) {
            (Ok(a), Ok(b)) => assert_eq!(a.get_ref(), b.get_ref()),
            (Err(a), Err(b)) => assert_eq!((a.code(), a.message()), (b.code(), b.message())),
            (a, b) => panic!("replay differs: {a:?} then {b:?}"),
        }
    }
    assert_eq!(h.balance("partner:p1").await, 50_000 - 10 * 50 - 40 * 10);

    let metrics = &h.reseller.platform.metrics;
    let (batches, steps) = (
        metrics.group_commit_batches.get(),
        metrics.group_commit_mutations.get(),
    );
    assert!(
        steps >= 80 && batches < steps,
        "{steps} steps of 80 concurrent sends took {batches} transactions: none shared"
    );
}
