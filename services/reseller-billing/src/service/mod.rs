//! The reseller's use cases, one file per family: `partners`, `customers`, `sends` (routed
//! sends and their holds), `statements`. Each returns its answer; `grpc` maps errors to status
//! codes.

use chrono::{DateTime, Utc};
use prost::Message;
use runtime::{
    Platform,
    db::Db,
    idempotency::{Claimed, IdempotencyKey},
    outbox,
};
use sqlx::{Any, Transaction};

use crate::{batch::SendSteps, error::ResellerError, model::PartnerRecord, store, wallet::Wallet};

mod customers;
mod partners;
mod sends;
mod statements;

pub use customers::CustomerChange;
pub use partners::NewPartner;

/// The reseller's use cases.
#[derive(Clone)]
pub struct Resellers {
    db: Db,
    platform: Platform,
    wallet: Wallet,
    sends: SendSteps,
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
}
