//! The reseller's use cases, one file per family: `partners`, `customers`, `sends` (routed
//! sends and their holds), `statements`. Each returns its answer; `grpc` maps errors to status
//! codes.

use chrono::{DateTime, Utc};
use prost::Message;
use runtime::{
    Platform,
    db::Db,
    idempotency::{Claimed, IdempotencyKey},
};
use sqlx::{Any, Transaction};

use self::group_commit::SendSteps;
use crate::{convert::Reply, error::ResellerError, model::PartnerRecord, store, wallet::Wallet};

mod customers;
pub mod group_commit;
mod partners;
mod sends;
mod statements;

pub use customers::CustomerChange;
pub use partners::NewPartner;

pub use runtime::convert::Answer;

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
    /// `sends` (alone, or with group commit: [`group_commit`]).
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

    /// A write transaction for the request with `key`, or the answer its first attempt got.
    async fn claim(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Result<Transaction<'static, Any>, Vec<u8>>, ResellerError> {
        let mut tx = self.db.begin_write().await?;
        match key.claim_bytes(&mut tx).await? {
            Claimed::New => Ok(Ok(tx)),
            Claimed::Replay(Ok(r)) => Ok(Err(r)),
            Claimed::Replay(Err(status)) => Err(ResellerError::Replayed(status)),
        }
    }

    /// Records `result`'s message under `key` and commits.
    async fn finish<T: Reply>(
        &self,
        mut tx: Transaction<'static, Any>,
        key: &IdempotencyKey,
        result: T,
    ) -> Result<Answer<T>, ResellerError> {
        let bytes = result.to_message().encode_to_vec();
        key.record_bytes(&mut tx, bytes, self.now().timestamp_micros())
            .await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(Answer::Fresh(result))
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
