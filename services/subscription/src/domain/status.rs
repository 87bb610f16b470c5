//! A subscription's status.

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// In its free trial.
    Trialing,
    /// Paid and running.
    Active,
    /// A renewal payment failed; retries follow.
    PastDue,
    /// Retries exhausted: sending suspended.
    Suspended,
    /// Cancelled and past its period.
    Cancelled,
    /// S16: trial over without verification or payment.
    TrialExpired,
    /// First card payment in flight.
    Incomplete,
}

impl Status {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Trialing => "trialing",
            Status::Active => "active",
            Status::PastDue => "past_due",
            Status::Suspended => "suspended",
            Status::Cancelled => "cancelled",
            Status::TrialExpired => "trial_expired",
            Status::Incomplete => "incomplete",
        }
    }

    /// Parses the stored text.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "trialing" => Status::Trialing,
            "active" => Status::Active,
            "past_due" => Status::PastDue,
            "suspended" => Status::Suspended,
            "cancelled" => Status::Cancelled,
            "trial_expired" => Status::TrialExpired,
            "incomplete" => Status::Incomplete,
            _ => return None,
        })
    }

    /// Whether the subscription renews and may be changed.
    pub fn is_live(self) -> bool {
        matches!(self, Status::Active | Status::PastDue | Status::Suspended)
    }
}
