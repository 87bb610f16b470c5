//! Whether an account may send (S2, S13, S14, S16, S18), and the trial's mails counted.

use runtime::idempotency::IdempotencyKey;
use sqlx::AnyConnection;

use crate::{
    domain::{self, SendingRefusal, SendingState, Status as SubStatus},
    error::SubError,
    model::{SendingDecision, SubscriptionRecord},
    store,
    unit::Unit,
};

use super::{Answer, Begun, Subscriptions};

impl Subscriptions {
    pub(super) async fn decision(
        &self,
        conn: &mut AnyConnection,
        sub: Option<&SubscriptionRecord>,
        mails: u64,
    ) -> Result<SendingDecision, SubError> {
        let now = self.now();
        let Some(sub) = sub else {
            return Ok(SendingDecision {
                refusal: Some(SendingRefusal::NoSubscription),
                trial_mails_left: 0,
            });
        };
        // What the jobs will record at the period or trial end counts from that instant.
        let mut status = sub.status;
        if status.is_live() && sub.cancel_at_period_end && now >= sub.period_end {
            status = SubStatus::Cancelled;
        }
        if status == SubStatus::Trialing
            && sub.trial_ends_at.is_some_and(|t| now >= t)
            && !store::account(conn, &sub.account_id).await?.verified
        {
            status = SubStatus::TrialExpired;
        }
        let free = sub.trial.map_or(0, |t| t.free_mails);
        let left = if status == SubStatus::Trialing && free > 0 {
            free.saturating_sub(sub.trial_mails_sent)
        } else {
            0
        };
        let state = SendingState {
            status,
            trial_mails_sent: sub.trial_mails_sent,
            trial_free_mails: free,
            unpaid_bank_transfer: store::has_unpaid_bank_transfer(conn, &sub.account_id).await?,
            returned_debit: store::has_returned_debit(conn, &sub.account_id).await?,
        };
        Ok(SendingDecision {
            refusal: domain::may_send(&state, mails).err(),
            trial_mails_left: left,
        })
    }

    /// CheckSending (S2, S13, S14, S16, S18).
    pub async fn check_sending(
        &self,
        account_id: &str,
        mails: u64,
    ) -> Result<SendingDecision, SubError> {
        let mut conn = self.conn().await?;
        let sub = store::read_subscription(&mut conn, account_id).await?;
        self.decision(&mut conn, sub.as_ref(), mails).await
    }

    /// RecordMailsSent (S14): counts against the trial's free mails.
    pub async fn record_mails_sent(
        &self,
        key: &IdempotencyKey,
        account_id: &str,
        mails: u64,
    ) -> Result<Answer<SendingDecision>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        if unit.sub.status == SubStatus::Trialing {
            unit.sub.trial_mails_sent = unit.sub.trial_mails_sent.saturating_add(mails);
        }
        let sub = unit.save(&mut tx).await?;
        let decision = self.decision(&mut tx, Some(&sub), 0).await?;
        self.finish(tx, key, decision).await
    }
}
