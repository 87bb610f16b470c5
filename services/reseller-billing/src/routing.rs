//! One routed send's aggregate: the customer it is for, row-locked inside a write transaction,
//! with its partner and the partner credits it used this month — everything step 1 of
//! `ChargeMailing` and `ReserveMailing` decides on — and the pure transitions of the routing
//! record (step 1 decides who pays, step 3 completes it with the wallet's outcome).
//!
//! A send alone locks one [`Routing`] ([`Routing::lock`]); group commit ([`crate::service::group_commit`])
//! reads the rows of many at once and builds them with [`Routing::from_parts`]. Either way a
//! customer's sends count against its cap one after another ([`Routing::decide`]).

use chrono::{DateTime, Utc};
use proto::wallet::v1 as wpb;
use runtime::{db::Db, idempotency::IdempotencyError, idempotency::IdempotencyKey};
use serde_json::json;
use shared::RatingRule;
use sqlx::AnyConnection;
use tonic::Status;

use crate::{
    convert::{self, decode_stored},
    domain::{self, Payer},
    error::ResellerError,
    model::{
        CustomerRecord, HoldStatus, Outcome, PartnerRecord, RoutedRecord, SendKind, SendStatus,
    },
    store,
};

/// Which routed operation.
#[derive(Debug, Clone)]
pub enum SendOp {
    /// ChargeMailing.
    Charge,
    /// ReserveMailing with a hold lifetime.
    Hold {
        /// Seconds (0 = the wallet's default).
        ttl_seconds: u32,
    },
}

impl SendOp {
    /// The kind recorded with its routing.
    pub fn kind(&self) -> SendKind {
        match self {
            SendOp::Charge => SendKind::Charge,
            SendOp::Hold { .. } => SendKind::Hold,
        }
    }
}

/// One routed send as the caller asked for it.
#[derive(Clone)]
pub struct SendRequest {
    /// The caller's key, in its partner's space.
    pub key: IdempotencyKey,
    /// Partner.
    pub partner_id: String,
    /// Customer.
    pub customer_id: String,
    /// Mailing.
    pub mailing_id: String,
    /// Recipients.
    pub recipients: u64,
    /// Charge or hold.
    pub send: SendOp,
}

impl SendRequest {
    /// The routing an earlier attempt under this key recorded (still pending), taken up again
    /// only if it was this very send; the key used for another send is refused
    /// (`ALREADY_EXISTS`), never completed with the other send's routing.
    pub fn resume(&self, routed: RoutedRecord) -> Result<Route, ResellerError> {
        let same = routed.kind == self.send.kind()
            && routed.partner_id == self.partner_id
            && routed.customer_id == self.customer_id
            && routed.mailing_id == self.mailing_id
            && u64::try_from(routed.recipients).ok() == Some(self.recipients);
        if same {
            return Ok(Route::Routed(Box::new(routed)));
        }
        Err(ResellerError::Idempotency(IdempotencyError::Mismatch {
            key: self.key.key().to_string(),
            operation: match routed.kind {
                SendKind::Hold => "ReserveMailing",
                SendKind::Charge => "ChargeMailing",
            }
            .to_string(),
        }))
    }
}

/// What step 1 came to for a send that goes on.
pub enum Route {
    /// The first answer of an earlier attempt.
    Answered(Vec<u8>),
    /// Who pays, recorded (now or by an earlier attempt): call the wallet.
    Routed(Box<RoutedRecord>),
}

/// Step 1's decision for a new send, from the rows it depends on.
pub enum Decision {
    /// Record this routing.
    Route(Box<RoutedRecord>),
    /// The partner's monthly cap on the customer refuses it (recorded under the key).
    Limit(domain::LimitReached),
}

/// A customer locked for routing its sends, with its partner and the partner credits it used
/// this month.
#[derive(Debug, Clone)]
pub struct Routing {
    /// The customer, row-locked.
    pub customer: CustomerRecord,
    /// Its partner.
    pub partner: PartnerRecord,
    /// Partner credits the customer used (or has routed, pending or held) this month, counting
    /// the sends routed in this transaction; read only for a capped customer (0 otherwise,
    /// where the cap never consults it).
    pub used_this_month: i64,
}

impl Routing {
    /// Locks the partner's customer (row lock on PostgreSQL) and reads what routing its sends
    /// depends on.
    pub async fn lock(
        conn: &mut AnyConnection,
        db: &Db,
        partner_id: &str,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Routing, ResellerError> {
        let customer = store::lock_customer(conn, db, partner_id, customer_id)
            .await?
            .ok_or_else(|| ResellerError::CustomerNotFound {
                partner: partner_id.to_string(),
                customer: customer_id.to_string(),
            })?;
        let partner = store::partner(conn, partner_id)
            .await?
            .ok_or_else(|| ResellerError::PartnerNotFound(partner_id.to_string()))?;
        let (start, _) = domain::month_of(now);
        let used_this_month = if customer.monthly_limit > 0 {
            store::partner_credits_used_since(conn, partner_id, customer_id, start).await?
        } else {
            0
        };
        Ok(Self::from_parts(customer, partner, used_this_month))
    }

    /// A routing from rows already read under the customer's lock (group commit reads many
    /// customers' rows at once).
    pub fn from_parts(
        customer: CustomerRecord,
        partner: PartnerRecord,
        used_this_month: i64,
    ) -> Routing {
        Routing {
            customer,
            partner,
            used_this_month,
        }
    }

    /// Who pays for `r` (W1) and whether the partner's cap on the customer allows it.
    /// Refusals that change nothing are `Err`. A routing the partner pays counts against the
    /// cap of this customer's next send in the same transaction.
    pub fn decide(&mut self, r: &SendRequest) -> Result<Decision, ResellerError> {
        if self.customer.suspended {
            return Err(ResellerError::Suspended(r.customer_id.clone()));
        }
        let rating: wpb::RatingRule = decode_stored(&self.partner.rating)?;
        let credits = rate(&rating, r.recipients)?;
        let (payer, payer_wallet_id) = domain::route(
            self.customer.billing_mode,
            &r.partner_id,
            &r.customer_id,
            &self.customer.wallet_id,
        );
        if payer == Payer::Partner {
            if let Err(reached) =
                domain::check_limit(self.customer.monthly_limit, self.used_this_month, credits)
            {
                return Ok(Decision::Limit(reached));
            }
            self.used_this_month += credits;
        }
        Ok(Decision::Route(Box::new(RoutedRecord {
            idempotency_key: r.key.key().to_string(),
            kind: r.send.kind(),
            partner_id: r.partner_id.clone(),
            customer_id: r.customer_id.clone(),
            payer,
            payer_wallet_id,
            mailing_id: r.mailing_id.clone(),
            recipients: i64::try_from(r.recipients).unwrap_or(i64::MAX),
            credits,
            status: SendStatus::Pending,
            reservation_id: None,
            reservation_status: None,
            former_wallet_key: None,
        })))
    }
}

/// The event of a send refused by the cap.
pub fn limit_event(
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
pub struct Completed {
    /// The routing as it will be saved.
    pub routed: RoutedRecord,
    /// The answer recorded under the caller's key.
    pub answer: Result<Vec<u8>, Status>,
}

/// Step 3's result for a wallet outcome that is known (not an unreachable wallet): the routing
/// `done` with the wallet's answer, or `failed` with its refusal.
pub fn complete(
    mut routed: RoutedRecord,
    recipients: u64,
    outcome: Result<Outcome, ResellerError>,
) -> Completed {
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            routed.status = SendStatus::Failed;
            return Completed {
                routed,
                answer: Err(Status::from(e)),
            };
        }
    };
    routed.status = SendStatus::Done;
    match &outcome {
        Outcome::Charged(charge) => {
            routed.credits = i64::try_from(charge.credits).unwrap_or(routed.credits);
        }
        Outcome::Held(reservation) => {
            routed.credits = i64::try_from(reservation.credits).unwrap_or(routed.credits);
            routed.reservation_id = Some(reservation.reservation_id.clone());
            routed.reservation_status = Some(HoldStatus::Active);
        }
    }
    let bytes = convert::send_answer(&routed, recipients, outcome);
    Completed {
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
