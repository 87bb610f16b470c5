//! Random sequences of grants, charges, holds, captures, releases, expiries and top-ups keep
//! balance = sum of the ledger, and never go below zero in prepaid mode.

use proptest::prelude::*;
use proto::wallet::v1 as pb;
use runtime::testing::{ADMIN_TOKEN, authed};

use crate::Harness;

#[derive(Debug, Clone)]
enum Op {
    Grant {
        credits: u64,
        expires_in_days: Option<i64>,
    },
    Charge {
        recipients: u64,
    },
    Reserve {
        recipients: u64,
    },
    Capture {
        which: usize,
        recipients: u64,
    },
    Release {
        which: usize,
    },
    Advance {
        hours: i64,
    },
    ShortfallTopUp {
        on: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u64..3_000, prop::option::of(1i64..20)).prop_map(|(credits, expires_in_days)| {
            Op::Grant {
                credits,
                expires_in_days,
            }
        }),
        (1u64..2_000).prop_map(|recipients| Op::Charge { recipients }),
        (1u64..1_500).prop_map(|recipients| Op::Reserve { recipients }),
        (0usize..4, 0u64..2_000).prop_map(|(which, recipients)| Op::Capture { which, recipients }),
        (0usize..4).prop_map(|which| Op::Release { which }),
        (1i64..200).prop_map(|hours| Op::Advance { hours }),
        any::<bool>().prop_map(|on| Op::ShortfallTopUp { on }),
    ]
}

async fn run(ops: Vec<Op>) {
    let h = Harness::start().await;
    h.open("w", "1.05", 100).await;
    let mut holds: Vec<String> = Vec::new();
    let mut c = h.client.clone();
    for op in ops {
        match op {
            Op::Grant {
                credits,
                expires_in_days,
            } => {
                let expires_at = expires_in_days.map(|d| {
                    runtime::convert::timestamp(
                        h.running.platform.clock.now() + chrono::Duration::days(d),
                    )
                });
                c.grant_credits(authed(
                    ADMIN_TOKEN,
                    pb::GrantCreditsRequest {
                        idempotency_key: h.key(),
                        wallet_id: "w".into(),
                        credits,
                        kind: pb::LotKind::SubscriptionAllowance as i32,
                        expires_at,
                        reference: String::new(),
                    },
                ))
                .await
                .unwrap();
            }
            Op::Charge { recipients } => {
                let _ = h.charge("w", "m", recipients).await;
            }
            Op::Reserve { recipients } => {
                if let Ok(r) = c
                    .reserve_credits(authed(
                        ADMIN_TOKEN,
                        pb::ReserveCreditsRequest {
                            idempotency_key: h.key(),
                            wallet_id: "w".into(),
                            mailing_id: "m".into(),
                            recipients,
                            ttl_seconds: 36 * 3_600,
                        },
                    ))
                    .await
                {
                    holds.push(r.into_inner().reservation_id);
                }
            }
            Op::Capture { which, recipients } => {
                if let Some(id) = holds.get(which) {
                    let _ = c
                        .capture_reservation(authed(
                            ADMIN_TOKEN,
                            pb::CaptureReservationRequest {
                                idempotency_key: h.key(),
                                wallet_id: "w".into(),
                                reservation_id: id.clone(),
                                recipients_sent: recipients,
                            },
                        ))
                        .await;
                }
            }
            Op::Release { which } => {
                if let Some(id) = holds.get(which) {
                    let _ = c
                        .release_reservation(authed(
                            ADMIN_TOKEN,
                            pb::ReleaseReservationRequest {
                                idempotency_key: h.key(),
                                wallet_id: "w".into(),
                                reservation_id: id.clone(),
                            },
                        ))
                        .await;
                }
            }
            Op::Advance { hours } => h.advance(hours * 3_600).await,
            Op::ShortfallTopUp { on } => {
                let mode = if on {
                    pb::AutoTopUpMode::Shortfall
                } else {
                    pb::AutoTopUpMode::Off
                };
                h.auto_top_up(
                    "w",
                    pb::AutoTopUp {
                        mode: mode as i32,
                        max_per_purchase: 1_000,
                        ..Default::default()
                    },
                    "pm_card_ok",
                )
                .await;
            }
        }
        let w = h.wallet("w").await;
        assert!(w.balance >= 0, "prepaid never below zero: {w:?}");
        assert!(w.available as i64 <= w.balance, "{w:?}");
        assert_eq!(
            w.available as i64,
            (w.balance - w.held as i64).max(0),
            "{w:?}"
        );
        h.assert_ledger_balances("w").await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]
    #[test]
    fn random_operation_sequences_keep_the_ledger_balanced(ops in prop::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(ops));
    }
}
