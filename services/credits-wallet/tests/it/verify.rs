//! Ledger verification (`VerifyLedger` and the `verify-ledger` command): wallets that went
//! through every kind of change pass; a row corrupted behind the service's back is reported,
//! by wallet and by check, and nothing else is.

use std::collections::BTreeSet;

use proto::wallet::v1 as pb;
use runtime::testing::{ADMIN_TOKEN, MUTATE_TOKEN, authed};
use tonic::Code;

use crate::Harness;

const WALLETS: [&str; 5] = ["a", "b", "c", "d", "e"];

async fn on_demand(h: &Harness, wallet: &str, method: &str) {
    h.client
        .clone()
        .set_funding_mode(authed(
            ADMIN_TOKEN,
            pb::SetFundingModeRequest {
                idempotency_key: h.key(),
                wallet_id: wallet.into(),
                funding_mode: pb::FundingMode::OnDemand as i32,
                payment_method: method.into(),
            },
        ))
        .await
        .unwrap();
}

async fn reserve(h: &Harness, wallet: &str, recipients: u64) -> pb::Reservation {
    h.reserve(wallet, &format!("held-{}", h.key()), recipients, 0)
        .await
        .unwrap()
}

/// Five wallets through every kind of ledger change: grants and signup credits, charges,
/// card purchases paid and declined, a direct debit settled, on-demand sends paid by card and
/// by a direct debit that came back (claw-back, debt, debt repaid), expiry, holds captured,
/// released and still active, a transfer and an adjustment.
async fn busy_wallets(h: &Harness) {
    h.open("a", "1", 0).await;
    h.open("b", "1", 1_000).await;
    h.open("c", "1", 0).await;
    h.open("d", "1", 0).await;
    h.open("e", "1", 0).await;

    // Everything that needs time to pass, first (so no background job runs afterwards).
    let p = h.purchase("b", 2_000, "pm_sepa_ok").await;
    assert_eq!(p.status, pb::PurchaseStatus::PendingSettlement as i32);
    on_demand(h, "d", "pm_sepa_returned").await;
    h.charge("d", "d-m1", 1_000).await.unwrap();
    let expires = h.running.platform.clock.now() + chrono::Duration::days(1);
    h.client
        .clone()
        .grant_credits(authed(
            ADMIN_TOKEN,
            pb::GrantCreditsRequest {
                idempotency_key: h.key(),
                wallet_id: "e".into(),
                credits: 700,
                kind: pb::LotKind::Promotional as i32,
                expires_at: Some(runtime::convert::timestamp(expires)),
                reference: String::new(),
            },
        ))
        .await
        .unwrap();
    h.advance(4 * 86_400).await;
    h.wait_for("b", |w| w.balance == 3_000).await;
    h.wait_for("d", |w| w.debt == 1_000).await;
    h.wait_for("e", |w| w.balance == 0).await;

    h.grant("a", 5_000).await;
    h.charge("a", "a-m1", 100).await.unwrap();
    assert_eq!(
        h.purchase("a", 2_000, "pm_card_ok").await.status,
        pb::PurchaseStatus::Succeeded as i32
    );
    assert_eq!(
        h.purchase("a", 500, "pm_card_declined").await.status,
        pb::PurchaseStatus::Failed as i32
    );
    let captured = reserve(h, "a", 200).await;
    let released = reserve(h, "a", 300).await;
    reserve(h, "a", 400).await;
    let mut c = h.client.clone();
    c.capture_reservation(authed(
        ADMIN_TOKEN,
        pb::CaptureReservationRequest {
            idempotency_key: h.key(),
            wallet_id: "a".into(),
            reservation_id: captured.reservation_id,
            recipients_sent: 150,
        },
    ))
    .await
    .unwrap();
    c.release_reservation(authed(
        ADMIN_TOKEN,
        pb::ReleaseReservationRequest {
            idempotency_key: h.key(),
            wallet_id: "a".into(),
            reservation_id: released.reservation_id,
        },
    ))
    .await
    .unwrap();
    c.transfer_credits(authed(
        ADMIN_TOKEN,
        pb::TransferCreditsRequest {
            idempotency_key: h.key(),
            from_wallet_id: "a".into(),
            to_wallet_id: "e".into(),
            credits: 300,
            reason: "allocation".into(),
        },
    ))
    .await
    .unwrap();
    c.adjust_credits(authed(
        ADMIN_TOKEN,
        pb::AdjustCreditsRequest {
            idempotency_key: h.key(),
            wallet_id: "a".into(),
            delta: -50,
            reason: "correction".into(),
        },
    ))
    .await
    .unwrap();

    on_demand(h, "c", "pm_card_ok").await;
    h.charge("c", "c-m1", 500).await.unwrap();

    on_demand(h, "d", "pm_card_ok").await;
    assert_eq!(
        h.purchase("d", 1_500, "pm_card_ok").await.status,
        pb::PurchaseStatus::Succeeded as i32
    );
    assert_eq!(h.wallet("d").await.debt, 0);
}

async fn verify(h: &Harness) -> pb::VerifyLedgerResponse {
    h.client
        .clone()
        .verify_ledger(authed(ADMIN_TOKEN, pb::VerifyLedgerRequest::default()))
        .await
        .unwrap()
        .into_inner()
}

/// Runs the `verify-ledger` binary against the harness's database: (exit code, stdout).
async fn verify_command(h: &Harness) -> (i32, String) {
    let (url, schema) = (h.db.url.clone(), h.db.schema.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_verify-ledger"))
            .env("WALLET_DATABASE_URL", url)
            .env("WALLET_DATABASE_SCHEMA", schema)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn verify_ledger_passes_wallets_that_went_through_every_kind_of_change() {
    let h = Harness::start().await;
    busy_wallets(&h).await;
    let mut entries = 0;
    for w in WALLETS {
        entries += h.ledger(w).await.len() as u64;
        h.assert_ledger_balances(w).await;
    }

    let report = verify(&h).await;
    assert_eq!(report.violations, [], "a sound wallet set has no violation");
    assert_eq!(report.violations_total, 0);
    assert_eq!(report.wallets_checked, 5);
    assert_eq!(report.entries_checked, entries);
    assert_eq!(report.purchases_checked, 6);
    assert!(report.outbox_events_checked > 0);

    let (code, out) = verify_command(&h).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("checked 5 wallets, {entries} ledger entries")),
        "{out}"
    );

    let refused = h
        .client
        .clone()
        .verify_ledger(authed(MUTATE_TOKEN, pb::VerifyLedgerRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "admin scope only");
}

#[tokio::test]
async fn verify_ledger_reports_each_corrupted_row_by_wallet_and_check() {
    let h = Harness::start().await;
    busy_wallets(&h).await;
    let pool = h.running.platform.db.pool();
    for corruption in [
        "UPDATE wallets SET balance = balance + 1 WHERE wallet_id = 'a'",
        "DELETE FROM ledger_entries WHERE wallet_id = 'b' AND seq = 1",
        "UPDATE wallets SET held = held + 5 WHERE wallet_id = 'c'",
        "UPDATE purchases SET status = 'failed' WHERE wallet_id = 'd' AND status = 'succeeded'",
        "UPDATE credit_lots SET granted = remaining - 1 WHERE wallet_id = 'e' AND remaining > 0",
        "UPDATE outbox SET event_type = '' WHERE id = (SELECT MIN(id) FROM outbox)",
    ] {
        let done = sqlx::query(corruption).execute(pool).await.unwrap();
        assert_eq!(done.rows_affected(), 1, "{corruption}");
    }

    let report = verify(&h).await;
    let found: BTreeSet<(String, String)> = report
        .violations
        .iter()
        .map(|v| (v.wallet_id.clone(), v.check.clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("a", "balance_vs_ledger"),
        ("a", "balance_vs_lots"),
        ("b", "balance_vs_ledger"),
        ("b", "ledger_sequence"),
        ("b", "running_balance"),
        ("c", "held_vs_reservations"),
        ("d", "purchase_entries"),
        ("d", "purchase_lot"),
        ("e", "lot_out_of_range"),
        ("", "outbox_event_type"),
    ]
    .into_iter()
    .map(|(w, c)| (w.to_string(), c.to_string()))
    .collect();
    assert_eq!(found, expected, "{:#?}", report.violations);
    assert_eq!(report.violations_total, report.violations.len() as u64);
    let a = report
        .violations
        .iter()
        .find(|v| v.wallet_id == "a" && v.check == "balance_vs_ledger")
        .unwrap();
    assert!(a.detail.contains("balance 6401"), "{}", a.detail);

    let (code, out) = verify_command(&h).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("VIOLATION a balance_vs_ledger"), "{out}");
    assert!(
        out.contains("VIOLATION (outbox) outbox_event_type"),
        "{out}"
    );
}
