//! Contact slots: admitted up to the limit, the rest pending upgrade (S1, S11, S12).

use runtime::idempotency::IdempotencyKey;
use serde_json::json;

use crate::{
    domain::{self, Status as SubStatus},
    error::SubError,
    model::{ContactUsage, ContactsAdmitted},
    store,
    unit::Unit,
};

use super::{Answer, Begun, Subscriptions};

impl Subscriptions {
    /// AdmitContacts (S1, S11, S12): up to the limit subscribed, the rest pending upgrade. The
    /// plan never changes by itself.
    pub async fn admit_contacts(
        &self,
        key: &IdempotencyKey,
        account_id: &str,
        n: u64,
    ) -> Result<Answer<ContactsAdmitted>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        if matches!(
            unit.sub.status,
            SubStatus::Cancelled | SubStatus::TrialExpired
        ) {
            return Err(SubError::Precondition(format!(
                "the subscription is {}: no contacts can be added",
                unit.sub.status.as_str()
            )));
        }
        let (subscribed, pending) =
            domain::admit(unit.sub.contact_limit(), unit.sub.active_contacts, n);
        unit.sub.active_contacts += subscribed;
        unit.sub.pending_contacts += pending;
        if pending > 0 {
            unit.event(
                "subscription.contact_limit_reached",
                json!({"pending_upgrade": pending, "limit": unit.sub.contact_limit()}),
            );
        }
        let sub = unit.save(&mut tx).await?;
        let admitted = ContactsAdmitted {
            subscribed,
            pending_upgrade: pending,
            usage: ContactUsage::of(&sub),
        };
        self.finish(tx, key, admitted).await
    }

    /// ReleaseContacts (S1).
    pub async fn release_contacts(
        &self,
        key: &IdempotencyKey,
        account_id: &str,
        subscribed: u64,
        pending: u64,
    ) -> Result<Answer<ContactUsage>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let mut unit = Unit::lock(&mut tx, &self.db, account_id, self.now()).await?;
        if subscribed > unit.sub.active_contacts {
            return Err(SubError::invalid(
                "subscribed",
                format!("only {} contacts are active", unit.sub.active_contacts),
            ));
        }
        if pending > unit.sub.pending_contacts {
            return Err(SubError::invalid(
                "pending",
                format!("only {} contacts are pending", unit.sub.pending_contacts),
            ));
        }
        unit.sub.active_contacts -= subscribed;
        unit.sub.pending_contacts -= pending;
        let sub = unit.save(&mut tx).await?;
        self.finish(tx, key, ContactUsage::of(&sub)).await
    }

    /// GetContactUsage.
    pub async fn contact_usage(&self, account_id: &str) -> Result<ContactUsage, SubError> {
        let mut conn = self.conn().await?;
        let sub = store::read_subscription(&mut conn, account_id)
            .await?
            .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
        Ok(ContactUsage::of(&sub))
    }

    /// S12: pending contacts become subscribed as far as the limit allows.
    pub(super) fn promote(&self, unit: &mut Unit) -> u64 {
        let n = domain::promote(
            unit.sub.contact_limit(),
            unit.sub.active_contacts,
            unit.sub.pending_contacts,
        );
        if n > 0 {
            unit.sub.active_contacts += n;
            unit.sub.pending_contacts -= n;
            unit.event(
                "subscription.contacts_promoted",
                json!({"count": n, "limit": unit.sub.contact_limit()}),
            );
        }
        n
    }
}
