//! Every mutation is idempotent; a gateway timeout never grants twice nor loses a payment.

use proto::wallet::v1 as pb;
use runtime::testing::{ADMIN_TOKEN, authed};
use tonic::Code;

use crate::Harness;

fn charge(key: &str, recipients: u64) -> pb::ChargeMailingRequest {
    pb::ChargeMailingRequest {
        idempotency_key: key.into(),
        wallet_id: "w1".into(),
        mailing_id: "m1".into(),
        recipients,
    }
}

#[tokio::test]
async fn a_retried_charge_returns_the_first_result_and_debits_once() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    let mut c = h.client.clone();
    let first = c
        .charge_mailing(authed(ADMIN_TOKEN, charge("same", 1_000)))
        .await
        .unwrap()
        .into_inner();
    let retry = c
        .charge_mailing(authed(ADMIN_TOKEN, charge("same", 1_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, retry);
    assert_eq!(h.wallet("w1").await.balance, 2_000);
    let changed = c
        .charge_mailing(authed(ADMIN_TOKEN, charge("same", 999)))
        .await
        .unwrap_err();
    assert_eq!(changed.code(), Code::AlreadyExists);
    assert_eq!(h.wallet("w1").await.balance, 2_000);
}

#[tokio::test]
async fn a_refusal_is_replayed_to_a_retry_with_the_same_key() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    h.grant("w1", 100).await;
    let mut c = h.client.clone();
    let first = c
        .charge_mailing(authed(ADMIN_TOKEN, charge("k", 500)))
        .await
        .unwrap_err();
    h.grant("w1", 1_000).await;
    let retry = c
        .charge_mailing(authed(ADMIN_TOKEN, charge("k", 500)))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::FailedPrecondition);
    assert_eq!(
        (retry.code(), retry.message()),
        (first.code(), first.message())
    );
    assert_eq!(h.wallet("w1").await.balance, 1_100);
}

#[tokio::test]
async fn open_wallet_is_idempotent_and_a_taken_id_is_refused() {
    let h = Harness::start().await;
    let req = || pb::OpenWalletRequest {
        idempotency_key: "open-1".into(),
        wallet_id: "w1".into(),
        currency: "EUR".into(),
        pricing: Some(crate::standard_pricing()),
        rating: Some(pb::RatingRule {
            credits_per_recipient: "1".into(),
            per_mailing_surcharge: 0,
        }),
        signup_credits: 500,
        signup_credits_expire_at: None,
    };
    let mut c = h.client.clone();
    let a = c
        .open_wallet(authed(ADMIN_TOKEN, req()))
        .await
        .unwrap()
        .into_inner();
    let b = c
        .open_wallet(authed(ADMIN_TOKEN, req()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a, b);
    assert_eq!(
        h.wallet("w1").await.balance,
        500,
        "signup credits granted once"
    );
    let mut other = req();
    other.idempotency_key = "open-2".into();
    let err = c.open_wallet(authed(ADMIN_TOKEN, other)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn a_gateway_timeout_is_reconciled_by_a_retry_without_charging_or_granting_twice() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    let req = || pb::PurchaseCreditsRequest {
        idempotency_key: "buy-1".into(),
        wallet_id: "w1".into(),
        credits: 1_000,
        payment_method: "pm_card_timeout".into(),
        expires_at: None,
        expected_amount: None,
    };
    let mut c = h.client.clone();
    let first = c
        .purchase_credits(authed(ADMIN_TOKEN, req()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        first.status == pb::PurchaseStatus::Processing as i32
            || first.status == pb::PurchaseStatus::Succeeded as i32,
        "{first:?}"
    );
    let retry = c
        .purchase_credits(authed(ADMIN_TOKEN, req()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.status, pb::PurchaseStatus::Succeeded as i32);
    assert_eq!(retry.purchase_id, first.purchase_id);
    let again = c
        .purchase_credits(authed(ADMIN_TOKEN, req()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, retry);
    assert_eq!(h.wallet("w1").await.balance, 1_000, "granted exactly once");
    h.assert_ledger_balances("w1").await;
}

#[tokio::test]
async fn a_gateway_timeout_is_reconciled_in_the_background_when_nobody_retries() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    // The answer is PROCESSING unless the reconciler raced the request to the gateway.
    let p = h.purchase("w1", 2_000, "pm_card_timeout").await;
    assert_ne!(p.status, pb::PurchaseStatus::Failed as i32);
    let w = h.wait_for("w1", |w| w.balance == 2_000).await;
    assert_eq!(w.available, 2_000);
    // And the charge that timed out, when retried, does not buy again.
    let timeout_send = || pb::ChargeMailingRequest {
        idempotency_key: "send-1".into(),
        wallet_id: "w1".into(),
        mailing_id: "m1".into(),
        recipients: 3_000,
    };
    h.auto_top_up(
        "w1",
        pb::AutoTopUp {
            mode: pb::AutoTopUpMode::Shortfall as i32,
            max_per_purchase: 5_000,
            ..Default::default()
        },
        "pm_card_timeout",
    )
    .await;
    let mut c = h.client.clone();
    let first = c.charge_mailing(authed(ADMIN_TOKEN, timeout_send())).await;
    let charge = match first {
        Ok(charge) => charge.into_inner(),
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            c.charge_mailing(authed(ADMIN_TOKEN, timeout_send()))
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(charge.credits_bought, 1_000);
    assert_eq!(h.wallet("w1").await.balance, 0);
    h.assert_ledger_balances("w1").await;
}

/// A gateway whose first charge is answered only when the test says so (the request is still
/// paying), every later one at once; it counts the charges it is asked for.
struct HeldGateway {
    charges: std::sync::Mutex<Vec<String>>,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[tonic::async_trait]
impl shared::PaymentGateway for HeldGateway {
    async fn charge(
        &self,
        request: &shared::ChargeRequest,
    ) -> Result<shared::ChargeOutcome, shared::GatewayError> {
        let first = {
            let mut charges = self.charges.lock().unwrap();
            charges.push(request.idempotency_key.clone());
            charges.len() == 1
        };
        if first {
            self.entered.notify_one();
            self.release.notified().await;
        }
        Ok(shared::ChargeOutcome::Succeeded {
            charge_id: format!("ch_{}", request.idempotency_key),
        })
    }

    async fn charge_status(
        &self,
        _idempotency_key: &str,
    ) -> Result<Option<shared::ChargeRecord>, shared::GatewayError> {
        Ok(None)
    }
}

// rule C1: a card purchase still being paid by its request is left to that request: the
// reconciler does not ask the gateway again meanwhile (a provider that ignored the purchase's
// idempotency key, as localstripe does, would charge twice).
#[tokio::test]
async fn the_reconciler_leaves_a_purchase_to_the_request_still_paying_it() {
    let h = Harness::start().await;
    h.open("w1", "1", 0).await;
    let gateway = std::sync::Arc::new(HeldGateway {
        charges: std::sync::Mutex::default(),
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let wallets =
        credits_wallet::service::Wallets::new(h.running.platform.clone(), gateway.clone());
    let request = pb::PurchaseCreditsRequest {
        idempotency_key: "buy-held".into(),
        wallet_id: "w1".into(),
        credits: 1_000,
        // The service's own reconciler (the simulator behind it) finishes nothing of this
        // purchase while the test runs: its first call for a key times out.
        payment_method: "pm_card_timeout".into(),
        expires_at: None,
        expected_amount: None,
    };
    let key = runtime::idempotency::IdempotencyKey::new(
        "PurchaseCredits",
        &request.idempotency_key,
        &request,
    )
    .unwrap();
    let buying = tokio::spawn({
        let wallets = wallets.clone();
        async move {
            wallets
                .purchase(&key, "w1", 1_000, "pm_card_timeout", None, None)
                .await
        }
    });
    // The request is at the gateway now, its purchase `processing`.
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        gateway.entered.notified(),
    )
    .await
    .expect("the request never reached the gateway");
    let purchase_id = gateway.charges.lock().unwrap()[0].clone();
    wallets.reconcile_purchase(&purchase_id).await.unwrap();
    assert_eq!(
        gateway.charges.lock().unwrap().len(),
        1,
        "the reconciler charged a purchase its request was still paying"
    );
    gateway.release.notify_one();
    let bought = buying.await.unwrap().unwrap().into_message();
    assert_eq!(bought.purchase_id, purchase_id);
    assert_eq!(bought.status, pb::PurchaseStatus::Succeeded as i32);
    assert_eq!(gateway.charges.lock().unwrap().len(), 1, "charged once");
    assert_eq!(h.wallet("w1").await.balance, 1_000);
    h.assert_ledger_balances("w1").await;
}
