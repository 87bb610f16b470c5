//! Partners: registering one with its main wallet (W3, W5), reading it, its resale prices,
//! its main wallet's reminder and automatic top-up (W4), and the relay of that wallet's events.

use prost::Message;
use proto::wallet::v1::{self as wpb};
use runtime::idempotency::IdempotencyKey;
use serde_json::json;
use shared::Currency;

use super::{Answer, Resellers};
use crate::{
    convert::{self, hex},
    domain::{self, Funding},
    error::ResellerError,
    model::{PartnerRecord, PartnerView},
    store,
    wallet::{Wallet, wallet_key},
};

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
    async fn partner_view(&self, partner: PartnerRecord) -> Result<PartnerView, ResellerError> {
        let wallet = self.wallet.get(&partner.wallet_id).await?;
        let resale_prices = partner.resale_table()?;
        Ok(PartnerView {
            partner,
            wallet,
            resale_prices,
        })
    }

    /// RegisterPartner (W3, W5): its main wallet first, then the partner.
    pub async fn register_partner(
        &self,
        key: &IdempotencyKey,
        cmd: NewPartner,
    ) -> Result<Answer<PartnerView>, ResellerError> {
        if let Err(replay) = self.claim(key).await? {
            return Ok(Answer::decode(&replay)?);
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
                    funding_mode: convert::wallet_funding(cmd.funding) as i32,
                    payment_method: cmd.payment_method.clone(),
                })
                .await?;
        }
        let record = PartnerRecord {
            partner_id: cmd.partner_id.clone(),
            currency: cmd.currency,
            funding: cmd.funding,
            payment_method: cmd.payment_method,
            wallet_id,
            pricing: hex(&cmd.pricing.encode_to_vec()),
            rating: hex(&cmd.rating.encode_to_vec()),
            resale_prices: String::new(),
            created_at: self.now(),
        };
        let response = self.partner_view(record.clone()).await?;
        let mut tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        if !store::insert_partner(&mut tx, &record).await? {
            return Err(ResellerError::PartnerExists(record.partner_id));
        }
        runtime::outbox::append(
            &mut tx,
            "reseller.partner_registered",
            &record.partner_id,
            &json!({"partner_id": record.partner_id, "funding": record.funding.as_str()}),
            self.now().timestamp_micros(),
        )
        .await?;
        self.finish(tx, key, response).await
    }

    /// GetPartner.
    pub async fn get_partner(&self, partner_id: &str) -> Result<PartnerView, ResellerError> {
        let mut conn = self.db.connection().await?;
        let p = self.partner_record(&mut conn, partner_id).await?;
        drop(conn);
        self.partner_view(p).await
    }

    /// SetResalePrices.
    pub async fn set_resale_prices(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        prices: &wpb::CreditPricing,
    ) -> Result<Answer<PartnerView>, ResellerError> {
        let mut tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        let mut partner = self.partner_record(&mut tx, partner_id).await?;
        let table = runtime::convert::tier_table(prices, partner.currency)
            .map_err(|(f, m)| ResellerError::invalid(f, m))?;
        partner.resale_prices = serde_json::to_string(&table)
            .map_err(|e| runtime::db::DbError::Corrupt(e.to_string()))?;
        store::set_resale_prices(&mut tx, partner_id, &partner.resale_prices).await?;
        let response = self.partner_view(partner).await?;
        self.finish(tx, key, response).await
    }

    /// ConfigurePartnerReminder (W4 with C3).
    pub async fn partner_reminder(
        &self,
        key: &IdempotencyKey,
        partner_id: &str,
        threshold: u64,
    ) -> Result<Answer<PartnerView>, ResellerError> {
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
    ) -> Result<Answer<PartnerView>, ResellerError> {
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
    ) -> Result<Answer<PartnerView>, ResellerError>
    where
        F: FnOnce(Wallet, String, String) -> Fut,
        Fut: std::future::Future<Output = Result<wpb::Wallet, ResellerError>>,
    {
        let tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
        };
        tx.rollback().await?;
        let mut conn = self.db.connection().await?;
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
        let response = self.partner_view(partner).await?;
        let tx = match self.claim(key).await? {
            Ok(tx) => tx,
            Err(replay) => return Ok(Answer::decode(&replay)?),
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
                runtime::outbox::append(&mut tx, event_type, partner_id, &json!({"partner_id": partner_id, "wallet_event_id": event.event_id, "wallet": wallet_payload}), self.now().timestamp_micros())
                .await?;
            }
        }
        store::set_relay_cursor(&mut tx, i64::try_from(event.cursor).unwrap_or(i64::MAX)).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(())
    }
}
