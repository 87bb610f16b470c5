//! The send use cases: RateMailing (C2), ChargeMailing and ReserveCredits (C2, C5, C9),
//! CaptureReservation and ReleaseReservation. A send or a capture first tries group commit when the caller has one
//! ([`GroupCommit`]: try the batch, else alone); alone, it runs here in its own transactions,
//! with a payment between them when it must buy credits. Both paths apply [`super::send_rules`].

use runtime::{convert::Answer, idempotency::IdempotencyKey};
use sqlx::{Any, Transaction};

use super::{
    BegunSend, Locked, Wallets,
    group_commit::{self, Batched, GroupCommit, Op},
    purchases::{apply_outcome, fixed_top_up_after, new_purchase, price},
    send_rules::{Spend, active_hold, apply_send, capture_hold, rate, refuse_send, top_up_plan},
};
use crate::{
    account::Account,
    convert,
    domain::{self, TopUpPlan},
    error::WalletError,
    model::{
        FundingMode, HoldChanged, MailingRated, PurchaseRecord, PurchaseStatus, PurchaseTrigger,
        ReservationStatus, SendAnswer, SendDone,
    },
    store,
};

impl Wallets {
    /// RateMailing (C2).
    pub async fn rate(
        &self,
        wallet_id: &str,
        recipients: u64,
    ) -> Result<MailingRated, WalletError> {
        let acct = self.read_account(wallet_id).await?;
        let credits = rate(&acct.wallet.rating, recipients)?;
        let available = acct.available();
        Ok(MailingRated {
            recipients,
            credits,
            covered: credits <= available && acct.wallet.debt == 0,
            available,
        })
    }

    /// ChargeMailing (C2, C5, C9) and ReserveCredits: the credits a send needs, paid from the
    /// wallet, bought for the shortfall, or bought on demand.
    ///
    /// With `group` (group commit on), the send first joins a batch ([`GroupCommit`]): sends
    /// paid from the balance commit together. A send the batch does not take (one that must buy
    /// credits, a duplicate key, a failed batch) runs here alone, as it would without batching.
    pub async fn spend(
        &self,
        group: Option<&GroupCommit>,
        key: &IdempotencyKey,
        wallet_id: &str,
        spend: Spend,
    ) -> Result<SendAnswer, WalletError> {
        if let Some(group) = group {
            match group.submit(key, wallet_id, Op::Spend(spend.clone())).await {
                Batched::Done(answer) => return answer,
                Batched::Alone => {}
            }
        }
        self.spend_alone(key, wallet_id, spend).await
    }

    /// Runs `sends` as one batch (what a group-commit collector does with the sends it finds
    /// waiting), then each send the batch did not take alone; one answer per send, in order,
    /// encoded as it is recorded under its key.
    pub async fn spend_together(
        &self,
        sends: Vec<(IdempotencyKey, String, Spend)>,
    ) -> Vec<Result<Vec<u8>, WalletError>> {
        let ops = sends
            .iter()
            .map(|(key, wallet_id, spend)| {
                (key.clone(), wallet_id.clone(), Op::Spend(spend.clone()))
            })
            .collect();
        let answers = group_commit::run_now(self, ops).await;
        let mut out = Vec::with_capacity(answers.len());
        for ((key, wallet_id, spend), answer) in sends.into_iter().zip(answers) {
            let answer = match answer {
                Batched::Done(r) => r,
                Batched::Alone => self.spend_alone(&key, &wallet_id, spend).await,
            };
            out.push(answer.map(convert::send_answer_bytes));
        }
        out
    }

    pub(crate) async fn spend_alone(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
        spend: Spend,
    ) -> Result<SendAnswer, WalletError> {
        // Phase 1: pay from the wallet, refuse, or record the purchase the send needs.
        let mut tx = match self.begin_bytes(key).await? {
            BegunSend::Replay(r) => return Self::replayed(r).map(SendAnswer::Replayed),
            BegunSend::Fresh(tx) => tx,
        };
        let acct = Account::lock(&mut tx, &self.db, wallet_id, self.now()).await?;
        let needed = rate(&acct.wallet.rating, spend.recipients())?;
        let before = acct.clone();
        if let Some(err) = refuse_send(&acct, &spend) {
            return self.refuse(tx, before, key, err).await;
        }
        let purchase = match store::purchase_by_origin(&mut tx, key.key()).await? {
            Some(p) => Some(p),
            None => {
                let plan = top_up_plan(&acct, needed);
                match plan {
                    TopUpPlan::NotNeeded => None,
                    TopUpPlan::Refused { shortfall, reason } => {
                        let err = WalletError::Insufficient {
                            shortfall,
                            top_up: Some(reason),
                        };
                        return self.refuse(tx, before, key, err).await;
                    }
                    TopUpPlan::Buy(credits) => {
                        let trigger = match (acct.wallet.funding, acct.wallet.top_up.mode) {
                            (FundingMode::OnDemand, _) => PurchaseTrigger::OnDemand,
                            (_, domain::AutoTopUpMode::Fixed { .. }) => PurchaseTrigger::AutoFixed,
                            _ => PurchaseTrigger::AutoShortfall,
                        };
                        if acct.wallet.payment_method.is_empty() {
                            return self
                                .refuse(
                                    tx,
                                    before,
                                    key,
                                    WalletError::Precondition(
                                        "credits must be bought for this send but no payment method is on file".into(),
                                    ),
                                )
                                .await;
                        }
                        let amount = price(&acct.wallet.pricing, credits)?;
                        let method = acct.wallet.payment_method.clone();
                        let p = new_purchase(
                            &acct,
                            Some(key.key()),
                            trigger,
                            credits,
                            amount,
                            method,
                            None,
                        );
                        store::insert_purchase(&mut tx, &p, acct.now).await?;
                        Some(p)
                    }
                }
            }
        };

        let Some(purchase) = purchase else {
            return self
                .complete_spend(tx, acct, key, &spend, needed, None)
                .await;
        };
        if purchase.status != PurchaseStatus::Processing {
            // Finished earlier (by the reconciler, or before a crash): spend with it.
            return self
                .complete_spend(tx, acct, key, &spend, needed, Some(purchase))
                .await;
        }
        // From before the commit that shows the purchase to the reconciler.
        let paying = self.paying_for_request(&purchase);
        acct.save(&mut tx).await?;
        tx.commit().await?;

        // Phase 2: the gateway, outside any transaction.
        let outcome = self.pay(&purchase).await;
        drop(paying);

        // Phase 3: apply the outcome and spend, under the wallet's lock again.
        let mut tx = match self.begin_bytes(key).await? {
            BegunSend::Replay(r) => return Self::replayed(r).map(SendAnswer::Replayed),
            BegunSend::Fresh(tx) => tx,
        };
        let mut acct = Account::lock(&mut tx, &self.db, wallet_id, self.now()).await?;
        let mut p = store::purchase(&mut tx, &purchase.purchase_id)
            .await?
            .ok_or_else(|| runtime::db::DbError::Corrupt("purchase vanished".into()))?;
        apply_outcome(&mut tx, &mut acct, &mut p, &outcome).await?;
        self.complete_spend(tx, acct, key, &spend, needed, Some(p))
            .await
    }

    async fn complete_spend(
        &self,
        mut tx: Transaction<'static, Any>,
        mut acct: Account,
        key: &IdempotencyKey,
        spend: &Spend,
        needed: i64,
        purchase: Option<PurchaseRecord>,
    ) -> Result<SendAnswer, WalletError> {
        match purchase.as_ref().map(|p| p.status) {
            Some(PurchaseStatus::Failed | PurchaseStatus::Returned) => {
                let reason = purchase.map(|p| p.failure_reason).unwrap_or_default();
                return self
                    .refuse(tx, acct.clone(), key, WalletError::PaymentDeclined(reason))
                    .await;
            }
            Some(PurchaseStatus::Processing) => {
                acct.save(&mut tx).await?;
                tx.commit().await?;
                self.platform.outbox.poke();
                return Err(WalletError::PaymentOutcomeUnknown);
            }
            _ => {}
        }
        let before = acct.clone();
        let done = match apply_send(&mut acct, spend, needed, purchase.as_ref()) {
            Ok(done) => done,
            Err(err) => return self.refuse(tx, before, key, err).await,
        };
        let follow_up = match spend {
            Spend::Charge { .. } => fixed_top_up_after(&mut tx, &mut acct).await?,
            Spend::Hold { .. } => None,
        };
        self.finish_send(tx, acct, key, done, follow_up).await
    }

    /// CaptureReservation: debit what was sent, release the rest.
    ///
    /// With `group` (group commit on), the capture joins a batch like a send ([`GroupCommit`]).
    pub async fn capture(
        &self,
        group: Option<&GroupCommit>,
        key: &IdempotencyKey,
        wallet_id: &str,
        reservation_id: &str,
        recipients_sent: u64,
    ) -> Result<SendAnswer, WalletError> {
        if let Some(group) = group {
            let op = Op::Capture {
                reservation_id: reservation_id.to_string(),
                recipients_sent,
            };
            if let Batched::Done(answer) = group.submit(key, wallet_id, op).await {
                return answer;
            }
        }
        self.capture_alone(key, wallet_id, reservation_id, recipients_sent)
            .await
    }

    pub(crate) async fn capture_alone(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
        reservation_id: &str,
        recipients_sent: u64,
    ) -> Result<SendAnswer, WalletError> {
        let mut tx = match self.begin_bytes(key).await? {
            BegunSend::Replay(r) => return Self::replayed(r).map(SendAnswer::Replayed),
            BegunSend::Fresh(tx) => tx,
        };
        let mut acct = Account::lock(&mut tx, &self.db, wallet_id, self.now()).await?;
        let held = store::reservation(&mut tx, wallet_id, reservation_id).await?;
        let r = active_hold(held, reservation_id, acct.now)?;
        let before = acct.clone();
        let r = match capture_hold(&mut acct, r, recipients_sent) {
            Ok(r) => r,
            Err(err) if err.is_recorded_refusal() => {
                return self.refuse(tx, before, key, err).await;
            }
            Err(err) => return Err(err),
        };
        let follow_up = fixed_top_up_after(&mut tx, &mut acct).await?;
        let done = SendDone::Hold(acct.hold_changed(r));
        self.finish_send(tx, acct, key, done, follow_up).await
    }

    /// Saves `acct`, records what the send did (encoded) under `key`, commits, then drives
    /// the automatic purchase the send made due (C4), if any.
    async fn finish_send(
        &self,
        mut tx: Transaction<'static, Any>,
        acct: Account,
        key: &IdempotencyKey,
        done: SendDone,
        follow_up: Option<PurchaseRecord>,
    ) -> Result<SendAnswer, WalletError> {
        acct.save(&mut tx).await?;
        key.record_bytes(
            &mut tx,
            convert::send_done_bytes(&done),
            self.now().timestamp_micros(),
        )
        .await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        if let Some(p) = follow_up {
            self.drive_in_background(p);
        }
        Ok(SendAnswer::Done(done))
    }

    /// ReleaseReservation.
    pub async fn release(
        &self,
        key: &IdempotencyKey,
        wallet_id: &str,
        reservation_id: &str,
    ) -> Result<Answer<HoldChanged>, WalletError> {
        let (mut tx, mut acct) = match self.begin_on::<HoldChanged>(key, wallet_id).await? {
            Locked::Replay(r) => return Self::replayed(r),
            Locked::Fresh(tx, acct) => (tx, *acct),
        };
        let held = store::reservation(&mut tx, wallet_id, reservation_id).await?;
        let mut r = active_hold(held, reservation_id, acct.now)?;
        acct.wallet.held -= r.credits;
        r.status = ReservationStatus::Released;
        acct.update_reservation(r.clone());
        let answer = acct.hold_changed(r);
        self.finish(tx, acct, key, answer).await
    }
}
