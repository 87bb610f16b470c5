//! The reseller's use cases. A routed send runs in three steps, like a purchase in the wallet:
//!
//! 1. a transaction locks the customer, decides who pays (W1), checks the partner's cap on the
//!    customer, and records the routing under the caller's idempotency key;
//! 2. the wallet is called with a key derived from the caller's, so it debits once however
//!    often this step runs;
//! 3. a transaction records the outcome and the response under the caller's key.
//!
//! A crash or an unreachable wallet between the steps leaves the routing `pending`: a retry
//! with the same key goes to the same wallet with the same wallet key and completes.

use chrono::{DateTime, Utc};
use prost::Message;
use proto::{
    reseller::v1 as pb,
    wallet::v1::{self as wpb},
};
use runtime::{
    Platform,
    db::Db,
    idempotency::{Claimed, IdempotencyKey},
    outbox,
};
use serde_json::json;
use shared::{Currency, TierTable};
use sqlx::{Any, Transaction};

use crate::{
    batch::SendSteps,
    convert::{decode_stored as decode, hex},
    domain::{self, BillingMode, Funding, Payer},
    error::ResellerError,
    routing::{Outcome, Route, Send, SendRequest, settle},
    store::{self, CustomerRecord, PartnerRecord, RoutedRecord},
    wallet::{Wallet, wallet_key},
};

/// The reseller's use cases.
#[derive(Clone)]
pub struct Resellers {
    db: Db,
    platform: Platform,
    wallet: Wallet,
    sends: SendSteps,
}

/// A new partner.
pub struct NewPartner {
    /// Id.
    pub partner_id: String,
    /// Currency.
    pub currency: Currency,
    /// Funding of its main wallet.
    pub funding: Funding,
    /// Card or direct-debit token.
    pub payment_method: String,
    /// Its credit prices (C1, W4).
    pub pricing: wpb::CreditPricing,
    /// Its rating rule (C2).
    pub rating: wpb::RatingRule,
}

impl Resellers {
    /// The use cases on `platform`, calling `wallet`; steps 1 and 3 of routed sends run by
    /// `sends` (alone, or with group commit: [`crate::batch`]).
    pub fn new(platform: Platform, wallet: Wallet, sends: SendSteps) -> Self {
        Self {
            db: platform.db.clone(),
            platform,
            wallet,
            sends,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.platform.clock.now()
    }

    async fn claim<R: Message + Default>(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Result<Transaction<'static, Any>, R>, ResellerError> {
        let mut tx = self.db.begin_write().await?;
        match key.claim::<R>(&mut tx).await? {
            Claimed::New => Ok(Ok(tx)),
            Claimed::Replay(Ok(r)) => Ok(Err(r)),
            Claimed::Replay(Err(status)) => Err(ResellerError::Replayed(status)),
        }
    }

    async fn finish<R: Message>(
        &self,
        mut tx: Transaction<'static, Any>,
        key: &IdempotencyKey,
        response: R,
    ) -> Result<R, ResellerError> {
        key.record(&mut tx, &response, self.now().timestamp_micros())
            .await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(response)
    }

    async fn event(
        &self,
        tx: &mut Transaction<'static, Any>,
        event_type: &str,
        subject: &str,
        payload: serde_json::Value,
    ) -> Result<(), ResellerError> {
        outbox::append(
            tx,
            event_type,
            subject,
            &payload,
            self.now().timestamp_micros(),
        )
        .await?;
        Ok(())
    }

    async fn partner_record(
        &self,
        conn: &mut sqlx::AnyConnection,
        partner_id: &str,
    ) -> Result<PartnerRecord, ResellerError> {
        store::partner(conn, partner_id)
            .await?
            .ok_or_else(|| ResellerError::PartnerNotFound(partner_id.to_string()))
    }

    async fn partner_message(&self, p: &PartnerRecord) -> Result<pb::Partner, ResellerError> {
        let wallet = self.wallet.get(&p.wallet_id).await?;
        let resale_prices = if p.resale_prices.is_empty() {
            None
        } else {
            let table: TierTable = serde_json::from_str(&p.resale_prices)
                .map_err(|_| runtime::db::DbError::Corrupt("resale prices".into()))?;
            Some(runtime::convert::tier_table_message(&table))
        };
        Ok(pb::Partner {
            partner_id: p.partner_id.clone(),
            currency: p.currency.clone(),
            funding: match p.funding {
                Funding::Prepaid => pb::PartnerFunding::Prepaid,
                Funding::OnDemand => pb::PartnerFunding::OnDemand,
            } as i32,
            payment_method: p.payment_method.clone(),
            wallet_id: p.wallet_id.clone(),
            wallet: Some(wallet),
            resale_prices,
        })
    }

    /// RegisterPartner (W3, W5): its main wallet first, then the partner.
    pub async fn register_partner(
        &self,
        key: &IdempotencyKey,
        cmd: NewPartner,
    ) -> Result<pb::Partner, ResellerError> {
        if let Err(replay) = self.claim::<pb::Partner>(key).await? {
            return Ok(replay);
        }
        let wallet_id = domain::partner_wallet_id(&cmd.partner_id);
        let opened = self
            .wallet
            .open(wpb::OpenWalletRequest {
                idempotency_key: wallet_key(key.key(), "open"),
                wallet_id: wallet_id.clone(),
                currency: cmd.currency.code().into(),
                pricing: Some(cmd.pricing.clone()),
                rating: Some(cmd.rating.clone()),
                signup_credits: 0,
                signup_credits_expire_at: None,
            })
            .await;
        match opened {
            Ok(_) => {}
            Err(ResellerError::Wallet(s)) if s.code() == tonic::Code::AlreadyExists => {
                return Err(ResellerError::PartnerExists(cmd.partner_id));
            }
            Err(ResellerError::Wallet(s)) if s.code() == tonic::Code::InvalidArgument => {
                return Err(ResellerError::invalid("pricing", s.message().to_string()));
            }
            Err(e) => return Err(e),
        }
        if cmd.funding == Funding::OnDemand || !cmd.payment_method.is_empty() {
            self.wallet
                .set_funding(wpb::SetFundingModeRequest {
                    idempotency_key: wallet_key(key.key(), "funding"),
                    wallet_id: wallet_id.clone(),
                    funding_mode: match cmd.funding {
                        Funding::Prepaid => wpb::FundingMode::Prepaid,
                        Funding::OnDemand => wpb::FundingMode::OnDemand,
                    } as i32,
                    payment_method: cmd.payment_method.clone(),
                })
                .await?;
        }
        let record = PartnerRecord {
            partner_id: cmd.partner_id.clone(),
            currency: cmd.currency.code().into(),
            funding: cmd.funding,
            payment_method: cmd.payment_method,
            wallet_id,
            pricing: hex(&cmd.pricing.encode_to_vec()),
            rating: hex(&cmd.rating.encode_to_vec()),
            resale_prices: String::new(),
            created_at: self.now(),
        };
        let response = self.partner_message(&record).await?;
        let mut tx = match self.claim::<pb::Partner>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
        };
        if !store::insert_partner(&mut tx, &record).await? {
            return Err(ResellerError::PartnerExists(record.partner_id));
        }
        self.event(
            &mut tx,
            "reseller.partner_registered",
            &record.partner_id,
            json!({"partner_id": record.partner_id, "funding": record.funding.as_str()}),
        )
        .await?;
        self.finish(tx, key, response).await
    }

    /// GetPartner.
    pub async fn get_partner(&self, partner_id: &str) -> Result<pb::Partner, ResellerError> {
        let mut conn = self
            .db
            .pool()
            .acquire()
            .await
            .map_err(runtime::db::DbError::from)?;
        let p = self.partner_record(&mut conn, partner_id).await?;
        drop(conn);
        self.partner_message(&p).await
    }

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
                currency: partner.currency.clone(),
                pricing: Some(decode(&partner.pricing)?),
                rating: Some(decode(&partner.rating)?),
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

    async fn customer_message(
        &self,
        conn: &mut sqlx::AnyConnection,
        c: &CustomerRecord,
    ) -> Result<pb::Customer, ResellerError> {
        let (start, _) = domain::month_of(self.now());
        let used =
            store::partner_credits_used_since(conn, &c.partner_id, &c.customer_id, start).await?;
        Ok(pb::Customer {
            partner_id: c.partner_id.clone(),
            customer_id: c.customer_id.clone(),
            billing_mode: match c.billing_mode {
                BillingMode::PartnerPays => pb::BillingMode::PartnerPays,
                BillingMode::CustomerPays => pb::BillingMode::CustomerPays,
            } as i32,
            suspended: c.suspended,
            monthly_credit_limit: u64::try_from(c.monthly_limit).unwrap_or(0),
            credits_used_this_month: u64::try_from(used).unwrap_or(0),
            wallet_id: c.wallet_id.clone(),
        })
    }

    /// AddCustomer (W1).
    pub async fn add_customer(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        customer_id: &str,
        mode: BillingMode,
    ) -> Result<pb::Customer, ResellerError> {
        let mut tx = match self.claim::<pb::Customer>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
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
        let mut tx = match self.claim::<pb::Customer>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
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
        self.event(
            &mut tx,
            "reseller.customer_added",
            partner_id,
            json!({"partner_id": partner_id, "customer_id": customer_id, "billing_mode": mode.as_str()}),
        )
        .await?;
        let response = self.customer_message(&mut tx, &record).await?;
        self.finish(tx, key, response).await
    }

    /// GetCustomer.
    pub async fn get_customer(
        &self,
        partner_id: &str,
        customer_id: &str,
    ) -> Result<pb::Customer, ResellerError> {
        let mut tx = self.db.begin_write().await?;
        let c = self.own_customer(&mut tx, partner_id, customer_id).await?;
        let response = self.customer_message(&mut tx, &c).await?;
        tx.rollback().await?;
        Ok(response)
    }

    /// ListCustomers.
    pub async fn list_customers(
        &self,
        partner_id: &str,
        after: &str,
        page_size: i64,
    ) -> Result<pb::ListCustomersResponse, ResellerError> {
        let mut conn = self
            .db
            .pool()
            .acquire()
            .await
            .map_err(runtime::db::DbError::from)?;
        self.partner_record(&mut conn, partner_id).await?;
        let mut rows = store::customers(&self.db, partner_id, after, page_size + 1).await?;
        let more = rows.len() as i64 > page_size;
        rows.truncate(usize::try_from(page_size).unwrap_or(0));
        let mut customers = Vec::with_capacity(rows.len());
        for c in &rows {
            customers.push(self.customer_message(&mut conn, c).await?);
        }
        Ok(pb::ListCustomersResponse {
            next_page_token: if more {
                rows.last()
                    .map(|c| c.customer_id.clone())
                    .unwrap_or_default()
            } else {
                String::new()
            },
            customers,
        })
    }

    /// SuspendCustomer, SetBillingMode and SetCustomerLimit: one change to a customer.
    pub async fn change_customer(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        customer_id: &str,
        change: CustomerChange,
    ) -> Result<pb::Customer, ResellerError> {
        // A refusal changes nothing anywhere: the key and the customer are checked first, and
        // only then is the customer's own wallet opened (customer-pays needs it before the
        // change commits).
        let mut tx = match self.claim::<pb::Customer>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
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
            tx = match self.claim::<pb::Customer>(key).await? {
                Ok(tx) => tx,
                Err(replay) => return Ok(replay),
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
                self.event(
                    &mut tx,
                    "reseller.billing_mode_changed",
                    partner_id,
                    json!({"partner_id": partner_id, "customer_id": customer_id, "from": from.as_str(), "to": mode.as_str()}),
                )
                .await?;
            }
        }
        store::update_customer(&mut tx, &c).await?;
        let response = self.customer_message(&mut tx, &c).await?;
        self.finish(tx, key, response).await
    }

    /// ChargeMailing and ReserveMailing (W2, W3, W5): route, then debit or hold at the payer.
    ///
    /// Steps 1 and 3 run in [`SendSteps`]: with group commit on ([`crate::batch`]), those of
    /// sends arriving together share their transactions.
    pub async fn route_send(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        customer_id: &str,
        mailing_id: &str,
        recipients: u64,
        send: Send,
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

        // Step 3: record the outcome under the caller's key.
        self.sends
            .record(&request.key, settle(routed, recipients, outcome))
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
            Send::Charge => self
                .wallet
                .charge(wpb::ChargeMailingRequest {
                    idempotency_key: wallet_key,
                    wallet_id: routed.payer_wallet_id.clone(),
                    mailing_id: routed.mailing_id.clone(),
                    recipients: r.recipients,
                })
                .await
                .map(Outcome::Charged),
            Send::Hold { ttl_seconds } => self
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
    ) -> Result<pb::RoutedReservation, ResellerError> {
        let mut tx = match self.claim::<pb::RoutedReservation>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
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
        let mut tx = match self.claim::<pb::RoutedReservation>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
        };
        let mut routed = routed;
        if capture.is_some() {
            routed.reservation_status = Some("captured".into());
            routed.credits = i64::try_from(reservation.captured_credits).unwrap_or(0);
            routed.recipients = i64::try_from(capture.unwrap_or(0)).unwrap_or(0);
        } else {
            routed.reservation_status = Some("released".into());
        }
        store::update_routed(&mut tx, &routed).await?;
        let response = pb::RoutedReservation {
            payer: match routed.payer {
                Payer::Partner => pb::Payer::Partner,
                Payer::Customer => pb::Payer::Customer,
            } as i32,
            payer_wallet_id: routed.payer_wallet_id.clone(),
            customer_id: routed.customer_id.clone(),
            reservation: Some(reservation),
        };
        self.finish(tx, key, response).await
    }

    /// AllocateCredits: the partner's credits moved into the customer's own wallet.
    pub async fn allocate(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        customer_id: &str,
        credits: u64,
    ) -> Result<pb::Allocation, ResellerError> {
        let mut tx = match self.claim::<pb::Allocation>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
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
        let mut tx = match self.claim::<pb::Allocation>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
        };
        let mut customer = self.own_customer(&mut tx, partner_id, customer_id).await?;
        if customer.wallet_id.is_empty() {
            customer.wallet_id = customer_wallet;
            store::update_customer(&mut tx, &customer).await?;
        }
        let response = pb::Allocation {
            customer_id: customer_id.to_string(),
            credits: transfer.credits,
            partner_wallet: transfer.from_wallet,
            customer_wallet: transfer.to_wallet,
        };
        self.finish(tx, key, response).await
    }

    /// SetResalePrices.
    pub async fn set_resale_prices(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        prices: &wpb::CreditPricing,
    ) -> Result<pb::Partner, ResellerError> {
        let mut tx = match self.claim::<pb::Partner>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
        };
        let mut partner = self.partner_record(&mut tx, partner_id).await?;
        let currency: Currency = partner
            .currency
            .parse()
            .map_err(|_| runtime::db::DbError::Corrupt("partner currency".into()))?;
        let table = runtime::convert::tier_table(prices, currency)
            .map_err(|(f, m)| ResellerError::invalid(f, m))?;
        partner.resale_prices = serde_json::to_string(&table)
            .map_err(|e| runtime::db::DbError::Corrupt(e.to_string()))?;
        store::set_resale_prices(&mut tx, partner_id, &partner.resale_prices).await?;
        let response = self.partner_message(&partner).await?;
        self.finish(tx, key, response).await
    }

    /// GetUsageStatement (W1): per customer, what was sent and what the partner bills.
    pub async fn statement(
        &self,
        partner_id: &str,
        year: i32,
        month: u32,
    ) -> Result<pb::UsageStatement, ResellerError> {
        let (from, to) = domain::month(year, month).ok_or_else(|| {
            ResellerError::invalid("month", "must be a calendar month (year, 1..12)")
        })?;
        let mut conn = self
            .db
            .pool()
            .acquire()
            .await
            .map_err(runtime::db::DbError::from)?;
        let partner = self.partner_record(&mut conn, partner_id).await?;
        drop(conn);
        let prices: Option<TierTable> = if partner.resale_prices.is_empty() {
            None
        } else {
            Some(
                serde_json::from_str(&partner.resale_prices)
                    .map_err(|_| runtime::db::DbError::Corrupt("resale prices".into()))?,
            )
        };
        let mut total: Option<shared::Money> = None;
        let mut customers = Vec::new();
        for (customer_id, usage) in store::usage(&self.db, partner_id, from, to).await? {
            let amount = match &prices {
                Some(p) => Some(domain::resale_amount(p, &usage).map_err(|e| {
                    ResellerError::Precondition(format!(
                        "resale prices do not cover this usage: {e}"
                    ))
                })?),
                None => None,
            };
            if let Some(a) = amount {
                total = Some(match total {
                    Some(t) => t
                        .checked_add(&a)
                        .map_err(|e| ResellerError::Precondition(e.to_string()))?,
                    None => a,
                });
            }
            let u = |v: i64| u64::try_from(v).unwrap_or(0);
            customers.push(pb::CustomerUsage {
                customer_id,
                mailings: u(usage.mailings),
                recipients: u(usage.recipients),
                credits_used: u(usage.credits()),
                partner_paid_credits: u(usage.partner_paid),
                customer_paid_credits: u(usage.customer_paid),
                amount: amount.map(|a| runtime::convert::money(&a)),
            });
        }
        Ok(pb::UsageStatement {
            partner_id: partner_id.to_string(),
            year,
            month,
            customers,
            total: total.map(|t| runtime::convert::money(&t)),
        })
    }

    /// ConfigurePartnerReminder (W4 with C3).
    pub async fn partner_reminder(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        threshold: u64,
    ) -> Result<pb::Partner, ResellerError> {
        self.partner_wallet_setting(key, partner_id, |wallet, wallet_id, k| async move {
            wallet
                .reminder(wpb::ConfigureLowBalanceReminderRequest {
                    idempotency_key: k,
                    wallet_id,
                    threshold,
                })
                .await
        })
        .await
    }

    /// ConfigurePartnerAutoTopUp (W4 with C4).
    pub async fn partner_auto_top_up(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        top_up: wpb::AutoTopUp,
        payment_method: String,
    ) -> Result<pb::Partner, ResellerError> {
        self.partner_wallet_setting(key, partner_id, |wallet, wallet_id, k| async move {
            wallet
                .auto_top_up(wpb::ConfigureAutoTopUpRequest {
                    idempotency_key: k,
                    wallet_id,
                    auto_top_up: Some(top_up),
                    payment_method,
                })
                .await
        })
        .await
    }

    async fn partner_wallet_setting<F, Fut>(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        call: F,
    ) -> Result<pb::Partner, ResellerError>
    where
        F: FnOnce(Wallet, String, String) -> Fut,
        Fut: std::future::Future<Output = Result<wpb::Wallet, ResellerError>>,
    {
        let tx = match self.claim::<pb::Partner>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
        };
        tx.rollback().await?;
        let mut conn = self
            .db
            .pool()
            .acquire()
            .await
            .map_err(runtime::db::DbError::from)?;
        let partner = self.partner_record(&mut conn, partner_id).await?;
        drop(conn);
        call(
            self.wallet.clone(),
            partner.wallet_id.clone(),
            wallet_key(key.key(), "setting"),
        )
        .await
        .map_err(|e| match e {
            ResellerError::Wallet(s) if s.code() == tonic::Code::InvalidArgument => {
                ResellerError::invalid("auto_top_up", s.message().to_string())
            }
            other => other,
        })?;
        let response = self.partner_message(&partner).await?;
        let tx = match self.claim::<pb::Partner>(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(replay),
        };
        self.finish(tx, key, response).await
    }

    /// Relays one partner-wallet event into this service's outbox and moves the cursor, in one
    /// transaction (so each wallet event is relayed once).
    pub async fn relay(&self, event: &proto::common::v1::Event) -> Result<(), ResellerError> {
        let mut tx = self.db.begin_write().await?;
        // A partner's main wallet is `partner:<partner_id>` (partner ids hold no ':'); its
        // events are relayed with the partner as their subject, so that only the partner's
        // own watchers see them.
        if let Some(partner_id) = event
            .subject
            .strip_prefix("partner:")
            .filter(|p| !p.contains(':'))
        {
            let relayed = match event.r#type.as_str() {
                "wallet.low_balance" => Some("reseller.partner_low_balance"),
                "wallet.top_up_succeeded" => Some("reseller.partner_top_up_succeeded"),
                "wallet.top_up_failed" => Some("reseller.partner_top_up_failed"),
                _ => None,
            };
            if let Some(event_type) = relayed {
                let wallet_payload: serde_json::Value =
                    serde_json::from_str(&event.payload_json).unwrap_or(serde_json::Value::Null);
                self.event(
                    &mut tx,
                    event_type,
                    partner_id,
                    json!({"partner_id": partner_id, "wallet_event_id": event.event_id, "wallet": wallet_payload}),
                )
                .await?;
            }
        }
        store::set_relay_cursor(&mut tx, i64::try_from(event.cursor).unwrap_or(i64::MAX)).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(())
    }
}

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
