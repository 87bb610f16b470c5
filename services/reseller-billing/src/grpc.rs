//! `billing.reseller.v1.ResellerBilling`: validates requests, enforces that a partner-bound
//! token acts only for its partner, calls the use cases, maps errors to status codes.

use proto::{
    common::v1::{Event, WatchEventsRequest},
    reseller::v1::{self as pb, reseller_billing_server::ResellerBilling},
};
// An id that becomes part of the ids built from it (wallet ids `customer:<partner_id>:<customer_id>`,
// keys `<partner_id>:<key>`): no ':' in it.
use runtime::convert::{
    InvalidField, answer, id_part as id_of, recipients, reply_decoded as decoded, view,
};
use runtime::{Platform, auth, idempotency::IdempotencyKey, payments::PaymentProvider};
use sha2::{Digest, Sha256};
use shared::Currency;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    convert,
    domain::{self, Funding},
    error::ResellerError,
    routing::SendOp,
    service::{CustomerChange, NewPartner, Resellers},
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

/// A customer id a call names (at most [`domain::MAX_EXISTING_CUSTOMER_ID_LEN`]: a new one is
/// bounded further by `AddCustomer`); mailing and reservation ids (at most
/// [`domain::MAX_REFERENCE_ID_LEN`]).
fn id<'a>(field: &'static str, value: &'a str) -> Result<&'a str, InvalidField> {
    let max = match field {
        "customer_id" => domain::MAX_EXISTING_CUSTOMER_ID_LEN,
        _ => domain::MAX_REFERENCE_ID_LEN,
    };
    id_of(field, value, max)
}

/// The partner a token acts for: `Some(id)` for a token named `partner:<id>`, `None` for the
/// platform's own tokens.
fn bound_partner<T>(req: &Request<T>) -> Option<&str> {
    auth::principal(req)
        .ok()
        .and_then(|principal| principal.name.strip_prefix("partner:"))
}

/// A token named `partner:<id>` acts only for that partner (W1: a partner sees and acts on its
/// own customers only); the platform's own tokens act for every partner.
fn partner<'a, T>(req: &Request<T>, partner_id: &'a str) -> Result<&'a str, ResellerError> {
    let partner_id = id_of(
        "partner_id",
        partner_id,
        domain::MAX_EXISTING_PARTNER_ID_LEN,
    )?;
    if let Some(bound) = bound_partner(req)
        && bound != partner_id
    {
        return Err(ResellerError::OtherPartner {
            token_partner: bound.to_string(),
            partner: partner_id.to_string(),
        });
    }
    Ok(partner_id)
}

/// Longest key text stored for a request: with `rs:` and the longest step (`:open-customer`),
/// the wallet keys derived from it fit the wallet service's 255 characters.
const MAX_SCOPED_KEY_LEN: usize = runtime::idempotency::MAX_KEY_LEN - "rs:".len() - 14;

/// The request's idempotency key in its partner's own space, `<partner_id>:<key>`: two
/// partners' keys never meet, here or at the wallet (whose keys derive from it,
/// `rs:<partner_id>:<key>:<step>`), and the same partner's retry with the same key finds its
/// first answer. A key too long for that is stored as its SHA-256 digest, in the same space.
fn scoped_key<M: prost::Message>(
    operation: &'static str,
    partner_id: &str,
    key: &str,
    request: &M,
) -> Result<IdempotencyKey, Status> {
    // The caller's key as given, validated with the usual messages.
    IdempotencyKey::new(operation, key, request)?;
    let mut scoped = format!("{partner_id}:{key}");
    if scoped.len() > MAX_SCOPED_KEY_LEN {
        let digest: String = Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        scoped = format!("{partner_id}:#{digest}");
    }
    // A retry of a request first made before keys were scoped (stored under the bare key)
    // still gets its first answer, never a second execution.
    Ok(IdempotencyKey::new(operation, &scoped, request)?.formerly(key))
}

#[tonic::async_trait]
impl ResellerBilling for ResellerBillingApi {
    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn register_partner(
        &self,
        req: Request<pb::RegisterPartnerRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        // A new partner's id is bounded further, so that its wallets' ids fit.
        id_of("partner_id", &partner_id, domain::MAX_PARTNER_ID_LEN)?;
        let r = req.into_inner();
        let key = scoped_key("RegisterPartner", &partner_id, &r.idempotency_key, &r)?;
        let currency: Currency = r.currency.parse().map_err(|_| {
            ResellerError::invalid(
                "currency",
                format!(
                    "{} is not a supported ISO-4217 code",
                    runtime::convert::shown(&r.currency)
                ),
            )
        })?;
        let funding = convert::funding_from(r.funding)?;
        // This service charges nothing itself: the partner's wallet does, through the provider
        // the wallet is configured with, and refuses a token that provider cannot charge. So a
        // token of either provider passes here (simulator tokens, Stripe `cus_...:pm_...`).
        if !r.payment_method.is_empty()
            && [PaymentProvider::Simulator, PaymentProvider::Stripe]
                .iter()
                .all(|p| p.method_kind(&r.payment_method).is_none())
        {
            return Err(ResellerError::invalid(
                "payment_method",
                "not a payment method the gateway knows (a simulator token such as pm_card_ok, or a Stripe customer and payment method as cus_<id>:pm_<id>)",
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
        answer(
            self.resellers
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
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn get_partner(
        &self,
        req: Request<pb::GetPartnerRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?;
        view(self.resellers.get_partner(partner_id).await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn add_customer(
        &self,
        req: Request<pb::AddCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key("AddCustomer", &partner_id, &r.idempotency_key, &r)?;
        // A new customer's id is bounded further, so that its wallet's id fits.
        let customer_id = id_of("customer_id", &r.customer_id, domain::MAX_CUSTOMER_ID_LEN)?;
        let mode = convert::billing_mode_from(r.billing_mode)?;
        answer(
            self.resellers
                .add_customer(&key, &partner_id, customer_id, mode)
                .await,
        )
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
        // The token is the last customer id of the page before.
        if !r.page_token.is_empty() {
            id_of(
                "page_token",
                &r.page_token,
                domain::MAX_EXISTING_CUSTOMER_ID_LEN,
            )?;
        }
        view(
            self.resellers
                .list_customers(partner_id, &r.page_token, page_size)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn get_customer(
        &self,
        req: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?;
        let customer_id = id("customer_id", &req.get_ref().customer_id)?;
        view(self.resellers.get_customer(partner_id, customer_id).await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn suspend_customer(
        &self,
        req: Request<pb::SuspendCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key("SuspendCustomer", &partner_id, &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        answer(
            self.resellers
                .change_customer(
                    &key,
                    &partner_id,
                    customer_id,
                    CustomerChange::Suspended(r.suspended),
                )
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn set_billing_mode(
        &self,
        req: Request<pb::SetBillingModeRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key("SetBillingMode", &partner_id, &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let mode = convert::billing_mode_from(r.billing_mode)?;
        answer(
            self.resellers
                .change_customer(
                    &key,
                    &partner_id,
                    customer_id,
                    CustomerChange::BillingMode(mode),
                )
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn charge_mailing(
        &self,
        req: Request<pb::ChargeMailingRequest>,
    ) -> Result<Response<pb::RoutedCharge>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key("ChargeMailing", &partner_id, &r.idempotency_key, &r)?;
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
                    SendOp::Charge,
                )
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
        let key = scoped_key("ReserveMailing", &partner_id, &r.idempotency_key, &r)?;
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
                    SendOp::Hold {
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
        let key = scoped_key("CaptureMailing", &partner_id, &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let reservation_id = id("reservation_id", &r.reservation_id)?;
        let sent = recipients("recipients_sent", r.recipients_sent, true)?;
        answer(
            self.resellers
                .settle_hold(&key, &partner_id, customer_id, reservation_id, Some(sent))
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, reservation = %req.get_ref().reservation_id))]
    async fn release_mailing(
        &self,
        req: Request<pb::ReleaseMailingRequest>,
    ) -> Result<Response<pb::RoutedReservation>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key("ReleaseMailing", &partner_id, &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let reservation_id = id("reservation_id", &r.reservation_id)?;
        answer(
            self.resellers
                .settle_hold(&key, &partner_id, customer_id, reservation_id, None)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn set_customer_limit(
        &self,
        req: Request<pb::SetCustomerLimitRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key("SetCustomerLimit", &partner_id, &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        let limit = i64::try_from(r.monthly_credit_limit)
            .ok()
            .filter(|l| *l <= domain::MAX_CREDITS)
            .ok_or_else(|| {
                ResellerError::invalid(
                    "monthly_credit_limit",
                    format!("at most {} credits", domain::MAX_CREDITS),
                )
            })?;
        answer(
            self.resellers
                .change_customer(&key, &partner_id, customer_id, CustomerChange::Limit(limit))
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id, customer = %req.get_ref().customer_id))]
    async fn allocate_credits(
        &self,
        req: Request<pb::AllocateCreditsRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key("AllocateCredits", &partner_id, &r.idempotency_key, &r)?;
        let customer_id = id("customer_id", &r.customer_id)?;
        if r.credits == 0 || r.credits > domain::MAX_CREDITS.unsigned_abs() {
            return Err(ResellerError::invalid(
                "credits",
                format!("must be 1 to {}", domain::MAX_CREDITS),
            )
            .into());
        }
        answer(
            self.resellers
                .allocate(&key, &partner_id, customer_id, r.credits)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn set_resale_prices(
        &self,
        req: Request<pb::SetResalePricesRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key("SetResalePrices", &partner_id, &r.idempotency_key, &r)?;
        let prices = r
            .resale_prices
            .as_ref()
            .ok_or_else(|| ResellerError::invalid("resale_prices", "is required"))?;
        answer(
            self.resellers
                .set_resale_prices(&key, &partner_id, prices)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn get_usage_statement(
        &self,
        req: Request<pb::GetUsageStatementRequest>,
    ) -> Result<Response<pb::UsageStatement>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?;
        let r = req.get_ref();
        view(self.resellers.statement(partner_id, r.year, r.month).await)
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn configure_partner_reminder(
        &self,
        req: Request<pb::ConfigurePartnerReminderRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key(
            "ConfigurePartnerReminder",
            &partner_id,
            &r.idempotency_key,
            &r,
        )?;
        if r.threshold > domain::MAX_CREDITS.unsigned_abs() {
            return Err(ResellerError::invalid(
                "threshold",
                format!("at most {} credits", domain::MAX_CREDITS),
            )
            .into());
        }
        answer(
            self.resellers
                .partner_reminder(&key, &partner_id, r.threshold)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(partner = %req.get_ref().partner_id))]
    async fn configure_partner_auto_top_up(
        &self,
        req: Request<pb::ConfigurePartnerAutoTopUpRequest>,
    ) -> Result<Response<pb::Partner>, Status> {
        let partner_id = partner(&req, &req.get_ref().partner_id)?.to_string();
        let r = req.into_inner();
        let key = scoped_key(
            "ConfigurePartnerAutoTopUp",
            &partner_id,
            &r.idempotency_key,
            &r,
        )?;
        let top_up = r
            .auto_top_up
            .ok_or_else(|| ResellerError::invalid("auto_top_up", "is required"))?;
        answer(
            self.resellers
                .partner_auto_top_up(&key, &partner_id, top_up, r.payment_method)
                .await,
        )
    }

    type WatchEventsStream = ReceiverStream<Result<Event, Status>>;

    /// A partner-bound token sees its own partner's events only: every event's subject is the
    /// partner it concerns.
    #[tracing::instrument(skip_all, fields(after = req.get_ref().after_cursor))]
    async fn watch_events(
        &self,
        req: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let subject = bound_partner(&req).map(str::to_string);
        Ok(Response::new(self.platform.outbox.watch_subject(
            req.into_inner(),
            subject,
            self.platform.shutdown.clone(),
        )))
    }
}
