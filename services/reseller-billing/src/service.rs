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
    idempotency::{Claimed, IdempotencyError, IdempotencyKey},
    outbox,
};
use serde_json::json;
use shared::{Currency, RatingRule, TierTable};
use sqlx::{Any, Transaction};
use tonic::Status;

use crate::{
    batch::{Batched, GroupCommit},
    domain::{self, BillingMode, Funding, Payer},
    error::ResellerError,
    store::{self, CustomerRecord, PartnerRecord, RoutedRecord},
    wallet::{Wallet, wallet_key},
};

/// The reseller's use cases.
#[derive(Clone)]
pub struct Resellers {
    pub(crate) db: Db,
    pub(crate) platform: Platform,
    wallet: Wallet,
    group_commit: Option<GroupCommit>,
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

/// Which routed operation.
#[derive(Debug, Clone)]
pub enum Send {
    /// ChargeMailing.
    Charge,
    /// ReserveMailing with a hold lifetime.
    Hold {
        /// Seconds (0 = the wallet's default).
        ttl_seconds: u32,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

fn decode<M: Message + Default>(hex_text: &str) -> Result<M, ResellerError> {
    unhex(hex_text)
        .and_then(|b| M::decode(b.as_slice()).ok())
        .ok_or_else(|| runtime::db::DbError::Corrupt("stored protobuf".into()).into())
}

impl Resellers {
    /// The use cases on `platform`, calling `wallet`.
    pub fn new(platform: Platform, wallet: Wallet) -> Self {
        Self {
            db: platform.db.clone(),
            platform,
            wallet,
            group_commit: None,
        }
    }

    /// The same use cases with group commit for steps 1 and 3 of routed sends: up to
    /// `max_batch` sends per transaction, `shards` transactions at a time per step
    /// ([`crate::batch`]).
    pub fn with_group_commit(mut self, max_batch: usize, shards: usize) -> Self {
        self.group_commit = Some(GroupCommit::start(self.clone(), max_batch, shards));
        self
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
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

    pub(crate) async fn event(
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
    /// With group commit on ([`crate::batch`]), steps 1 and 3 of sends arriving together share
    /// their transactions; a send a batch does not take runs the step alone, as here.
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
        let routed = match &self.group_commit {
            Some(g) => match g.route(&request).await {
                Batched::Done(r) => r?,
                Batched::Alone => self.route_alone(&request).await?,
            },
            None => self.route_alone(&request).await?,
        };
        let routed = match routed {
            Routing::Answered(bytes) => return Ok(bytes),
            Routing::Routed(r) => *r,
        };

        // Step 2: the wallet, with a key derived from the caller's.
        let outcome = match self.call_wallet(&request, &routed).await {
            // Nothing known to have happened: keep the routing pending for the retry.
            Err(e) if e.is_wallet_unreachable() => return Err(e),
            known => known,
        };

        // Step 3: record the outcome under the caller's key.
        let settled = settle(routed, recipients, outcome);
        match &self.group_commit {
            Some(g) => match g.record(&request.key, &settled).await {
                Batched::Done(r) => r,
                Batched::Alone => self.record_alone(&request.key, settled).await,
            },
            None => self.record_alone(&request.key, settled).await,
        }
    }

    /// Step 1 of a send in its own transaction.
    pub(crate) async fn route_alone(&self, r: &SendRequest) -> Result<Routing, ResellerError> {
        let mut tx = self.db.begin_write().await?;
        match r.key.claim_bytes(&mut tx).await? {
            Claimed::Replay(Ok(bytes)) => return Ok(Routing::Answered(bytes)),
            Claimed::Replay(Err(status)) => return Err(ResellerError::Replayed(status)),
            Claimed::New => {}
        }
        if let Some(routed) = store::routed(&mut tx, r.key.key()).await? {
            return r.resume(routed);
        }
        let customer = self
            .own_customer(&mut tx, &r.partner_id, &r.customer_id)
            .await?;
        let partner = self.partner_record(&mut tx, &r.partner_id).await?;
        let (start, _) = domain::month_of(self.now());
        let used = if customer.monthly_limit > 0 {
            store::partner_credits_used_since(&mut tx, &r.partner_id, &r.customer_id, start).await?
        } else {
            0
        };
        match decide(r, &customer, &partner, used)? {
            Decision::Route(routed) => {
                store::insert_routed(&mut tx, &routed, self.now()).await?;
                tx.commit().await?;
                Ok(Routing::Routed(routed))
            }
            Decision::Limit(reached) => {
                let (event_type, payload) = limit_event(r, reached);
                self.event(&mut tx, event_type, &r.partner_id, payload)
                    .await?;
                let status = Status::from(ResellerError::Limit(reached));
                r.key
                    .record_status(&mut tx, &status, self.now().timestamp_micros())
                    .await?;
                tx.commit().await?;
                self.platform.outbox.poke();
                Err(ResellerError::Limit(reached))
            }
        }
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

    /// Step 3 of a send in its own transaction.
    pub(crate) async fn record_alone(
        &self,
        key: &IdempotencyKey,
        settled: Settled,
    ) -> Result<Vec<u8>, ResellerError> {
        let mut tx = self.db.begin_write().await?;
        match key.claim_bytes(&mut tx).await? {
            Claimed::Replay(Ok(bytes)) => return Ok(bytes),
            Claimed::Replay(Err(status)) => return Err(ResellerError::Replayed(status)),
            Claimed::New => {}
        }
        store::update_routed(&mut tx, &settled.routed).await?;
        let now = self.now().timestamp_micros();
        match &settled.answer {
            Ok(bytes) => key.record_bytes(&mut tx, bytes.clone(), now).await?,
            Err(status) => key.record_status(&mut tx, status, now).await?,
        }
        tx.commit().await?;
        settled.answer.map_err(ResellerError::Replayed)
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

pub(crate) enum Outcome {
    Charged(wpb::MailingCharge),
    Held(wpb::Reservation),
}

/// One routed send as the caller asked for it.
#[derive(Clone)]
pub(crate) struct SendRequest {
    pub key: IdempotencyKey,
    pub partner_id: String,
    pub customer_id: String,
    pub mailing_id: String,
    pub recipients: u64,
    pub send: Send,
}

impl SendRequest {
    /// The routing an earlier attempt under this key recorded (still pending), taken up again
    /// only if it was this very send; the key used for another send is refused
    /// (`ALREADY_EXISTS`), never completed with the other send's routing.
    pub(crate) fn resume(&self, routed: RoutedRecord) -> Result<Routing, ResellerError> {
        let kind = match self.send {
            Send::Charge => "charge",
            Send::Hold { .. } => "hold",
        };
        let same = routed.kind == kind
            && routed.partner_id == self.partner_id
            && routed.customer_id == self.customer_id
            && routed.mailing_id == self.mailing_id
            && u64::try_from(routed.recipients).ok() == Some(self.recipients);
        if same {
            return Ok(Routing::Routed(Box::new(routed)));
        }
        Err(ResellerError::Idempotency(IdempotencyError::Mismatch {
            key: self.key.key().to_string(),
            operation: match routed.kind.as_str() {
                "hold" => "ReserveMailing",
                _ => "ChargeMailing",
            }
            .to_string(),
        }))
    }
}

/// What step 1 came to for a send that goes on.
pub(crate) enum Routing {
    /// The first answer of an earlier attempt.
    Answered(Vec<u8>),
    /// Who pays, recorded (now or by an earlier attempt): call the wallet.
    Routed(Box<RoutedRecord>),
}

/// Step 1's decision for a new send, from the rows it depends on.
pub(crate) enum Decision {
    /// Record this routing.
    Route(Box<RoutedRecord>),
    /// The partner's monthly cap on the customer refuses it (recorded under the key).
    Limit(domain::LimitReached),
}

/// Who pays for `r` (W1) and whether the partner's cap on the customer allows it, given the
/// partner credits the customer `used` this month. Refusals that change nothing are `Err`.
pub(crate) fn decide(
    r: &SendRequest,
    customer: &CustomerRecord,
    partner: &PartnerRecord,
    used: i64,
) -> Result<Decision, ResellerError> {
    if customer.suspended {
        return Err(ResellerError::Suspended(r.customer_id.clone()));
    }
    let rating: wpb::RatingRule = decode(&partner.rating)?;
    let credits = rate(&rating, r.recipients)?;
    let (payer, payer_wallet_id) = domain::route(
        customer.billing_mode,
        &r.partner_id,
        &r.customer_id,
        &customer.wallet_id,
    );
    if payer == Payer::Partner
        && let Err(reached) = domain::check_limit(customer.monthly_limit, used, credits)
    {
        return Ok(Decision::Limit(reached));
    }
    Ok(Decision::Route(Box::new(RoutedRecord {
        idempotency_key: r.key.key().to_string(),
        kind: match r.send {
            Send::Charge => "charge",
            Send::Hold { .. } => "hold",
        }
        .into(),
        partner_id: r.partner_id.clone(),
        customer_id: r.customer_id.clone(),
        payer,
        payer_wallet_id,
        mailing_id: r.mailing_id.clone(),
        recipients: i64::try_from(r.recipients).unwrap_or(i64::MAX),
        credits,
        status: "pending".into(),
        reservation_id: None,
        reservation_status: None,
        former_wallet_key: None,
    })))
}

/// The event of a send refused by the cap.
pub(crate) fn limit_event(
    r: &SendRequest,
    reached: domain::LimitReached,
) -> (&'static str, serde_json::Value) {
    (
        "reseller.customer_limit_reached",
        json!({"partner_id": r.partner_id, "customer_id": r.customer_id, "limit": reached.limit, "used": reached.used, "needed": reached.needed}),
    )
}

/// A routing with the wallet's outcome applied, and the answer to record under the key.
#[derive(Clone)]
pub(crate) struct Settled {
    pub routed: RoutedRecord,
    pub answer: Result<Vec<u8>, Status>,
}

/// Step 3's result for a wallet outcome that is known (not an unreachable wallet): the routing
/// `done` with the wallet's answer, or `failed` with its refusal.
pub(crate) fn settle(
    mut routed: RoutedRecord,
    recipients: u64,
    outcome: Result<Outcome, ResellerError>,
) -> Settled {
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            routed.status = "failed".into();
            return Settled {
                routed,
                answer: Err(Status::from(e)),
            };
        }
    };
    routed.status = "done".into();
    let payer = match routed.payer {
        Payer::Partner => pb::Payer::Partner,
        Payer::Customer => pb::Payer::Customer,
    } as i32;
    let bytes = match outcome {
        Outcome::Charged(charge) => {
            routed.credits = i64::try_from(charge.credits).unwrap_or(routed.credits);
            pb::RoutedCharge {
                payer,
                payer_wallet_id: routed.payer_wallet_id.clone(),
                customer_id: routed.customer_id.clone(),
                mailing_id: routed.mailing_id.clone(),
                recipients,
                credits: charge.credits,
                payer_balance_after: charge.balance_after,
                charge: Some(charge),
            }
            .encode_to_vec()
        }
        Outcome::Held(reservation) => {
            routed.credits = i64::try_from(reservation.credits).unwrap_or(routed.credits);
            routed.reservation_id = Some(reservation.reservation_id.clone());
            routed.reservation_status = Some("active".into());
            pb::RoutedReservation {
                payer,
                payer_wallet_id: routed.payer_wallet_id.clone(),
                customer_id: routed.customer_id.clone(),
                reservation: Some(reservation),
            }
            .encode_to_vec()
        }
    };
    Settled {
        routed,
        answer: Ok(bytes),
    }
}

/// The credits a mailing needs under the partner's rating rule (C2), checked here to apply the
/// customer's cap before the wallet is asked.
fn rate(rule: &wpb::RatingRule, recipients: u64) -> Result<i64, ResellerError> {
    let cpr = runtime::convert::decimal("rating", &rule.credits_per_recipient)
        .map_err(|(_, m)| runtime::db::DbError::Corrupt(m))?;
    let surcharge =
        shared::Credits::new(i64::try_from(rule.per_mailing_surcharge).unwrap_or(i64::MAX))
            .map_err(|e| runtime::db::DbError::Corrupt(e.to_string()))?;
    let rule = RatingRule::new(cpr, surcharge)
        .map_err(|e| runtime::db::DbError::Corrupt(e.to_string()))?;
    rule.credits_for(recipients)
        .map(|c| c.get())
        .map_err(|e| ResellerError::invalid("recipients", e.to_string()))
}
