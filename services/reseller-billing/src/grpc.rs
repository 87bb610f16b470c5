//! `billing.reseller.v1.ResellerBilling`: validates requests, enforces that a partner-bound
//! token acts only for its partner, calls the use cases, maps errors to status codes.

use proto::{
    common::v1::{Event, WatchEventsRequest},
    reseller::v1::{self as pb, reseller_billing_server::ResellerBilling},
};
use runtime::convert::{reply as ok, reply_decoded as decoded};
use runtime::{Platform, auth, idempotency::IdempotencyKey};
use shared::Currency;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    domain::{BillingMode, Funding},
    error::ResellerError,
    service::{CustomerChange, NewPartner, Resellers, Send},
};

/// The gRPC face of the service.
pub struct ResellerBillingApi {
    platform: Platform,
    resellers: Resellers,
}

impl ResellerBillingApi {
    /// Serves `resellers` on `platform`.
    pub fn new(platform: Platform, resellers: Resellers) -> Self {
        Self {
            platform,
            resellers,
        }
    }
}

const MAX_ID_LEN: usize = 128;

fn id<'a>(field: &'static str, value: &'a str) -> Result<&'a str, ResellerError> {
    if value.is_empty() {
        return Err(ResellerError::invalid(field, "is required"));
    }
    if value.len() > MAX_ID_LEN || !value.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        return Err(ResellerError::invalid(
            field,
            format!("must be 1 to {MAX_ID_LEN} printable ASCII characters, without spaces or ':'"),
        ));
    }
    Ok(value)
}

/// A token named `partner:<id>` acts only for that partner (W1: a partner sees and acts on its
/// own customers only); the platform's own tokens act for every partner.
fn partner<'a, T>(req: &Request<T>, partner_id: &'a str) -> Result<&'a str, ResellerError> {
    let partner_id = id("partner_id", partner_id)?;
    if let Ok(principal) = auth::principal(req)
        && let Some(bound) = principal.name.strip_prefix("partner:")
        && bound != partner_id
    {
        return Err(ResellerError::OtherPartner {
            token_partner: bound.to_string(),
            partner: partner_id.to_string(),
        });
    }
    Ok(partner_id)
}

fn billing_mode(v: i32) -> Result<BillingMode, ResellerError> {
    match pb::BillingMode::try_from(v) {
        Ok(pb::BillingMode::PartnerPays) => Ok(BillingMode::PartnerPays),
        Ok(pb::BillingMode::CustomerPays) => Ok(BillingMode::CustomerPays),
        _ => Err(ResellerError::invalid(
            "billing_mode",
            "must be BILLING_MODE_PARTNER_PAYS or BILLING_MODE_CUSTOMER_PAYS",
        )),
    }
}

fn recipients(field: &'static str, n: u64, allow_zero: bool) -> Result<u64, ResellerError> {
    if n == 0 && !allow_zero {
        return Err(ResellerError::invalid(field, "must be at least 1"));
    }
    if n > shared::rating::MAX_RECIPIENTS {
        return Err(ResellerError::invalid(
            field,
            format!("at most {} per mailing", shared::rating::MAX_RECIPIENTS),
        ));
    }
    Ok(n)
}

#[tonic::async_trait]
impl ResellerBilling for ResellerBillingApi {
    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn register_partner(
        &self,
        req: Request<pb::RegisterPartnerRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("RegisterPartner", &r.idempotency_key, &r)?;
        let currency: Currency = r.currency.parse().map_err(|_| {
            ResellerError::invalid(
                "currency",
                format!(
                    "{} is not a supported ISO-4217 code",
                    runtime::convert::shown(&r.currency)
                ),
            )
        })?;
        let funding = match pb::PartnerFunding::try_from(r.funding) {
            Ok(pb::PartnerFunding::Prepaid) => Funding::Prepaid,
            Ok(pb::PartnerFunding::OnDemand) => Funding::OnDemand,
            _ => {
                return Err(ResellerError::invalid(
                    "funding",
                    "must be PARTNER_FUNDING_PREPAID or _ON_DEMAND",
                )
                .into());
            }
        };
        if !r.payment_method.is_empty()
            && !shared::gateway::is_known_payment_method(&r.payment_method)
        {
            return Err(ResellerError::invalid(
                "payment_method",
                "not a payment method the gateway knows",
            )
            .into());
        }
        if funding == Funding::OnDemand && r.payment_method.is_empty() {
            return Err(ResellerError::invalid(
                "payment_method",
                "on-demand funding needs a card or direct-debit method (W5)",
            )
            .into());
        }
        let pricing = r
            .pricing
            .clone()
            .ok_or_else(|| ResellerError::invalid("pricing", "is required"))?;
        runtime::convert::tier_table(&pricing, currency)
            .map_err(|(f, m)| ResellerError::invalid(f, m))?;
        let rating = r
            .rating
            .clone()
            .ok_or_else(|| ResellerError::invalid("rating", "is required"))?;
        ok(self
            .resellers
            .register_partner(
                &key,
                NewPartner {
                    partner_id,
                    currency,
                    funding,
                    payment_method: r.payment_method.clone(),
                    pricing,
                    rating,
                },
            )
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn get_partner(
        &self,
        req: Request<pb::GetPartnerRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?;
        ok(self.resellers.get_partner(partner_id).await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn add_customer(
        &self,
        req: Request<pb::AddCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("AddCustomer", &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let mode = billing_mode(r.billing_mode)?;
        ok(self
            .resellers
            .add_customer(&key, &partner_id, customer_id, mode)
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn list_customers(
        &self,
        req: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?;
        let r = req.get_ref();
        let page_size = match r.page_size {
            0 => 100,
            n if n > 500 => return Err(ResellerError::invalid("page_size", "at most 500").into()),
            n => i64::from(n),
        };
        ok(self
            .resellers
            .list_customers(partner_id, &r.page_token, page_size)
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn get_customer(
        &self,
        req: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?;
        let customer_id = id("customer_id", &req.get_ref().customer_id)?;
        ok(self.resellers.get_customer(partner_id, customer_id).await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn suspend_customer(
        &self,
        req: Request<pb::SuspendCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("SuspendCustomer", &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        ok(self
            .resellers
            .change_customer(
                &key,
                &partner_id,
                customer_id,
                CustomerChange::Suspended(r.suspended),
            )
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn set_billing_mode(
        &self,
        req: Request<pb::SetBillingModeRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("SetBillingMode", &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let mode = billing_mode(r.billing_mode)?;
        ok(self
            .resellers
            .change_customer(
                &key,
                &partner_id,
                customer_id,
                CustomerChange::BillingMode(mode),
            )
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn charge_mailing(
        &self,
        req: Request<pb::ChargeMailingRequest>,
    ) -> Result<Response<pb::RoutedCharge>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("ChargeMailing", &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let mailing_id = id("mailing_id", &r.mailing_id)?;
        let n = recipients("recipients", r.recipients, false)?;
        decoded(
            self.resellers
                .route_send(&key, &partner_id, customer_id, mailing_id, n, Send::Charge)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn reserve_mailing(
        &self,
        req: Request<pb::ReserveMailingRequest>,
    ) -> Result<Response<pb::RoutedReservation>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("ReserveMailing", &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let mailing_id = id("mailing_id", &r.mailing_id)?;
        let n = recipients("recipients", r.recipients, false)?;
        decoded(
            self.resellers
                .route_send(
                    &key,
                    &partner_id,
                    customer_id,
                    mailing_id,
                    n,
                    Send::Hold {
                        ttl_seconds: r.ttl_seconds,
                    },
                )
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, reservation = %req.get_ref().reservation_id))]
    async fn capture_mailing(
        &self,
        req: Request<pb::CaptureMailingRequest>,
    ) -> Result<Response<pb::RoutedReservation>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("CaptureMailing", &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let reservation_id = id("reservation_id", &r.reservation_id)?;
        let sent = recipients("recipients_sent", r.recipients_sent, true)?;
        ok(self
            .resellers
            .settle_hold(&key, &partner_id, customer_id, reservation_id, Some(sent))
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, reservation = %req.get_ref().reservation_id))]
    async fn release_mailing(
        &self,
        req: Request<pb::ReleaseMailingRequest>,
    ) -> Result<Response<pb::RoutedReservation>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("ReleaseMailing", &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let reservation_id = id("reservation_id", &r.reservation_id)?;
        ok(self
            .resellers
            .settle_hold(&key, &partner_id, customer_id, reservation_id, None)
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn set_customer_limit(
        &self,
        req: Request<pb::SetCustomerLimitRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("SetCustomerLimit", &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let limit = i64::try_from(r.monthly_credit_limit)
            .ok()
            .filter(|l| *l <= 1_000_000_000_000)
            .ok_or_else(|| {
                ResellerError::invalid("monthly_credit_limit", "at most 10^12 credits")
            })?;
        ok(self
            .resellers
            .change_customer(&key, &partner_id, customer_id, CustomerChange::Limit(limit))
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn allocate_credits(
        &self,
        req: Request<pb::AllocateCreditsRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("AllocateCredits", &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        if r.credits == 0 || r.credits > 1_000_000_000_000 {
            return Err(ResellerError::invalid("credits", "must be 1 to 10^12").into());
        }
        ok(self
            .resellers
            .allocate(&key, &partner_id, customer_id, r.credits)
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn set_resale_prices(
        &self,
        req: Request<pb::SetResalePricesRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("SetResalePrices", &r.idempotency_key, &r)?;
        let prices = r
            .resale_prices
            .as_ref()
            .ok_or_else(|| ResellerError::invalid("resale_prices", "is required"))?;
        ok(self
            .resellers
            .set_resale_prices(&key, &partner_id, prices)
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn get_usage_statement(
        &self,
        req: Request<pb::GetUsageStatementRequest>,
    ) -> Result<Response<pb::UsageStatement>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?;
        let r = req.get_ref();
        ok(self.resellers.statement(partner_id, r.year, r.month).await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn configure_partner_reminder(
        &self,
        req: Request<pb::ConfigurePartnerReminderRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("ConfigurePartnerReminder", &r.idempotency_key, &r)?;
        ok(self
            .resellers
            .partner_reminder(&key, &partner_id, r.threshold)
            .await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn configure_partner_auto_top_up(
        &self,
        req: Request<pb::ConfigurePartnerAutoTopUpRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = IdempotencyKey::new("ConfigurePartnerAutoTopUp", &r.idempotency_key, &r)?;
        let top_up = r
            .auto_top_up
            .ok_or_else(|| ResellerError::invalid("auto_top_up", "is required"))?;
        ok(self
            .resellers
            .partner_auto_top_up(&key, &partner_id, top_up, r.payment_method)
            .await)
    }

    type WatchEventsStream = ReceiverStream<Result<Event, Status>>;

    #[tracing::instrument(skip_all, fields(after = req.get_ref().after_cursor))]
    async fn watch_events(
        &self,
        req: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Ok(Response::new(
            self.platform
                .outbox
                .watch(req.into_inner(), self.platform.shutdown.clone()),
        ))
    }
}
