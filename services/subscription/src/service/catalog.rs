//! Plans: publish a version, read one, list them.

use runtime::idempotency::IdempotencyKey;
use serde_json::json;

use crate::{
    domain::{self, Plan},
    error::SubError,
    model::PublishedPlan,
    store,
};

use super::{Answer, Begun, Subscriptions};

impl Subscriptions {
    /// PublishPlan: the same plan id again makes version + 1.
    pub async fn publish_plan(
        &self,
        key: &IdempotencyKey,
        mut plan: Plan,
    ) -> Result<Answer<PublishedPlan>, SubError> {
        let mut tx = match self.begin(key).await? {
            Begun::Replay(r) => return r,
            Begun::Fresh(tx) => tx,
        };
        let now = self.now();
        plan.version = store::next_plan_version(&mut tx, &plan.plan_id).await?;
        if !store::insert_plan(&mut tx, &plan, now).await? {
            return Err(SubError::Precondition(format!(
                "plan {} was published concurrently; retry",
                plan.plan_id
            )));
        }
        runtime::outbox::append(
            &mut tx,
            "subscription.plan_published",
            &plan.plan_id,
            &json!({"plan_id": plan.plan_id, "version": plan.version}),
            now.timestamp_micros(),
        )
        .await?;
        let published = PublishedPlan {
            plan,
            published_at: now,
        };
        self.finish(tx, key, published).await
    }

    /// GetPlan.
    pub async fn get_plan(
        &self,
        plan_id: &str,
        version: Option<u32>,
    ) -> Result<PublishedPlan, SubError> {
        let mut conn = self.conn().await?;
        let (plan, at) = store::plan(&mut conn, plan_id, version)
            .await?
            .ok_or_else(|| SubError::PlanNotFound(shared::limits::quoted(plan_id).to_string()))?;
        Ok(PublishedPlan {
            plan,
            published_at: at,
        })
    }

    /// ListPlans.
    pub async fn list_plans(
        &self,
        product: Option<domain::Product>,
        all_versions: bool,
    ) -> Result<Vec<PublishedPlan>, SubError> {
        let plans = store::list_plans(&self.db, product, all_versions).await?;
        Ok(plans
            .into_iter()
            .map(|(plan, published_at)| PublishedPlan { plan, published_at })
            .collect())
    }
}
