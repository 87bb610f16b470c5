//! The service clock: the system clock, or a frozen test clock that only an explicit call moves
//! forward (like Stripe's test clocks). Period ends, expiries, trials and key retention all read
//! this clock, never `Utc::now()` directly, so tests can cross a month in a millisecond.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// Why the clock refused to move.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClockError {
    /// The service runs on the system clock.
    #[error("this service runs on the system clock; start it with test_clock = true to move time")]
    NotTestClock,
    /// Time only moves forward.
    #[error("the test clock only moves forward: it is {now}, cannot go back to {requested}")]
    Backwards {
        /// The clock's time.
        now: DateTime<Utc>,
        /// The time asked for.
        requested: DateTime<Utc>,
    },
}

#[derive(Debug)]
enum Source {
    System,
    Test(watch::Sender<DateTime<Utc>>),
}

/// A cheap-to-clone handle on the service's clock.
#[derive(Debug, Clone)]
pub struct ServiceClock {
    source: Arc<Source>,
}

impl ServiceClock {
    /// The system clock.
    pub fn system() -> Self {
        Self {
            source: Arc::new(Source::System),
        }
    }

    /// A test clock frozen at `start`.
    pub fn test(start: DateTime<Utc>) -> Self {
        let (tx, _) = watch::channel(start);
        Self {
            source: Arc::new(Source::Test(tx)),
        }
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match &*self.source {
            Source::System => Utc::now(),
            Source::Test(tx) => *tx.borrow(),
        }
    }

    /// The current time as microseconds since the epoch (the storage representation).
    pub fn now_micros(&self) -> i64 {
        self.now().timestamp_micros()
    }

    /// Whether this is a test clock.
    pub fn is_test(&self) -> bool {
        matches!(&*self.source, Source::Test(_))
    }

    /// Moves a test clock forward to `to` (a no-op when it is already there).
    pub fn advance_to(&self, to: DateTime<Utc>) -> Result<DateTime<Utc>, ClockError> {
        match &*self.source {
            Source::System => Err(ClockError::NotTestClock),
            Source::Test(tx) => {
                let now = *tx.borrow();
                if to < now {
                    return Err(ClockError::Backwards { now, requested: to });
                }
                tx.send_replace(to);
                Ok(to)
            }
        }
    }

    /// A receiver that changes whenever the test clock moves (never, for the system clock):
    /// background jobs wait on it as well as on their interval.
    pub fn subscribe(&self) -> Option<watch::Receiver<DateTime<Utc>>> {
        match &*self.source {
            Source::System => None,
            Source::Test(tx) => Some(tx.subscribe()),
        }
    }
}

/// Converts stored microseconds back to an instant.
pub fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn test_clock_is_frozen_and_only_moves_forward() {
        let start = Utc.with_ymd_and_hms(2026, 1, 31, 12, 0, 0).unwrap();
        let clock = ServiceClock::test(start);
        assert_eq!(clock.now(), start);
        let later = Utc.with_ymd_and_hms(2026, 2, 28, 12, 0, 0).unwrap();
        assert_eq!(clock.advance_to(later).unwrap(), later);
        assert_eq!(clock.advance_to(later).unwrap(), later, "idempotent");
        assert!(matches!(
            clock.advance_to(start),
            Err(ClockError::Backwards { .. })
        ));
        assert_eq!(clock.now(), later);
    }

    #[test]
    fn system_clock_refuses_to_move() {
        let clock = ServiceClock::system();
        assert_eq!(clock.advance_to(Utc::now()), Err(ClockError::NotTestClock));
        assert!(clock.subscribe().is_none());
    }
}
