//! What a partner bills its customers for a month (W1).

use super::Resellers;
use crate::{
    domain,
    error::ResellerError,
    model::{Statement, StatementLine},
    store,
};

impl Resellers {
    /// GetUsageStatement (W1): per customer, what was sent and what the partner bills.
    pub async fn statement(
        &self,
        partner_id: &str,
        year: i32,
        month: u32,
    ) -> Result<Statement, ResellerError> {
        let (from, to) = domain::month(year, month).ok_or_else(|| {
            ResellerError::invalid("month", "must be a calendar month (year, 1..12)")
        })?;
        let mut conn = self.db.connection().await?;
        let partner = self.partner_record(&mut conn, partner_id).await?;
        drop(conn);
        let prices = partner.resale_table()?;
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
            customers.push(StatementLine {
                customer_id,
                usage,
                amount,
            });
        }
        Ok(Statement {
            partner_id: partner_id.to_string(),
            year,
            month,
            customers,
            total,
        })
    }
}
