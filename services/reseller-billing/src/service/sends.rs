//! Routed sends (ChargeMailing, ReserveMailing) and their holds (CaptureMailing,
//! ReleaseMailing). A routed send runs in three steps, like a purchase in the wallet:
//!
//! 1. a transaction locks the customer, decides who pays (W1), checks the partner's cap on the
//!    customer, and records the routing under the caller's idempotency key;
//! 2. the wallet is called with a key derived from the caller's, so it debits once however
//!    often this step runs;
//! 3. a transaction records the outcome and the response under the caller's key.
//!
//! A crash or an unreachable wallet between the steps leaves the routing `pending`: a retry
//! with the same key goes to the same wallet with the same wallet key and completes.

use proto::wallet::v1::{self as wpb};
use runtime::idempotency::IdempotencyKey;

use super::{Answer, Resellers};
use crate::{
    error::ResellerError,
    model::{HoldStatus, Outcome, RoutedHold, RoutedRecord},
    routing::{Route, SendOp, SendRequest, complete},
    store,
    wallet::wallet_key,
};

impl Resellers {
    /// ChargeMailing and ReserveMailing (W2, W3, W5): route, then debit or hold at the payer.
    ///
    /// Steps 1 and 3 run in [`super::group_commit::SendSteps`]: with group commit on
    /// ([`super::group_commit`]), those of sends arriving together share their transactions.
    ///
    /// The answer is the response as recorded under the key (a `RoutedCharge` or a
    /// `RoutedReservation`, encoded once by [`crate::convert::send_answer`]), for the first
    /// attempt and every retry alike.
    pub async fn route_send(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        customer_id: &str,
        mailing_id: &str,
        recipients: u64,
        send: SendOp,
    ) -> Result<Vec<u8>, ResellerError> {
        let request = SendRequest {
            key: key.clone(),
            partner_id: partner_id.to_string(),
            customer_id: customer_id.to_string(),
            mailing_id: mailing_id.to_string(),
            recipients,
            send,
        };
        // Step 1: decide and record who pays (or find the decision of an earlier attempt).
        let routed = match self.sends.route(&request).await? {
            Route::Answered(bytes) => return Ok(bytes),
            Route::Routed(r) => *r,
        };

        // Step 2: the wallet, with a key derived from the caller's.
        let outcome = match self.call_wallet(&request, &routed).await {
            // Nothing known to have happened: keep the routing pending for the retry.
            Err(e) if e.is_wallet_unreachable() => return Err(e),
            known => known,
        };

        // Step 3: complete the routing and record the answer under the caller's key.
        self.sends
            .complete(&request.key, complete(routed, recipients, outcome))
            .await
    }

    async fn call_wallet(
        &self,
        r: &SendRequest,
        routed: &RoutedRecord,
    ) -> Result<Outcome, ResellerError> {
        let wallet_key = routed
            .former_wallet_key
            .clone()
            .unwrap_or_else(|| wallet_key(r.key.key(), "send"));
        match r.send {
            SendOp::Charge => self
                .wallet
                .charge(wpb::ChargeMailingRequest {
                    idempotency_key: wallet_key,
                    wallet_id: routed.payer_wallet_id.clone(),
                    mailing_id: routed.mailing_id.clone(),
                    recipients: r.recipients,
                })
                .await
                .map(Outcome::Charged),
            SendOp::Hold { ttl_seconds } => self
                .wallet
                .reserve(wpb::ReserveCreditsRequest {
                    idempotency_key: wallet_key,
                    wallet_id: routed.payer_wallet_id.clone(),
                    mailing_id: routed.mailing_id.clone(),
                    recipients: r.recipients,
                    ttl_seconds,
                })
                .await
                .map(Outcome::Held),
        }
    }

    /// CaptureMailing / ReleaseMailing: the hold's own wallet, whatever the billing mode is now.
    pub async fn settle_hold(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        customer_id: &str,
        reservation_id: &str,
        capture: Option<u64>,
    ) -> Result<Answer<RoutedHold>, ResellerError> {
        let mut tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        let routed = store::routed_by_reservation(&mut tx, reservation_id)
            .await?
            .filter(|r| r.partner_id == partner_id && r.customer_id == customer_id)
            .ok_or_else(|| ResellerError::ReservationNotFound(reservation_id.to_string()))?;
        tx.rollback().await?;
        let wallet_key = wallet_key(key.key(), "settle");
        let reservation = match capture {
            Some(recipients_sent) => {
                self.wallet
                    .capture(wpb::CaptureReservationRequest {
                        idempotency_key: wallet_key,
                        wallet_id: routed.payer_wallet_id.clone(),
                        reservation_id: reservation_id.to_string(),
                        recipients_sent,
                    })
                    .await?
            }
            None => {
                self.wallet
                    .release(wpb::ReleaseReservationRequest {
                        idempotency_key: wallet_key,
                        wallet_id: routed.payer_wallet_id.clone(),
                        reservation_id: reservation_id.to_string(),
                    })
                    .await?
            }
        };
        let mut tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        let mut routed = routed;
        if capture.is_some() {
            routed.reservation_status = Some(HoldStatus::Captured);
            routed.credits = i64::try_from(reservation.captured_credits).unwrap_or(0);
            routed.recipients = i64::try_from(capture.unwrap_or(0)).unwrap_or(0);
        } else {
            routed.reservation_status = Some(HoldStatus::Released);
        }
        store::update_routed(&mut tx, &routed).await?;
        let response = RoutedHold {
            routed,
            reservation,
        };
        self.finish(tx, key, response).await
    }
}
