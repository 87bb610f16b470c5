//! The low-balance reminder (C3).

/// Low-balance reminder (C3): one event when the available balance crosses
/// below the threshold, not one per debit; re-armed once the balance is back
/// at or above it.
///
/// `armed` always equals "the last observed balance was >= threshold", so an
/// event fires exactly on each downward crossing. Configuring a reminder
/// while already below the threshold does not fire: it fires the next time
/// the balance goes from >= threshold to < threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reminder {
    /// Balance below which the reminder fires (`None` = no reminder).
    pub threshold: Option<i64>,
    /// True when the next drop below the threshold must fire.
    pub armed: bool,
}

impl Reminder {
    /// A reminder for `threshold` given the current available balance:
    /// armed iff a threshold is set and `available_now >= threshold`.
    pub fn new(threshold: Option<i64>, available_now: i64) -> Reminder {
        Reminder {
            threshold,
            armed: threshold.is_some_and(|t| available_now >= t),
        }
    }

    /// Observes the available balance after a change. Returns the new state
    /// and whether to emit a low-balance event: armed and now below ->
    /// (disarmed, true); disarmed and back at/above -> (armed, false).
    pub fn observe(self, available: i64) -> (Reminder, bool) {
        let Some(threshold) = self.threshold else {
            return (
                Reminder {
                    threshold: None,
                    armed: false,
                },
                false,
            );
        };
        let at_or_above = available >= threshold;
        let fire = self.armed && !at_or_above;
        (
            Reminder {
                threshold: Some(threshold),
                armed: at_or_above,
            },
            fire,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    // --- reminder (C3) ----------------------------------------------------------

    #[test]
    fn reminder_new() {
        assert!(Reminder::new(Some(100), 100).armed);
        assert!(!Reminder::new(Some(100), 99).armed);
        assert!(!Reminder::new(None, 1_000).armed);
    }

    #[test]
    fn reminder_fires_once_per_crossing_c3() {
        let r = Reminder::new(Some(1000), 5000);
        let (r, fired) = r.observe(1500);
        assert!(!fired);
        let (r, fired) = r.observe(900);
        assert!(fired, "crossing below fires");
        let (r, fired) = r.observe(400);
        assert!(!fired, "further debits do not fire again");
        let (r, fired) = r.observe(1000);
        assert!(!fired);
        assert!(r.armed, "back at the threshold re-arms");
        let (r, fired) = r.observe(999);
        assert!(fired, "the next crossing fires again");
        assert!(!r.armed);
    }

    #[test]
    fn reminder_configured_below_does_not_fire_immediately() {
        let r = Reminder::new(Some(1000), 500);
        let (r, fired) = r.observe(400);
        assert!(!fired);
        let (r, _) = r.observe(2000);
        let (_, fired) = r.observe(10);
        assert!(fired);
    }

    #[test]
    fn reminder_without_threshold_never_fires() {
        let r = Reminder {
            threshold: None,
            armed: true,
        };
        let (r, fired) = r.observe(-5);
        assert!(!fired);
        assert!(!r.armed);
    }

    proptest! {
        #[test]
        fn prop_reminder_fires_at_each_downward_crossing(
            threshold in 0_i64..100,
            initial in 0_i64..200,
            seq in prop::collection::vec(0_i64..200, 0..40),
        ) {
            let mut r = Reminder::new(Some(threshold), initial);
            let mut prev = initial;
            let mut events = 0;
            let mut crossings = 0;
            for &a in &seq {
                let (next, fired) = r.observe(a);
                let crossing = prev >= threshold && a < threshold;
                prop_assert_eq!(fired, crossing, "prev {} now {}", prev, a);
                prop_assert_eq!(next.armed, a >= threshold);
                events += i32::from(fired);
                crossings += i32::from(crossing);
                r = next;
                prev = a;
            }
            prop_assert_eq!(events, crossings);
        }
    }
}
