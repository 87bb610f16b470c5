//! Whether an account may send now (S2, S13, S14, S16, S18).

use super::Status;

/// Why sending is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendingRefusal {
    /// No subscription.
    NoSubscription,
    /// S14: the trial's free mails are used up.
    TrialMailCap,
    /// S18: a bank-transfer invoice is unpaid.
    BankTransferUnpaid,
    /// S16: the trial ended without verification.
    TrialOverNotVerified,
    /// S13: cancelled and past the paid period.
    Cancelled,
    /// Renewal payment retries exhausted.
    PaymentPastDue,
    /// The first card payment is not through yet.
    PaymentPending,
    /// A direct debit came back and its invoice is unpaid (S18: sending waits for the money).
    PaymentReturned,
}

impl SendingRefusal {
    /// The message shown.
    pub fn message(self) -> &'static str {
        match self {
            SendingRefusal::NoSubscription => "the account has no subscription",
            SendingRefusal::TrialMailCap => "the trial's free mails are used up",
            SendingRefusal::BankTransferUnpaid => {
                "sending starts once the bank transfer for the open invoice is received"
            }
            SendingRefusal::TrialOverNotVerified => {
                "the trial is over and the account was not verified"
            }
            SendingRefusal::Cancelled => "the subscription was cancelled and its period is over",
            SendingRefusal::PaymentPastDue => "the renewal payment failed; sending is suspended",
            SendingRefusal::PaymentPending => "the first payment is not through yet",
            SendingRefusal::PaymentReturned => {
                "a direct debit was returned; sending resumes once the invoice is paid (e.g. after updating the payment method)"
            }
        }
    }
}

/// What the sending decision needs to know.
#[derive(Debug, Clone, Copy)]
pub struct SendingState {
    /// Status.
    pub status: Status,
    /// Mails sent in the trial.
    pub trial_mails_sent: u64,
    /// The trial's free mails (0 = no cap).
    pub trial_free_mails: u64,
    /// A bank-transfer invoice is open.
    pub unpaid_bank_transfer: bool,
    /// An invoice whose direct debit was returned is open.
    pub returned_debit: bool,
}

/// May the account send `mails` now (S2: a paid subscription sends without limit; S14, S16,
/// S18 and payment problems refuse).
pub fn may_send(state: &SendingState, mails: u64) -> Result<(), SendingRefusal> {
    match state.status {
        Status::TrialExpired => return Err(SendingRefusal::TrialOverNotVerified),
        Status::Cancelled => return Err(SendingRefusal::Cancelled),
        Status::Suspended => return Err(SendingRefusal::PaymentPastDue),
        Status::Incomplete => return Err(SendingRefusal::PaymentPending),
        Status::Trialing => {
            if state.trial_free_mails > 0
                && state.trial_mails_sent.saturating_add(mails) > state.trial_free_mails
            {
                return Err(SendingRefusal::TrialMailCap);
            }
        }
        Status::Active | Status::PastDue => {}
    }
    // S18 for debits: a pending debit sends at once like a card (as the wallet's on-demand
    // debits do, C9); one that came back is money not received, like an unpaid transfer.
    if state.returned_debit {
        return Err(SendingRefusal::PaymentReturned);
    }
    if state.unpaid_bank_transfer {
        return Err(SendingRefusal::BankTransferUnpaid);
    }
    Ok(())
}
