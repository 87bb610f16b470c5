//! The send rules: what a send (ChargeMailing, ReserveCredits) and a capture do to one locked
//! account, with no IO. The send use cases ([`super::sends`]) and group commit
//! ([`super::group_commit`]) both apply them, so a send in a batch and a send alone follow the
//! same rules.

use chrono::{DateTime, Duration, Utc};
use shared::RatingRule;

use crate::{
    account::Account,
    domain::{self, TopUpPlan},
    error::WalletError,
    model::{
        EntryKind, FundingMode, MailingCharged, PurchaseRecord, ReservationRecord,
        ReservationStatus, SendDone,
    },
};

/// Default lifetime of a hold.
pub const DEFAULT_HOLD_TTL_SECONDS: u32 = 24 * 3600;
/// Longest lifetime of a hold.
pub const MAX_HOLD_TTL_SECONDS: u32 = 30 * 24 * 3600;

/// Something a send needs credits for.
#[derive(Debug, Clone)]
pub enum Spend {
    /// Debit at once (ChargeMailing).
    Charge {
        /// The mailing.
        mailing_id: String,
        /// Its recipients.
        recipients: u64,
    },
    /// Hold (ReserveCredits).
    Hold {
        /// The mailing.
        mailing_id: String,
        /// Its recipients.
        recipients: u64,
        /// Lifetime of the hold.
        ttl_seconds: u32,
    },
}

impl Spend {
    pub(crate) fn recipients(&self) -> u64 {
        match self {
            Spend::Charge { recipients, .. } | Spend::Hold { recipients, .. } => *recipients,
        }
    }
}

/// The credits a mailing needs (C2).
pub(crate) fn rate(rule: &RatingRule, recipients: u64) -> Result<i64, WalletError> {
    rule.credits_for(recipients)
        .map(|c| c.get())
        .map_err(|e| WalletError::invalid("recipients", e.to_string()))
}

/// The hold `reservation_id` as read from its wallet, if it can still be captured or released.
/// A hold lapsed by this transaction's housekeeping is still 'active' in the table: its expiry
/// decides.
pub(crate) fn active_hold(
    held: Option<ReservationRecord>,
    reservation_id: &str,
    now: DateTime<Utc>,
) -> Result<ReservationRecord, WalletError> {
    let r = held.ok_or_else(|| WalletError::ReservationNotFound(reservation_id.to_string()))?;
    if r.status != ReservationStatus::Active || r.expires_at <= now {
        let status = if r.status == ReservationStatus::Active {
            ReservationStatus::Expired
        } else {
            r.status
        };
        return Err(WalletError::Precondition(format!(
            "reservation {} is {}, not active",
            shared::limits::quoted(reservation_id),
            status.as_str()
        )));
    }
    Ok(r)
}

/// Captures hold `r` on its locked account: releases what it held and debits what was sent
/// (which may be more or less). A refusal changes nothing.
pub(crate) fn capture_hold(
    acct: &mut Account,
    mut r: ReservationRecord,
    recipients_sent: u64,
) -> Result<ReservationRecord, WalletError> {
    let credits = if recipients_sent == 0 {
        0
    } else {
        rate(&acct.wallet.rating, recipients_sent)?
    };
    let before_held = acct.wallet.held;
    acct.wallet.held -= r.credits;
    if credits > 0
        && let Err(shortfall) = acct.debit(
            credits,
            EntryKind::ReservationCapture,
            format!("reservation:{}", r.reservation_id),
            format!(
                "mailing {}: {recipients_sent} recipients sent",
                r.mailing_id
            ),
        )
    {
        acct.wallet.held = before_held;
        return Err(WalletError::Insufficient {
            shortfall,
            top_up: None,
        });
    }
    r.status = ReservationStatus::Captured;
    r.captured_credits = credits;
    acct.update_reservation(r.clone());
    Ok(r)
}

/// A refusal of `spend` that does not depend on the credits it needs, if any.
pub(crate) fn refuse_send(acct: &Account, spend: &Spend) -> Option<WalletError> {
    if let Spend::Hold { .. } = spend
        && acct.wallet.funding == FundingMode::OnDemand
    {
        return Some(WalletError::Precondition(
            "on-demand wallets are charged when the mailing is sent: use ChargeMailing".into(),
        ));
    }
    (acct.wallet.debt > 0).then(|| WalletError::Debt(acct.wallet.debt))
}

/// What a send of `needed` credits must buy first: the shortfall by auto top-up (C5, C6) on a
/// prepaid wallet, or the whole shortfall on demand (C9).
pub(crate) fn top_up_plan(acct: &Account, needed: i64) -> TopUpPlan {
    let available = acct.available();
    match acct.wallet.funding {
        FundingMode::Prepaid => domain::plan_top_up_for_send(
            &acct.wallet.top_up,
            available,
            needed,
            acct.auto_bought_this_month,
        ),
        FundingMode::OnDemand if needed <= available => TopUpPlan::NotNeeded,
        FundingMode::OnDemand => TopUpPlan::Buy(needed - available),
    }
}

/// Debits a charge (C2) or places a hold of `needed` credits on the locked account, and
/// returns what it did; a refusal changes nothing. `purchase` is what bought credits
/// for this send, if anything did.
pub(crate) fn apply_send(
    acct: &mut Account,
    spend: &Spend,
    needed: i64,
    purchase: Option<&PurchaseRecord>,
) -> Result<SendDone, WalletError> {
    match spend {
        Spend::Charge {
            mailing_id,
            recipients,
        } => {
            let entry = acct
                .debit(
                    needed,
                    EntryKind::Mailing,
                    format!("mailing:{mailing_id}"),
                    format!("{recipients} recipients"),
                )
                .map_err(|shortfall| WalletError::Insufficient {
                    shortfall,
                    top_up: None,
                })?;
            Ok(SendDone::Charged(Box::new(MailingCharged {
                charge_id: format!("{}:{}", acct.wallet.wallet_id, entry.seq),
                wallet_id: acct.wallet.wallet_id.clone(),
                mailing_id: mailing_id.clone(),
                recipients: *recipients,
                credits: needed,
                purchase: purchase.cloned(),
                balance_after: acct.wallet.balance,
                available_after: acct.available(),
            })))
        }
        Spend::Hold {
            mailing_id,
            ttl_seconds,
            ..
        } => {
            let available = acct.available();
            if available < needed {
                return Err(WalletError::Insufficient {
                    shortfall: domain::Shortfall {
                        available,
                        needed,
                        shortfall: needed - available,
                    },
                    top_up: None,
                });
            }
            let r = ReservationRecord {
                reservation_id: format!("res_{}", uuid::Uuid::now_v7().simple()),
                wallet_id: acct.wallet.wallet_id.clone(),
                mailing_id: mailing_id.clone(),
                credits: needed,
                status: ReservationStatus::Active,
                expires_at: acct.now + Duration::seconds(i64::from(*ttl_seconds)),
                captured_credits: 0,
            };
            acct.add_reservation(r.clone());
            Ok(SendDone::Hold(acct.hold_changed(r)))
        }
    }
}
