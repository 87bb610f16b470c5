//! A partner's customers: adding, reading, listing and changing them (W1), their own wallets,
//! and credits allocated to them.

use proto::wallet::v1::{self as wpb};
use runtime::idempotency::IdempotencyKey;
use serde_json::json;
use sqlx::{Any, Transaction};

use super::{Answer, Resellers};
use crate::{
    convert::decode_stored,
    domain::{self, BillingMode},
    error::ResellerError,
    model::{Allocation, CustomerPage, CustomerRecord, CustomerView, PartnerRecord},
    store,
    wallet::wallet_key,
};

/// One change to a customer.
#[derive(Debug, Clone, Copy)]
pub enum CustomerChange {
    /// Suspend (true) or lift (false).
    Suspended(bool),
    /// W1.
    BillingMode(BillingMode),
    /// Monthly cap of partner credits (0 = none).
    Limit(i64),
}

impl Resellers {
    /// Opens the customer's own wallet (same prices and rating as its partner's). Only for a
    /// customer checked to be the partner's, under a key checked to be new: a refused request
    /// opens nothing.
    async fn open_customer_wallet(
        &self,
        key: &IdempotencyKey,
        partner: &PartnerRecord,
        customer_id: &str,
    ) -> Result<String, ResellerError> {
        let wallet_id = domain::customer_wallet_id(&partner.partner_id, customer_id);
        let opened = self
            .wallet
            .open(wpb::OpenWalletRequest {
                idempotency_key: wallet_key(key.key(), "open-customer"),
                wallet_id: wallet_id.clone(),
                currency: partner.currency.code().into(),
                pricing: Some(decode_stored(&partner.pricing)?),
                rating: Some(decode_stored(&partner.rating)?),
                signup_credits: 0,
                signup_credits_expire_at: None,
            })
            .await;
        match opened {
            // A wallet opened earlier for this customer (another request) is the one to use.
            Ok(_) => Ok(wallet_id),
            Err(ResellerError::Wallet(s)) if s.code() == tonic::Code::AlreadyExists => {
                Ok(wallet_id)
            }
            Err(e) => Err(e),
        }
    }

    /// The customer, checked to belong to `partner_id`, row-locked.
    async fn own_customer(
        &self,
        tx: &mut Transaction<'static, Any>,
        partner_id: &str,
        customer_id: &str,
    ) -> Result<CustomerRecord, ResellerError> {
        store::lock_customer(tx, &self.db, partner_id, customer_id)
            .await?
            .ok_or_else(|| ResellerError::CustomerNotFound {
                partner: partner_id.to_string(),
                customer: customer_id.to_string(),
            })
    }

    async fn customer_view(
        &self,
        conn: &mut sqlx::AnyConnection,
        customer: CustomerRecord,
    ) -> Result<CustomerView, ResellerError> {
        let (start, _) = domain::month_of(self.now());
        let used_this_month = store::partner_credits_used_since(
            conn,
            &customer.partner_id,
            &customer.customer_id,
            start,
        )
        .await?;
        Ok(CustomerView {
            customer,
            used_this_month,
        })
    }

    /// AddCustomer (W1).
    pub async fn add_customer(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        customer_id: &str,
        mode: BillingMode,
    ) -> Result<Answer<CustomerView>, ResellerError> {
        let mut tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        let partner = self.partner_record(&mut tx, partner_id).await?;
        if store::lock_customer(&mut tx, &self.db, partner_id, customer_id)
            .await?
            .is_some()
        {
            return Err(ResellerError::CustomerExists(customer_id.to_string()));
        }
        tx.rollback().await?;
        let wallet_id = if mode == BillingMode::CustomerPays {
            self.open_customer_wallet(key, &partner, customer_id)
                .await?
        } else {
            String::new()
        };
        let mut tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        let record = CustomerRecord {
            customer_id: customer_id.to_string(),
            partner_id: partner_id.to_string(),
            billing_mode: mode,
            suspended: false,
            monthly_limit: 0,
            wallet_id,
        };
        if !store::insert_customer(&mut tx, &record, self.now()).await? {
            return Err(ResellerError::CustomerExists(customer_id.to_string()));
        }
        runtime::outbox::append(&mut tx, "reseller.customer_added", partner_id, &json!({"partner_id": partner_id, "customer_id": customer_id, "billing_mode": mode.as_str()}), self.now().timestamp_micros())
        .await?;
        let response = self.customer_view(&mut tx, record).await?;
        self.finish(tx, key, response).await
    }

    /// GetCustomer.
    pub async fn get_customer(
        &self,
        partner_id: &str,
        customer_id: &str,
    ) -> Result<CustomerView, ResellerError> {
        let mut tx = self.db.begin_write().await?;
        let c = self.own_customer(&mut tx, partner_id, customer_id).await?;
        let response = self.customer_view(&mut tx, c).await?;
        tx.rollback().await?;
        Ok(response)
    }

    /// ListCustomers.
    pub async fn list_customers(
        &self,
        partner_id: &str,
        after: &str,
        page_size: i64,
    ) -> Result<CustomerPage, ResellerError> {
        let mut conn = self.db.connection().await?;
        self.partner_record(&mut conn, partner_id).await?;
        let mut rows = store::customers(&self.db, partner_id, after, page_size + 1).await?;
        let more = rows.len() as i64 > page_size;
        rows.truncate(usize::try_from(page_size).unwrap_or(0));
        let next_page_token = if more {
            rows.last()
                .map(|c| c.customer_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let mut customers = Vec::with_capacity(rows.len());
        for c in rows {
            customers.push(self.customer_view(&mut conn, c).await?);
        }
        Ok(CustomerPage {
            customers,
            next_page_token,
        })
    }

    /// SuspendCustomer, SetBillingMode and SetCustomerLimit: one change to a customer.
    pub async fn change_customer(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        customer_id: &str,
        change: CustomerChange,
    ) -> Result<Answer<CustomerView>, ResellerError> {
        // A refusal changes nothing anywhere: the key and the customer are checked first, and
        // only then is the customer's own wallet opened (customer-pays needs it before the
        // change commits).
        let mut tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        let mut c = self.own_customer(&mut tx, partner_id, customer_id).await?;
        let mut opened_wallet = None;
        if let CustomerChange::BillingMode(BillingMode::CustomerPays) = change
            && c.wallet_id.is_empty()
        {
            let partner = self.partner_record(&mut tx, partner_id).await?;
            tx.rollback().await?;
            opened_wallet = Some(
                self.open_customer_wallet(key, &partner, customer_id)
                    .await?,
            );
            tx = match self.claim(key).await? {
                Ok(tx) => tx,
                Err(replay) => return Ok(Answer::decode(&replay)?),
            };
            c = self.own_customer(&mut tx, partner_id, customer_id).await?;
        }
        match change {
            CustomerChange::Suspended(s) => c.suspended = s,
            CustomerChange::Limit(l) => c.monthly_limit = l,
            CustomerChange::BillingMode(mode) => {
                let from = c.billing_mode;
                c.billing_mode = mode;
                if let Some(w) = opened_wallet
                    && c.wallet_id.is_empty()
                {
                    c.wallet_id = w;
                }
                runtime::outbox::append(&mut tx, "reseller.billing_mode_changed", partner_id, &json!({"partner_id": partner_id, "customer_id": customer_id, "from": from.as_str(), "to": mode.as_str()}), self.now().timestamp_micros())
                .await?;
            }
        }
        store::update_customer(&mut tx, &c).await?;
        let response = self.customer_view(&mut tx, c).await?;
        self.finish(tx, key, response).await
    }

    /// AllocateCredits: the partner's credits moved into the customer's own wallet.
    pub async fn allocate(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        customer_id: &str,
        credits: u64,
    ) -> Result<Answer<Allocation>, ResellerError> {
        let mut tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        let customer = self.own_customer(&mut tx, partner_id, customer_id).await?;
        let partner = self.partner_record(&mut tx, partner_id).await?;
        tx.rollback().await?;
        let customer_wallet = if customer.wallet_id.is_empty() {
            self.open_customer_wallet(key, &partner, customer_id)
                .await?
        } else {
            customer.wallet_id.clone()
        };
        let transfer = self
            .wallet
            .transfer(wpb::TransferCreditsRequest {
                idempotency_key: wallet_key(key.key(), "transfer"),
                from_wallet_id: partner.wallet_id.clone(),
                to_wallet_id: customer_wallet.clone(),
                credits,
                reason: format!("allocated by partner {partner_id} to customer {customer_id}"),
            })
            .await?;
        let mut tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        let mut customer = self.own_customer(&mut tx, partner_id, customer_id).await?;
        if customer.wallet_id.is_empty() {
            customer.wallet_id = customer_wallet;
            store::update_customer(&mut tx, &customer).await?;
        }
        let response = Allocation {
            customer_id: customer_id.to_string(),
            transfer,
        };
        self.finish(tx, key, response).await
    }
}
