//! The domain's unit and property tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use shared::{BillingInterval, BillingPeriod, ContactSlider, Currency, Tier, TierMode, TierTable};

use super::*;

fn plan(id: &str, product: Product, rank: u32) -> Plan {
    Plan {
        plan_id: id.into(),
        version: 1,
        name: "Email".into(),
        product,
        level: Level {
            name: format!("level{rank}"),
            rank,
        },
        interval: BillingInterval::Month,
        currency: Currency::EUR,
        contact_tiers: TierTable::new(
            TierMode::Graduated,
            Currency::EUR,
            vec![
                Tier {
                    first: 1,
                    last: Some(10_000),
                    unit_price: dec!(0.006) * Decimal::from(rank),
                    flat_price: dec!(0),
                },
                Tier {
                    first: 10_001,
                    last: None,
                    unit_price: dec!(0.005) * Decimal::from(rank),
                    flat_price: dec!(0),
                },
            ],
        )
        .unwrap(),
        slider: ContactSlider::new(1_000, 50_000, 1_000).unwrap(),
        included_seats: 1,
        seat_price: dec!(5),
        add_ons: vec![AddOn {
            code: "sms".into(),
            name: "SMS".into(),
            price: dec!(9.99),
        }],
        proration: ProrationPolicy::ProrateToCycleEnd,
        self_serve: SelfServe {
            downgrade: true,
            ..SelfServe::default()
        },
        trial: None,
        monthly_credits: 0,
    }
}

// Issue 16: the limits of `shared::limits`, enforced where a selection or plan is made.
#[test]
fn selections_are_bounded_and_refuse_duplicates() {
    let ok = Selection::new(5_000, 1, vec!["sms".into()]).unwrap();
    assert_eq!(ok.seats, 1);
    let field = |r: Result<Selection, DomainError>| match r {
        Err(DomainError::Invalid { field, .. }) => field,
        other => panic!("not refused: {other:?}"),
    };
    assert_eq!(field(Selection::new(5_000, 0, vec![])), "seats");
    assert_eq!(field(Selection::new(5_000, u32::MAX, vec![])), "seats");
    assert_eq!(
        field(Selection::new(5_000, limits::MAX_SEATS + 1, vec![])),
        "seats"
    );
    assert!(Selection::new(5_000, limits::MAX_SEATS, vec![]).is_ok());
    assert_eq!(field(Selection::new(u64::MAX, 1, vec![])), "contacts");
    assert_eq!(
        field(Selection::new(5_000, 1, vec!["sms".into(), "sms".into()])),
        "add_ons"
    );
    assert_eq!(
        field(Selection::new(5_000, 1, vec!["x".repeat(10_000)])),
        "add_ons"
    );
    let DomainError::Invalid { message, .. } = Selection::new(5_000, 1, vec!["fax".into()])
        .unwrap()
        .checked(&plan("p", Product::Marketing, 1))
        .unwrap_err()
    else {
        panic!("not invalid")
    };
    assert!(message.ends_with("no add-on \"fax\""), "{message}");
}

#[test]
fn plans_refuse_absurd_prices_counts_and_text() {
    let base = plan("p", Product::Marketing, 1);
    base.validate().unwrap();
    let refused = |change: &dyn Fn(&mut Plan), field: &str| {
        let mut p = base.clone();
        change(&mut p);
        match p.validate() {
            Err(DomainError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: not refused: {other:?}"),
        }
    };
    refused(&|p| p.seat_price = dec!(0.001), "plan.seat_price");
    refused(&|p| p.seat_price = dec!(1000000.01), "plan.seat_price");
    refused(&|p| p.included_seats = u32::MAX, "plan.included_seats");
    refused(&|p| p.name = "Pro\u{202E}".into(), "plan.name");
    refused(&|p| p.level.name = "a\u{0}".into(), "plan.level.name");
    refused(&|p| p.monthly_credits = i64::MAX, "plan.monthly_credits");
    refused(
        &|p| {
            p.add_ons = vec![AddOn {
                code: "sms".into(),
                name: "SMS\n".into(),
                price: dec!(1),
            }]
        },
        "plan.add_ons.name",
    );
    refused(
        &|p| {
            p.add_ons = vec![AddOn {
                code: "sms".into(),
                name: "SMS".into(),
                price: dec!(0.0000000001),
            }]
        },
        "plan.add_ons.price",
    );
    refused(
        &|p| {
            p.trial = Some(TrialTerms {
                days: 30,
                contact_cap: u64::MAX,
                free_mails: 0,
            })
        },
        "plan.trial.contact_cap",
    );
}

fn sel(contacts: u64) -> Selection {
    Selection {
        contacts,
        seats: 1,
        add_ons: vec![],
    }
}

// rule S3
#[test]
fn s3_more_contacts_cost_less_per_contact_and_every_line_is_rounded() {
    let p = plan("m", Product::Marketing, 1);
    assert_eq!(recurring_price(&p, &sel(5_000)).unwrap().amount(), dec!(30));
    assert_eq!(
        recurring_price(&p, &sel(20_000)).unwrap().amount(),
        dec!(110)
    );
    let s = Selection {
        contacts: 1_000,
        seats: 3,
        add_ons: vec!["sms".into()],
    };
    let lines = recurring_lines(&p, &s).unwrap();
    assert_eq!(lines.len(), 3);
    assert_eq!(recurring_price(&p, &s).unwrap().amount(), dec!(25.99));
}

// rule S9
#[test]
fn s9_downgrade_floor_is_the_lowest_tier_holding_the_active_contacts() {
    let p = plan("m", Product::Marketing, 1);
    let err = plan_change(&p, &sel(30_000), None, &Change::Contacts(27_000), 27_001);
    assert_eq!(
        err.unwrap_err(),
        DomainError::BelowActiveContacts {
            active: 27_001,
            lowest: 28_000
        }
    );
    let ok = plan_change(&p, &sel(30_000), None, &Change::Contacts(28_000), 27_001).unwrap();
    assert_eq!(ok.timing, Timing::NextCycle);
}

// rule S10
#[test]
fn s10_changes_that_are_not_self_serve_become_change_requests() {
    let mut p = plan("m", Product::Bundle, 1);
    p.self_serve = SelfServe::default();
    let s = Selection {
        add_ons: vec!["sms".into()],
        ..sel(5_000)
    };
    let t = plan_change(&p, &s, None, &Change::RemoveAddOn("sms".into()), 0).unwrap();
    assert_eq!(t.timing, Timing::ChangeRequest);
    let t = plan_change(&p, &s, None, &Change::Contacts(4_000), 0).unwrap();
    assert_eq!(t.timing, Timing::ChangeRequest);
    let single = plan("s", Product::Sales, 1);
    let mut s2 = s.clone();
    s2.add_ons.clear();
    let change = Change::Product {
        plan_id: "s".into(),
        version: 1,
    };
    let t = plan_change(&p, &s2, Some(&single), &change, 0).unwrap();
    assert_eq!(t.timing, Timing::ChangeRequest, "unbundling");
    let t = plan_change(&p, &s, None, &Change::AddAddOn("sms".into()), 0);
    assert!(t.is_err(), "already active");
}

// rule S7
#[test]
fn s7_upgrade_on_day_10_of_30_charges_two_thirds_of_the_difference() {
    let p = plan("m", Product::Marketing, 1);
    let start = Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap();
    let period = BillingPeriod {
        start,
        end: Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap(),
    };
    let at = start + Duration::days(10);
    let q = quote_upgrade(&p, &sel(5_000), &p, &sel(10_000), &period, at, dec!(0.21)).unwrap();
    // 30 -> 60 EUR: credit 20.00, charge 40.00, net 20.00, VAT 4.20.
    assert_eq!(q.bill.subtotal.amount(), dec!(20.00));
    assert_eq!(q.bill.vat.amount(), dec!(4.20));
    assert_eq!(q.bill.total.amount(), dec!(24.20));
    assert_eq!(q.new_recurring.amount(), dec!(60));
}

// rule S8
#[test]
fn s8_restart_credits_the_remainder_and_charges_a_full_new_period() {
    let mut p = plan("m", Product::Marketing, 1);
    p.proration = ProrationPolicy::RestartPeriod;
    let start = Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap();
    let period = BillingPeriod {
        start,
        end: Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap(),
    };
    let q = quote_upgrade(
        &p,
        &sel(5_000),
        &p,
        &sel(10_000),
        &period,
        start + Duration::days(10),
        dec!(0),
    )
    .unwrap();
    assert!(q.restarts_period);
    assert_eq!(q.bill.total.amount(), dec!(40.00)); // 60 - 20 credit
}

// rule S12
#[test]
fn s12_contacts_beyond_the_limit_wait_and_an_upgrade_promotes_them() {
    assert_eq!(admit(1_000, 900, 250), (100, 150));
    assert_eq!(admit(1_000, 1_000, 5), (0, 5));
    assert_eq!(promote(2_000, 1_000, 150), 150);
    assert_eq!(promote(1_100, 1_000, 150), 100);
}

// rule S2 / S14 / S16 / S18
#[test]
fn sending_rules() {
    let mut s = SendingState {
        status: Status::Active,
        trial_mails_sent: 0,
        trial_free_mails: 0,
        unpaid_bank_transfer: false,
        returned_debit: false,
    };
    assert_eq!(may_send(&s, 10_000_000), Ok(()), "S2: unlimited");
    s.unpaid_bank_transfer = true;
    assert_eq!(may_send(&s, 1), Err(SendingRefusal::BankTransferUnpaid));
    // S18 for debits: a returned debit refuses sending, even while past due.
    s.unpaid_bank_transfer = false;
    s.returned_debit = true;
    s.status = Status::PastDue;
    assert_eq!(may_send(&s, 1), Err(SendingRefusal::PaymentReturned));
    s = SendingState {
        status: Status::Trialing,
        trial_mails_sent: 150,
        trial_free_mails: 200,
        unpaid_bank_transfer: false,
        returned_debit: false,
    };
    assert_eq!(may_send(&s, 50), Ok(()));
    assert_eq!(may_send(&s, 51), Err(SendingRefusal::TrialMailCap));
    s.status = Status::TrialExpired;
    assert_eq!(may_send(&s, 1), Err(SendingRefusal::TrialOverNotVerified));
}

// rule C7
#[test]
fn c7_a_yearly_period_has_twelve_allowance_months_counted_from_the_anchor() {
    let anchor = Utc.with_ymd_and_hms(2026, 1, 31, 0, 0, 0).unwrap();
    let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap();
    let jan = allowance_month(anchor, BillingInterval::Year, 0, at(2026, 2, 1))
        .unwrap()
        .unwrap();
    assert_eq!((jan.index, jan.start, jan.last), (0, anchor, false));
    // 31 Jan + 1 month clamps to 28 Feb; the next month starts on 31 Mar again.
    let feb = allowance_month(anchor, BillingInterval::Year, 0, at(2026, 3, 1))
        .unwrap()
        .unwrap();
    assert_eq!(feb.index, 1);
    assert_eq!(
        feb.start,
        Utc.with_ymd_and_hms(2026, 2, 28, 0, 0, 0).unwrap()
    );
    assert_eq!(feb.end, Utc.with_ymd_and_hms(2026, 3, 31, 0, 0, 0).unwrap());
    let dec = allowance_month(anchor, BillingInterval::Year, 0, at(2027, 1, 15))
        .unwrap()
        .unwrap();
    assert_eq!((dec.index, dec.last), (11, true));
    // The second year, and a monthly plan's single month.
    let next = allowance_month(anchor, BillingInterval::Year, 1, at(2027, 2, 1))
        .unwrap()
        .unwrap();
    assert_eq!(next.index, 0);
    assert!(
        allowance_month(anchor, BillingInterval::Year, 1, at(2026, 6, 1))
            .unwrap()
            .is_none()
    );
    let m = allowance_month(anchor, BillingInterval::Month, 3, at(2026, 5, 1))
        .unwrap()
        .unwrap();
    assert_eq!((m.index, m.last), (0, true));
    assert_eq!(m.start, Utc.with_ymd_and_hms(2026, 4, 30, 0, 0, 0).unwrap());
}

#[test]
fn retries_then_suspension() {
    let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    assert_eq!(next_retry(1, now), Some(now + Duration::days(1)));
    assert_eq!(next_retry(2, now), Some(now + Duration::days(2)));
    assert_eq!(next_retry(3, now), None);
}

#[test]
fn a_plan_must_price_every_slider_position() {
    let mut p = plan("m", Product::Marketing, 1);
    assert!(p.validate().is_ok());
    p.contact_tiers = TierTable::new(
        TierMode::FlatPerBand,
        Currency::EUR,
        vec![Tier {
            first: 1,
            last: Some(10_000),
            unit_price: dec!(0),
            flat_price: dec!(10),
        }],
    )
    .unwrap();
    assert!(p.validate().is_err());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // rule S12: admitted contacts never exceed the limit and none are lost.
        #[test]
        fn admit_never_exceeds_the_limit(limit in 0u64..100_000, active in 0u64..100_000, n in 0u64..100_000) {
            let active = active.min(limit);
            let (sub, pending) = admit(limit, active, n);
            prop_assert_eq!(sub + pending, n);
            prop_assert!(active + sub <= limit);
        }

        // rule S9: the floor holds the active contacts and is a slider position.
        #[test]
        fn downgrade_floor_holds_active(active in 0u64..50_000, target in 1u64..50) {
            let p = plan("m", Product::Marketing, 1);
            let target = target * 1_000;
            match plan_change(&p, &sel(50_000), None, &Change::Contacts(target), active) {
                Ok(t) => prop_assert!(t.selection.contacts >= active),
                Err(DomainError::BelowActiveContacts { lowest, .. }) => {
                    prop_assert!(lowest >= active && target < lowest && p.slider.contains(lowest));
                }
                Err(DomainError::Precondition(_)) => prop_assert_eq!(target, 50_000),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }
}
