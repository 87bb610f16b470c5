//! What a partner bills its customers for a month (W1).

use proto::reseller::v1 as pb;
use shared::TierTable;

use super::Resellers;
use crate::{domain, error::ResellerError, store};

impl Resellers {
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
}
