//! Payments through Stripe: the wallet configured with `payment_provider = "stripe"` against a
//! local Stripe (localstripe, see `runtime::testing::localstripe`), the real adapter over HTTP.
//! Skipped with a message when no local Stripe can be had, unless `BILLING_TEST_STRIPE=required`.

use proto::wallet::v1 as pb;
use runtime::{
    stripe::Secret,
    stripe_webhook,
    testing::{ADMIN_TOKEN, TestDatabase, authed, localstripe, stripe_events},
};
use tonic::Code;

use crate::{Harness, rules::on_demand};

async fn stripe_wallet() -> Option<(Harness, String)> {
    let url = localstripe::url()?;
    let h = Harness::start_with(TestDatabase::fresh(), &localstripe::settings(&url)).await;
    Some((h, url))
}

fn customer(token: &str) -> &str {
    token.split(':').next().unwrap_or_default()
}

fn purchase_request(key: &str, credits: u64, method: &str) -> pb::PurchaseCreditsRequest {
    pb::PurchaseCreditsRequest {
        idempotency_key: key.into(),
        wallet_id: "w1".into(),
        credits,
        payment_method: method.into(),
        expires_at: None,
        expected_amount: None,
    }
}

// rule C1
#[tokio::test]
async fn c1_a_purchase_paid_by_card_through_stripe_grants_at_once_and_a_retry_charges_nothing_more()
{
    let Some((h, url)) = stripe_wallet().await else {
        return;
    };
    h.open("w1", "1.05", 500).await;
    let card = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    let request = purchase_request("buy-1", 50_000, &card);
    let p = h
        .client
        .clone()
        .purchase_credits(authed(ADMIN_TOKEN, request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.status, pb::PurchaseStatus::Succeeded as i32, "{p:?}");
    assert_eq!(p.amount.as_ref().unwrap().amount, "420.00");
    assert_eq!(h.wallet("w1").await.balance, 50_500);

    let again = h
        .client
        .clone()
        .purchase_credits(authed(ADMIN_TOKEN, request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, p, "the retry replays the first answer");
    let intents = localstripe::payment_intents_of(&url, customer(&card)).await;
    assert_eq!(intents.len(), 1, "one PaymentIntent: {intents:?}");
    assert_eq!(intents[0]["amount"], 42_000, "minor units of 420.00 EUR");
    assert_eq!(intents[0]["currency"], "eur");
    assert_eq!(intents[0]["status"], "succeeded");
    assert_eq!(
        intents[0]["metadata"]["billing_key"],
        p.purchase_id.as_str()
    );
    assert_eq!(h.wallet("w1").await.balance, 50_500);
    h.assert_ledger_balances("w1").await;
}

// rule C1
#[tokio::test]
async fn c1_a_card_declined_by_stripe_grants_nothing_and_says_why() {
    let Some((h, url)) = stripe_wallet().await else {
        return;
    };
    h.open("w1", "1", 0).await;
    let card = localstripe::customer_with_card(&url, localstripe::CARD_DECLINED).await;
    let p = h.purchase("w1", 1_000, &card).await;
    assert_eq!(p.status, pb::PurchaseStatus::Failed as i32, "{p:?}");
    assert_eq!(p.failure_reason, "the card was declined");
    assert_eq!(h.wallet("w1").await.balance, 0);
    assert_eq!(h.events_of("wallet.purchase_failed", 1).await.len(), 1);
    h.assert_ledger_balances("w1").await;
}

// rule C1: credits bought by direct debit are usable only once paid
#[tokio::test]
async fn c1_a_sepa_debit_through_stripe_is_pending_and_grants_nothing_when_it_fails_later() {
    let Some((h, url)) = stripe_wallet().await else {
        return;
    };
    h.open("w1", "1", 0).await;
    let mandate = localstripe::customer_with_sepa(&url, localstripe::IBAN_FAILS_LATER).await;
    let p = h.purchase("w1", 2_000, &mandate).await;
    assert_eq!(
        p.status,
        pb::PurchaseStatus::PendingSettlement as i32,
        "{p:?}"
    );
    assert_eq!(
        h.wallet("w1").await.balance,
        0,
        "not usable before it is paid"
    );
    // localstripe fails the debit half a second later; the jobs poll the PaymentIntent.
    let returned = h.events_of("wallet.payment_returned", 1).await;
    assert_eq!(returned.len(), 1);
    assert_eq!(h.wallet("w1").await.balance, 0);
    h.assert_ledger_balances("w1").await;
}

// rule C9
#[tokio::test]
async fn c9_on_demand_sends_are_charged_through_stripe_and_a_debit_returned_later_is_clawed_back() {
    let Some((h, url)) = stripe_wallet().await else {
        return;
    };
    h.open("w1", "1.05", 0).await;
    let card = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    on_demand(&h, "w1", &card).await;
    let charge = h.charge("w1", "m1", 5_000).await.unwrap();
    assert_eq!((charge.credits, charge.credits_bought), (5_250, 5_250));
    let purchase = charge.purchase.unwrap();
    assert_eq!(purchase.status, pb::PurchaseStatus::Succeeded as i32);
    let intents = localstripe::payment_intents_of(&url, customer(&card)).await;
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0]["amount"], 5_250, "5,250 credits at 0.010 EUR");
    assert_eq!(h.wallet("w1").await.balance, 0);

    let mandate = localstripe::customer_with_sepa(&url, localstripe::IBAN_FAILS_LATER).await;
    on_demand(&h, "w1", &mandate).await;
    let charge = h.charge("w1", "m2", 1_000).await.unwrap();
    assert_eq!(
        charge.purchase.unwrap().status,
        pb::PurchaseStatus::PendingSettlement as i32
    );
    let w = h.wait_for("w1", |w| w.debt == 1_050).await;
    assert_eq!(w.balance, -1_050);
    assert_eq!(h.events_of("wallet.payment_returned", 1).await.len(), 1);
    h.assert_ledger_balances("w1").await;
}

// rule C5
#[tokio::test]
async fn c5_a_shortfall_top_up_is_charged_through_stripe_for_exactly_what_is_missing() {
    let Some((h, url)) = stripe_wallet().await else {
        return;
    };
    h.open("w1", "1", 0).await;
    h.grant("w1", 3_000).await;
    let card = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    h.auto_top_up(
        "w1",
        pb::AutoTopUp {
            mode: pb::AutoTopUpMode::Shortfall as i32,
            max_per_purchase: 10_000,
            monthly_cap: 0,
            ..Default::default()
        },
        &card,
    )
    .await;
    let charge = h.charge("w1", "m1", 5_000).await.unwrap();
    assert_eq!((charge.credits, charge.credits_bought), (5_000, 2_000));
    let purchase = charge.purchase.unwrap();
    assert_eq!(purchase.trigger, pb::PurchaseTrigger::AutoShortfall as i32);
    assert_eq!(purchase.amount.unwrap().amount, "20.00");
    let intents = localstripe::payment_intents_of(&url, customer(&card)).await;
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0]["amount"], 2_000);
    assert_eq!(
        intents[0]["metadata"]["billing_key"],
        purchase.purchase_id.as_str()
    );
    assert_eq!(h.wallet("w1").await.balance, 0);

    // A declined card buys nothing and the send is refused.
    let declined = localstripe::customer_with_card(&url, localstripe::CARD_DECLINED).await;
    h.auto_top_up(
        "w1",
        pb::AutoTopUp {
            mode: pb::AutoTopUpMode::Shortfall as i32,
            max_per_purchase: 10_000,
            monthly_cap: 0,
            ..Default::default()
        },
        &declined,
    )
    .await;
    let err = h.charge("w1", "m2", 100).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("declined"), "{}", err.message());
    assert_eq!(h.wallet("w1").await.balance, 0);
    h.assert_ledger_balances("w1").await;
}

#[tokio::test]
async fn with_stripe_a_simulator_token_is_refused_naming_the_form_stripe_takes() {
    let Some((h, _url)) = stripe_wallet().await else {
        return;
    };
    h.open("w1", "1", 0).await;
    let err = h
        .client
        .clone()
        .purchase_credits(authed(
            ADMIN_TOKEN,
            purchase_request("buy-sim", 1_000, "pm_card_ok"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("cus_<id>:pm_<id>"),
        "{}",
        err.message()
    );
    assert_eq!(h.wallet("w1").await.balance, 0);
}

// rule C1: a timeout in the middle: Stripe charged, the answer was lost; reconciled, charged once
#[tokio::test]
async fn c1_a_purchase_whose_answer_from_stripe_times_out_after_the_charge_is_reconciled_and_charged_once()
 {
    let Some(url) = localstripe::url() else {
        return;
    };
    // localstripe ignores Idempotency-Key and has no search: the front adds both, as Stripe has.
    let front = localstripe::Front::start(&url).await;
    let h = Harness::start_with(TestDatabase::fresh(), &localstripe::settings(&front.url)).await;
    h.open("w1", "1", 0).await;
    let card = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    // The charge is made at once; its answer comes after the adapter's 8-second limit.
    front.hold_next_create(std::time::Duration::from_secs(10));
    let request = purchase_request("buy-timeout", 1_000, &card);
    let first = h
        .client
        .clone()
        .purchase_credits(authed(ADMIN_TOKEN, request.clone()))
        .await
        .unwrap()
        .into_inner();
    // The request's own attempt timed out: it answers `processing`, or `succeeded` when the
    // reconciler (which searches Stripe by our key as soon as an outcome is unknown) finished
    // the purchase before the request took the wallet's lock again.
    assert!(
        [
            pb::PurchaseStatus::Processing as i32,
            pb::PurchaseStatus::Succeeded as i32
        ]
        .contains(&first.status),
        "{first:?}"
    );

    // Meanwhile the reconciler's attempts under the same key got Stripe's 409 (the first
    // request still in progress): unknown, not declined. Once Stripe has answered, the
    // reconciler's next attempt finds the charge made (by the key, or by the search).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while h.wallet("w1").await.balance == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the purchase was not reconciled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(h.wallet("w1").await.balance, 1_000);
    // The client's retry gets the finished purchase, and charges nothing.
    let again = h
        .client
        .clone()
        .purchase_credits(authed(ADMIN_TOKEN, request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.purchase_id, first.purchase_id);
    assert_eq!(again.status, pb::PurchaseStatus::Succeeded as i32);
    let intents = localstripe::payment_intents_of(&url, customer(&card)).await;
    assert_eq!(intents.len(), 1, "charged once: {intents:?}");
    assert_eq!(intents[0]["amount"], 1_000);
    assert_eq!(front.creates(), 1);
    assert_eq!(h.wallet("w1").await.balance, 1_000);
    assert_eq!(h.events_of("wallet.purchase_succeeded", 1).await.len(), 1);
    h.assert_ledger_balances("w1").await;
}

// ---- webhooks ----------------------------------------------------------------------------------

const WEBHOOK_SECRET: &str = "whsec_billing_suite_test";

/// A wallet whose Stripe does not answer (nothing listens on port 9): every charge's outcome
/// stays unknown, so only a webhook can decide it.
async fn wallet_with_webhooks_and_a_silent_stripe() -> Harness {
    let settings = format!(
        "payment_provider = \"stripe\"\nstripe_api_base = \"http://127.0.0.1:9\"\nstripe_secret_key = \"{}\"\nstripe_webhook_secret = \"{WEBHOOK_SECRET}\"\n",
        localstripe::SECRET_KEY
    );
    Harness::start_with(TestDatabase::fresh(), &settings).await
}

fn event(id: &str, kind: &str, purchase_id: &str) -> Vec<u8> {
    serde_json::json!({
        "id": id, "object": "event", "type": kind,
        "data": {"object": {
            "id": "pi_webhook", "object": "payment_intent", "metadata": {"billing_key": purchase_id},
            "last_payment_error": {"code": "card_declined", "decline_code": "insufficient_funds"},
        }},
    })
    .to_string()
    .into_bytes()
}

/// Delivers `payload` with `signature` (or a valid one), as Stripe would.
async fn deliver(h: &Harness, payload: &[u8], signature: Option<String>) -> (u16, String) {
    stripe_events::deliver(
        h.running.metrics_addr.unwrap(),
        payload,
        WEBHOOK_SECRET,
        signature,
    )
    .await
}

async fn unknown_outcome_purchase(h: &Harness) -> pb::Purchase {
    h.open("w1", "1", 0).await;
    let p = h.purchase("w1", 1_000, "cus_silent:pm_silent").await;
    assert_eq!(p.status, pb::PurchaseStatus::Processing as i32, "{p:?}");
    assert_eq!(h.wallet("w1").await.balance, 0);
    p
}

// rule C1
#[tokio::test]
async fn c1_a_signed_payment_intent_succeeded_webhook_finishes_a_purchase_once() {
    let h = wallet_with_webhooks_and_a_silent_stripe().await;
    let p = unknown_outcome_purchase(&h).await;
    let succeeded = event("evt_1", "payment_intent.succeeded", &p.purchase_id);
    assert_eq!(deliver(&h, &succeeded, None).await, (200, "applied".into()));
    assert_eq!(h.wallet("w1").await.balance, 1_000);
    assert_eq!(h.events_of("wallet.purchase_succeeded", 1).await.len(), 1);

    // The same event delivered again changes nothing.
    assert_eq!(
        deliver(&h, &succeeded, None).await,
        (200, "already applied".into())
    );
    // A later, contradicting event cannot move a decided purchase either.
    let failed = event("evt_2", "payment_intent.payment_failed", &p.purchase_id);
    assert_eq!(deliver(&h, &failed, None).await, (200, "applied".into()));
    // Events about nothing of ours are recorded and ignored.
    let other = event("evt_3", "payment_intent.succeeded", "pur_not_ours");
    assert_eq!(deliver(&h, &other, None).await, (200, "applied".into()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(h.wallet("w1").await.balance, 1_000);
    assert_eq!(h.events_of("wallet.purchase_succeeded", 1).await.len(), 1);
    assert!(h.events_of("wallet.purchase_failed", 0).await.is_empty());
    h.assert_ledger_balances("w1").await;
}

// rule C1
#[tokio::test]
async fn c1_a_payment_failed_webhook_fails_the_purchase_and_grants_nothing() {
    let h = wallet_with_webhooks_and_a_silent_stripe().await;
    let p = unknown_outcome_purchase(&h).await;
    let failed = event("evt_1", "payment_intent.payment_failed", &p.purchase_id);
    assert_eq!(deliver(&h, &failed, None).await, (200, "applied".into()));
    let events = h.events_of("wallet.purchase_failed", 1).await;
    assert_eq!(events.len(), 1);
    assert!(
        events[0].payload_json.contains("insufficient funds"),
        "{}",
        events[0].payload_json
    );
    assert_eq!(h.wallet("w1").await.balance, 0);
}

#[tokio::test]
async fn a_webhook_with_a_bad_or_stale_signature_is_refused_and_changes_nothing() {
    let h = wallet_with_webhooks_and_a_silent_stripe().await;
    let p = unknown_outcome_purchase(&h).await;
    let succeeded = event("evt_1", "payment_intent.succeeded", &p.purchase_id);
    let now = chrono::Utc::now().timestamp();
    let wrong_secret = stripe_webhook::sign(&Secret::new("whsec_someone_else"), now, &succeeded);
    let stale = now - 301;
    let stale_signature = stripe_webhook::sign(&Secret::new(WEBHOOK_SECRET), stale, &succeeded);
    for signature in [
        format!("t={now},v1={wrong_secret}"),
        format!("t={stale},v1={stale_signature}"),
        String::new(),
    ] {
        assert_eq!(
            deliver(&h, &succeeded, Some(signature)).await,
            (400, "invalid signature".into())
        );
    }
    // A body changed after signing is refused too.
    let tampered = event("evt_1", "payment_intent.succeeded", "pur_other");
    let signature = format!(
        "t={now},v1={}",
        stripe_webhook::sign(&Secret::new(WEBHOOK_SECRET), now, &succeeded)
    );
    assert_eq!(
        deliver(&h, &tampered, Some(signature)).await,
        (400, "invalid signature".into())
    );
    assert_eq!(h.wallet("w1").await.balance, 0);
    // Nothing was recorded: the genuine delivery of the same event is still applied.
    assert_eq!(deliver(&h, &succeeded, None).await, (200, "applied".into()));
    assert_eq!(h.wallet("w1").await.balance, 1_000);
}

// ---- refunds and disputes ----------------------------------------------------------------------

/// A wallet paying through localstripe with the webhook endpoint served, and a purchase of
/// 1,000 credits (10.00 EUR) paid by card: (harness, the purchase, its PaymentIntent's id).
async fn paid_purchase_with_webhooks() -> Option<(Harness, pb::Purchase, String)> {
    let url = localstripe::url()?;
    let settings = format!(
        "{}stripe_webhook_secret = \"{WEBHOOK_SECRET}\"\n",
        localstripe::settings(&url)
    );
    let h = Harness::start_with(TestDatabase::fresh(), &settings).await;
    h.open("w1", "1", 0).await;
    let card = localstripe::customer_with_card(&url, localstripe::CARD_OK).await;
    let p = h.purchase("w1", 1_000, &card).await;
    assert_eq!(p.status, pb::PurchaseStatus::Succeeded as i32, "{p:?}");
    assert_eq!(p.amount.as_ref().unwrap().amount, "10.00");
    let intents = localstripe::payment_intents_of(&url, customer(&card)).await;
    assert_eq!(intents.len(), 1, "{intents:?}");
    let pi = intents[0]["id"].as_str().unwrap().to_string();
    assert_eq!(h.wallet("w1").await.balance, 1_000);
    Some((h, p, pi))
}

/// A `charge.refunded` event for the 1,000-minor-unit charge of `payment_intent`.
fn refund_event(id: &str, payment_intent: &str, amount_refunded: i64) -> Vec<u8> {
    stripe_events::refund(id, payment_intent, 1_000, amount_refunded)
}

/// `VerifyLedger` over the whole database finds nothing wrong.
async fn assert_books_verify(h: &Harness) {
    let report = h
        .client
        .clone()
        .verify_ledger(authed(ADMIN_TOKEN, pb::VerifyLedgerRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.violations, [], "VerifyLedger");
    h.assert_ledger_balances("w1").await;
}

// rule C9: a payment taken back claws its credits back like a returned direct debit
#[tokio::test]
async fn c9_a_full_refund_webhook_claws_the_credits_back_once_and_spent_credits_become_debt() {
    let Some((h, p, pi)) = paid_purchase_with_webhooks().await else {
        return;
    };
    h.charge("w1", "m1", 400).await.unwrap();
    assert_eq!(h.wallet("w1").await.balance, 600);

    let refund = refund_event("evt_refund_1", &pi, 1_000);
    assert_eq!(deliver(&h, &refund, None).await, (200, "applied".into()));
    let w = h.wallet("w1").await;
    assert_eq!((w.balance, w.debt), (-400, 400), "600 left taken, 400 owed");
    let returned = h.events_of("wallet.payment_returned", 1).await;
    assert_eq!(returned.len(), 1);
    let payload: serde_json::Value = serde_json::from_str(&returned[0].payload_json).unwrap();
    assert_eq!(payload["purchase_id"], p.purchase_id.as_str());
    assert_eq!(payload["reason"], "refunded");
    assert_eq!(h.events_of("wallet.debt_recorded", 1).await.len(), 1);

    // The same event delivered again changes nothing.
    assert_eq!(
        deliver(&h, &refund, None).await,
        (200, "already applied".into())
    );
    let again = h.wallet("w1").await;
    assert_eq!((again.balance, again.debt), (-400, 400));
    assert_eq!(h.events_of("wallet.payment_returned", 1).await.len(), 1);
    // The debt blocks sends as after a returned debit.
    assert_eq!(
        h.charge("w1", "m2", 1).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_books_verify(&h).await;
}

// rule C9
#[tokio::test]
async fn c9_a_dispute_webhook_claws_the_credits_back_and_a_refund_after_it_takes_nothing_more() {
    let Some((h, p, pi)) = paid_purchase_with_webhooks().await else {
        return;
    };
    let dispute = stripe_events::dispute("evt_dispute_1", &pi, 1_000);
    assert_eq!(deliver(&h, &dispute, None).await, (200, "applied".into()));
    let w = h.wallet("w1").await;
    assert_eq!(
        (w.balance, w.debt),
        (0, 0),
        "the unspent credits, all taken back"
    );
    let returned = h.events_of("wallet.payment_returned", 1).await;
    assert_eq!(returned.len(), 1);
    assert!(
        returned[0].payload_json.contains(r#""reason":"disputed""#),
        "{}",
        returned[0].payload_json
    );
    assert!(returned[0].payload_json.contains(&p.purchase_id));

    // Refunding the disputed charge later (another event) cannot take the credits twice.
    let refund = refund_event("evt_refund_after_dispute", &pi, 1_000);
    assert_eq!(deliver(&h, &refund, None).await, (200, "applied".into()));
    let w = h.wallet("w1").await;
    assert_eq!((w.balance, w.debt), (0, 0));
    assert_eq!(h.events_of("wallet.payment_returned", 1).await.len(), 1);
    assert_books_verify(&h).await;
}

// rule C1: a part of a volume-priced purchase refunded moves no credits; an operator decides
#[tokio::test]
async fn a_partial_refund_moves_no_credits_and_asks_for_review_until_the_whole_price_is_refunded() {
    let Some((h, p, pi)) = paid_purchase_with_webhooks().await else {
        return;
    };
    let partial = refund_event("evt_refund_part", &pi, 300);
    assert_eq!(deliver(&h, &partial, None).await, (200, "applied".into()));
    assert_eq!(h.wallet("w1").await.balance, 1_000, "no credits moved");
    let review = h.events_of("wallet.payment_partly_reversed", 1).await;
    assert_eq!(review.len(), 1);
    let payload: serde_json::Value = serde_json::from_str(&review[0].payload_json).unwrap();
    assert_eq!(payload["purchase_id"], p.purchase_id.as_str());
    assert_eq!(payload["reversed_amount"], "3.00");
    assert_eq!(payload["amount"], "10.00");
    assert_eq!(payload["reason"], "refunded");
    assert!(h.events_of("wallet.payment_returned", 0).await.is_empty());
    assert_books_verify(&h).await;

    // The rest refunded later (Stripe's `amount_refunded` is cumulative): all credits back.
    let rest = refund_event("evt_refund_rest", &pi, 1_000);
    assert_eq!(deliver(&h, &rest, None).await, (200, "applied".into()));
    assert_eq!(h.wallet("w1").await.balance, 0);
    assert_eq!(h.events_of("wallet.payment_returned", 1).await.len(), 1);
    assert_books_verify(&h).await;
}

#[tokio::test]
async fn a_refund_for_an_unknown_payment_intent_is_recorded_and_ignored() {
    let Some((h, _p, _pi)) = paid_purchase_with_webhooks().await else {
        return;
    };
    for (id, pi) in [
        ("evt_unknown_pi", "pi_not_at_stripe"),
        ("evt_not_an_id", "../v1/customers"),
    ] {
        let refund = refund_event(id, pi, 1_000);
        assert_eq!(deliver(&h, &refund, None).await, (200, "applied".into()));
        assert_eq!(
            deliver(&h, &refund, None).await,
            (200, "already applied".into())
        );
    }
    assert_eq!(h.wallet("w1").await.balance, 1_000);
    assert!(h.events_of("wallet.payment_returned", 0).await.is_empty());
    assert_books_verify(&h).await;
}

#[tokio::test]
async fn a_refund_whose_payment_intent_cannot_be_retrieved_is_not_recorded_so_stripe_delivers_again()
 {
    let h = wallet_with_webhooks_and_a_silent_stripe().await;
    unknown_outcome_purchase(&h).await;
    let refund = refund_event("evt_refund_silent", "pi_somewhere", 1_000);
    for _ in 0..2 {
        assert_eq!(
            deliver(&h, &refund, None).await,
            (500, "not applied".into()),
            "not `already applied`: the first failure recorded nothing"
        );
    }
    let recorded: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM stripe_events")
        .fetch_one(h.running.platform.db.pool())
        .await
        .unwrap();
    assert_eq!(recorded, 0);
    assert_eq!(h.wallet("w1").await.balance, 0);
}

// rule C9: a dispute the platform wins gives back what its creation took, once
#[tokio::test]
async fn c9_a_dispute_won_gives_the_credits_back_once_paying_the_debt_it_left_first() {
    let Some((h, p, pi)) = paid_purchase_with_webhooks().await else {
        return;
    };
    h.charge("w1", "m1", 400).await.unwrap();
    let dispute = stripe_events::dispute("evt_dispute_won_1", &pi, 1_000);
    assert_eq!(deliver(&h, &dispute, None).await, (200, "applied".into()));
    let w = h.wallet("w1").await;
    assert_eq!((w.balance, w.debt), (-400, 400), "600 taken back, 400 owed");

    let won = stripe_events::dispute_closed("evt_dispute_won_2", &pi, 1_000, "won");
    assert_eq!(deliver(&h, &won, None).await, (200, "applied".into()));
    let w = h.wallet("w1").await;
    assert_eq!(
        (w.balance, w.debt, w.available),
        (600, 0, 600),
        "1,000 granted again: 400 pay the debt, 600 are left"
    );
    let reinstated = h.events_of("wallet.payment_reinstated", 1).await;
    assert_eq!(reinstated.len(), 1);
    let payload: serde_json::Value = serde_json::from_str(&reinstated[0].payload_json).unwrap();
    assert_eq!(payload["purchase_id"], p.purchase_id.as_str());
    assert_eq!(payload["credits"], 1_000);

    // The same closing delivered again gives nothing more.
    assert_eq!(
        deliver(&h, &won, None).await,
        (200, "already applied".into())
    );
    assert_eq!(h.wallet("w1").await.balance, 600);
    assert_eq!(h.events_of("wallet.payment_reinstated", 1).await.len(), 1);
    // Out of debt, the wallet sends again; its books hold (a reinstated purchase: two purchase
    // entries, one claw-back, its new lot).
    h.charge("w1", "m2", 100).await.unwrap();
    assert_books_verify(&h).await;
    // A refund of the charge afterwards takes the credits back once more, as for any payment.
    let refund = refund_event("evt_refund_after_won", &pi, 1_000);
    assert_eq!(deliver(&h, &refund, None).await, (200, "applied".into()));
    let w = h.wallet("w1").await;
    assert_eq!((w.balance, w.debt), (-500, 500));
    assert_books_verify(&h).await;
}

// rule C9: a dispute closed before its creation was applied waits for it (Stripe does not
// promise order), and a lost dispute gives nothing back
#[tokio::test]
async fn a_dispute_closing_that_arrives_first_waits_for_the_dispute_and_a_lost_one_gives_nothing() {
    let Some((h, _, pi)) = paid_purchase_with_webhooks().await else {
        return;
    };
    let won = stripe_events::dispute_closed("evt_dispute_early_2", &pi, 1_000, "won");
    assert_eq!(
        deliver(&h, &won, None).await,
        (500, "not applied".into()),
        "nothing to give back yet: not recorded, so Stripe delivers it again"
    );
    assert_eq!(h.wallet("w1").await.balance, 1_000);
    let dispute = stripe_events::dispute("evt_dispute_early_1", &pi, 1_000);
    assert_eq!(deliver(&h, &dispute, None).await, (200, "applied".into()));
    assert_eq!(h.wallet("w1").await.balance, 0);
    assert_eq!(deliver(&h, &won, None).await, (200, "applied".into()));
    assert_eq!(h.wallet("w1").await.balance, 1_000);
    assert_books_verify(&h).await;

    // Another purchase, disputed and lost: its credits stay taken back.
    let (h, _, pi) = paid_purchase_with_webhooks().await.unwrap();
    let dispute = stripe_events::dispute("evt_dispute_lost_1", &pi, 1_000);
    assert_eq!(deliver(&h, &dispute, None).await, (200, "applied".into()));
    let lost = stripe_events::dispute_closed("evt_dispute_lost_2", &pi, 1_000, "lost");
    assert_eq!(deliver(&h, &lost, None).await, (200, "applied".into()));
    assert_eq!(h.wallet("w1").await.balance, 0);
    assert_eq!(h.events_of("wallet.payment_reinstated", 0).await.len(), 0);
    assert_books_verify(&h).await;
}
