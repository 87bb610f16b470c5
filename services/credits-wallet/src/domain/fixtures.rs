//! Lots and instants shared by the domain's unit and property tests.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;

use super::lots::{Lot, LotKind, Take};

pub(crate) fn t(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, day, 12, 0, 0).unwrap()
}

pub(crate) fn lot(
    id: &str,
    kind: LotKind,
    remaining: i64,
    expires: Option<DateTime<Utc>>,
    created: DateTime<Utc>,
) -> Lot {
    Lot {
        lot_id: id.to_string(),
        kind,
        remaining,
        expires_at: expires,
        created_at: created,
    }
}

pub(crate) fn take(id: &str, credits: i64) -> Take {
    Take {
        lot_id: id.to_string(),
        credits,
    }
}

pub(crate) fn base() -> DateTime<Utc> {
    t(15)
}

prop_compose! {
    pub(crate) fn arb_lot(idx: usize)(
        kind in prop::sample::select(LotKind::ALL.to_vec()),
        remaining in prop_oneof![Just(0_i64), 0_i64..1_000],
        expires in prop::option::of(-5_i64..5),
        created in -10_i64..0,
    ) -> Lot {
        Lot {
            lot_id: format!("lot{idx:02}"),
            kind,
            remaining,
            expires_at: expires.map(|d| base() + Duration::hours(d)),
            created_at: base() + Duration::hours(created),
        }
    }
}

pub(crate) fn arb_lots() -> impl Strategy<Value = Vec<Lot>> {
    (0_usize..8).prop_flat_map(|n| (0..n).map(arb_lot).collect::<Vec<_>>())
}
