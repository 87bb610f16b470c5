//! Payments whose outcome the service does not know yet: a request's payment the client
//! stopped waiting for, a direct debit not settled at the bank.

use shared::ChargeStatus;

use crate::{
    error::SubError,
    model::{InvoiceStatus, PaymentPurpose},
    store,
    unit::Unit,
};

use super::{
    Subscriptions,
    payment::{Finished, PaymentOutcome},
};

/// How long a request's payment with an unknown outcome is left to the client's retry (with
/// the same idempotency key) before the jobs finish it themselves.
pub const RECONCILE_AFTER_SECONDS: i64 = 60;

impl Subscriptions {
    /// Finishes a request's payment whose outcome stayed unknown (the client never retried):
    /// the gateway again with the same key, then the outcome applied once under the lock, as
    /// the request would have. A later retry of the request gets this outcome.
    pub async fn reconcile_payment(&self, account_id: &str) -> Result<(), SubError> {
        let op = {
            let mut conn = self.conn().await?;
            match store::read_subscription(&mut conn, account_id).await? {
                Some(s) if s.payment_since.is_some() => s.payment_op,
                _ => None,
            }
        };
        let Some(op) = op.filter(|p| p.outcome.is_none()) else {
            return Ok(());
        };
        let outcome = self.charge_op(&op).await;
        if matches!(outcome, PaymentOutcome::Unknown) {
            return Ok(());
        }
        let mut tx = self.db.begin_write().await?;
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        let finished = match op.purpose {
            PaymentPurpose::Subscribe { .. } => {
                self.finish_subscribe(&mut tx, unit, &op, &outcome).await?
            }
            PaymentPurpose::Change { .. } => {
                let (finished, _) = self
                    .finish_change(&mut tx, &mut unit, &op, &outcome)
                    .await?;
                if !matches!(finished, Finished::Earlier) {
                    unit.save(&mut tx).await?;
                }
                finished
            }
        };
        if matches!(finished, Finished::Earlier) {
            tx.rollback().await?;
        } else {
            tracing::info!(account = %account_id, key = %op.gateway_key, "a payment with an unknown outcome was reconciled");
            tx.commit().await?;
            self.platform.outbox.poke();
        }
        Ok(())
    }

    /// Asks the gateway whether a pending direct debit settled or came back at the bank: the
    /// invoice is then paid, or open again with the subscription past due and sending refused
    /// until it is paid (S18); still pending (or unknown to the gateway), nothing changes.
    pub async fn poll_direct_debit(&self, invoice_id: &str) -> Result<(), SubError> {
        let invoice = {
            let mut conn = self.conn().await?;
            match store::invoice(&mut conn, &self.db, invoice_id, false).await? {
                Some(i) if i.status == InvoiceStatus::Pending => i,
                _ => return Ok(()),
            }
        };
        let outcome = match self.gateway.charge_status(&invoice.gateway_key).await {
            Ok(Some(record)) => match record.status {
                ChargeStatus::Succeeded => PaymentOutcome::Paid,
                ChargeStatus::Pending => return Ok(()),
                ChargeStatus::Returned => {
                    PaymentOutcome::Declined("the direct debit was returned by the bank".into())
                }
                ChargeStatus::Declined(reason) => PaymentOutcome::Declined(reason.to_string()),
            },
            // No record (e.g. another replica's provider session): never guess a return.
            Ok(None) | Err(_) => return Ok(()),
        };
        let mut tx = self.db.begin_write().await?;
        if self
            .apply_debit_outcome(&mut tx, &invoice.account_id, invoice_id, outcome)
            .await?
        {
            tx.commit().await?;
            self.platform.outbox.poke();
        } else {
            tx.rollback().await?;
        }
        Ok(())
    }
}
