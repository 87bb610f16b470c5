//! Invoices: list, read, a bank transfer received (S18), a new payment method for the open ones.

use runtime::idempotency::IdempotencyKey;
use serde_json::json;
use shared::Money;

use crate::{
    domain::Status as SubStatus,
    error::SubError,
    model::{InvoiceRecord, InvoiceStatus, PaymentKind, PaymentMethodUpdated},
    store,
    unit::Unit,
};

use super::{Actor, Answer, Begun, Subscriptions, signup::PaymentChoice};

impl Subscriptions {
    /// ListInvoices.
    pub async fn list_invoices(&self, account_id: &str) -> Result<Vec<InvoiceRecord>, SubError> {
        let mut conn = self.conn().await?;
        Ok(store::invoices_of(&mut conn, account_id).await?)
    }

    /// GetInvoice.
    pub async fn get_invoice(&self, invoice_id: &str) -> Result<InvoiceRecord, SubError> {
        let mut conn = self.conn().await?;
        store::invoice(&mut conn, &self.db, invoice_id, false)
            .await?
            .ok_or_else(|| SubError::InvoiceNotFound(invoice_id.to_string()))
    }

    /// RecordBankTransfer (S18): the money for an open bank-transfer invoice arrived.
    pub async fn record_bank_transfer(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        invoice_id: &str,
        amount: Money,
    ) -> Result<Answer<InvoiceRecord>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let found = store::invoice(&mut tx, &self.db, invoice_id, false)
            .await?
            .ok_or_else(|| SubError::InvoiceNotFound(invoice_id.to_string()))?;
        let mut unit = Unit::lock(&mut tx, &self.db, &found.account_id, self.now()).await?;
        let mut invoice = store::invoice(&mut tx, &self.db, invoice_id, true)
            .await?
            .ok_or_else(|| SubError::InvoiceNotFound(invoice_id.to_string()))?;
        if invoice.status != InvoiceStatus::Open
            || invoice.payment_kind != PaymentKind::BankTransfer
        {
            return Err(SubError::Precondition(format!(
                "invoice {} is {} and paid by {}: no bank transfer is awaited",
                invoice.number,
                invoice.status.as_str(),
                invoice.payment_kind.as_str()
            )));
        }
        if amount != invoice.total {
            return Err(SubError::invalid(
                "amount",
                format!("the invoice total is {}", invoice.total),
            ));
        }
        invoice.status = InvoiceStatus::Paid;
        invoice.paid_at = Some(unit.now);
        store::update_invoice_payment(&mut tx, &invoice).await?;
        unit.record(
            &actor.0,
            "bank_transfer_received",
            format!("invoice {} paid: {}", invoice.number, invoice.total),
        );
        unit.event(
            "subscription.invoice_paid",
            json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
        );
        unit.save(&mut tx).await?;
        self.finish(tx, key, invoice).await
    }

    /// UpdatePaymentMethod (S5): the new method pays from now on, open invoices included; with a
    /// card or mandate they are collected at once, so a past-due or suspended subscription is
    /// active (and sends) again as soon as it pays.
    pub async fn update_payment_method(
        &self,
        key: &IdempotencyKey,
        actor: &Actor,
        account_id: &str,
        payment: PaymentChoice,
    ) -> Result<Answer<PaymentMethodUpdated>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, now).await?;
        if !(unit.sub.status.is_live() || unit.sub.status == SubStatus::Trialing) {
            return Err(SubError::Precondition(format!(
                "the subscription is {}: there is nothing to pay",
                unit.sub.status.as_str()
            )));
        }
        if unit.sub.pending_op.is_some() {
            return Err(SubError::Precondition(
                "a payment of this subscription is in flight; try again shortly".into(),
            ));
        }
        unit.sub.payment_kind = payment.kind;
        unit.sub.payment_method = payment.method.clone();
        let open = store::open_invoices(&mut tx, &unit.sub.subscription_id).await?;
        if let Some(busy) = open
            .iter()
            .find(|i| i.gateway_key == format!("{}:{}", i.invoice_id, i.payment_attempts + 1))
        {
            return Err(SubError::Precondition(format!(
                "the payment of invoice {} is being confirmed with the gateway; try again shortly",
                busy.number
            )));
        }
        for invoice in &open {
            let mut invoice = invoice.clone();
            invoice.payment_kind = payment.kind;
            invoice.payment_method = payment.method.clone();
            invoice.next_attempt_at = payment.kind.charged_by_gateway().then_some(now);
            store::update_invoice_payment(&mut tx, &invoice).await?;
        }
        unit.record(
            &actor.0,
            "payment_method_changed",
            format!(
                "paying by {}; {} open invoice(s) moved to it",
                payment.kind.as_str(),
                open.len()
            ),
        );
        unit.event(
            "subscription.payment_method_changed",
            json!({"payment": payment.kind.as_str(), "open_invoices": open.len()}),
        );
        unit.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        // Collected now, outside any transaction (the jobs would on their next run).
        if payment.kind.charged_by_gateway() {
            for invoice in &open {
                if let Err(e) = self.collect(&invoice.invoice_id).await {
                    tracing::warn!(invoice = %invoice.invoice_id, error = %e, "collecting with the new payment method failed; the jobs retry");
                }
            }
        }
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let sub = store::read_subscription(&mut tx, account_id)
            .await?
            .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
        let mut invoices = Vec::with_capacity(open.len());
        for invoice in &open {
            if let Some(i) = store::invoice(&mut tx, &self.db, &invoice.invoice_id, false).await? {
                invoices.push(i);
            }
        }
        let updated = PaymentMethodUpdated {
            subscription: self.view(&mut tx, &sub).await?,
            invoices,
        };
        self.finish(tx, key, updated).await
    }
}
