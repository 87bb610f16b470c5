//! `billing.subscription.v1.Catalog` and `.Subscriptions`: validate requests into typed
//! commands, check the actor (S5), call the use cases, map errors to status codes. No business
//! rule lives here.

use proto::{
    common::v1::{Event, WatchEventsRequest},
    subscription::v1::{self as pb, catalog_server::Catalog, subscriptions_server::Subscriptions},
};
use runtime::convert::{answer, count, id, reply as ok, view};
use runtime::{
    Platform,
    auth::Scope,
    idempotency::IdempotencyKey,
    payments::{MethodKind, PaymentProvider},
};
use rust_decimal::Decimal;
use shared::limits::{self, quoted};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    convert::{self, ChangeRequest as ChangeAsked},
    domain::{self, Change},
    error::SubError,
    model::PaymentKind,
    service::{Actor, PaymentChoice, SubscribeCmd, Subscriptions as UseCases},
};

/// A change as asked, within the limits: counts in range, codes and plan ids well-formed.
fn change(c: Option<&pb::Change>) -> Result<ChangeAsked, SubError> {
    let asked = convert::change_from(c)?;
    match &asked {
        ChangeAsked::Plain(Change::Contacts(n)) => {
            domain::check_contacts("change.contacts", *n)?;
        }
        ChangeAsked::Plain(Change::Seats(n)) => {
            domain::check_seats("change.seats", *n)?;
        }
        ChangeAsked::Plain(Change::AddAddOn(code)) => {
            limits::check_code("change.add_add_on", code).map_err(SubError::from)?;
        }
        ChangeAsked::Plain(Change::RemoveAddOn(code)) => {
            limits::check_code("change.remove_add_on", code).map_err(SubError::from)?;
        }
        ChangeAsked::Level(plan) => {
            id("change.level_plan_id", plan)?;
        }
        ChangeAsked::Product(plan) => {
            id("change.product_plan_id", plan)?;
        }
        ChangeAsked::Plain(Change::Level { .. } | Change::Product { .. }) => {}
    }
    Ok(asked)
}

/// S5: a request for an end user needs the act-for-user scope and a user with billing
/// permission; a request without a user is the platform (named by its token).
fn actor<T>(req: &Request<T>, actor: Option<&pb::Actor>) -> Result<Actor, Status> {
    let principal = runtime::auth::principal(req)?;
    match actor {
        Some(a) if !a.user_id.is_empty() => {
            // Checked first: a blank, NUL-carrying or oversized user id is no user (it would be
            // recorded as the actor of the history, S5), and the refusals below quote it.
            id("actor.user_id", &a.user_id)?;
            if !principal.has(Scope::ActForUser) {
                return Err(SubError::PermissionDenied(format!(
                    "token {} lacks the act-for-user scope needed to act for user {}",
                    quoted(&principal.name),
                    quoted(&a.user_id)
                ))
                .into());
            }
            if !a.billing_permission {
                return Err(SubError::PermissionDenied(format!(
                    "user {} has no billing permission: only the primary admin or users with account-management access may see or change billing",
                    quoted(&a.user_id)
                ))
                .into());
            }
            Ok(Actor(format!("user:{}", a.user_id)))
        }
        _ => Ok(Actor(format!("service:{}", principal.name))),
    }
}

/// A VAT rate: plain, unsigned (no `-0`), in `[0, 1)`, at most
/// `shared::limits::MAX_VAT_RATE_DECIMALS` decimals.
fn vat_rate(s: &str) -> Result<Decimal, SubError> {
    limits::parse_vat_rate("vat_rate", s).map_err(SubError::from)
}

/// How to pay: a card token, a direct-debit mandate token, or bank transfer. Which tokens are
/// cards or mandates is the provider's (`payment_provider`): the simulator's tokens say it; a
/// saved Stripe method (`cus_...:pm_...`) is taken for either kind, and Stripe's answer
/// (`succeeded`, or `processing` for a SEPA debit) decides whether the invoice is paid or pending.
fn payment_choice(
    provider: PaymentProvider,
    payment: Option<&pb::Payment>,
) -> Result<PaymentChoice, SubError> {
    let payment = payment.ok_or_else(|| SubError::invalid("payment", "is required"))?;
    let token = payment.payment_method.as_str();
    let method = provider.method_kind(token);
    let kind = match pb::PaymentKind::try_from(payment.kind) {
        Ok(pb::PaymentKind::Card)
            if matches!(method, Some(MethodKind::Card | MethodKind::Saved)) =>
        {
            PaymentKind::Card
        }
        Ok(pb::PaymentKind::DirectDebit)
            if matches!(method, Some(MethodKind::DirectDebit | MethodKind::Saved)) =>
        {
            PaymentKind::DirectDebit
        }
        Ok(pb::PaymentKind::Card) if method == Some(MethodKind::DirectDebit) => {
            return Err(SubError::invalid(
                "payment.payment_method",
                format!(
                    "{} is a direct-debit mandate: use PAYMENT_KIND_DIRECT_DEBIT",
                    runtime::convert::shown(token)
                ),
            ));
        }
        Ok(pb::PaymentKind::Card | pb::PaymentKind::DirectDebit) => {
            return Err(SubError::invalid(
                "payment.payment_method",
                format!(
                    "{} is not a payment method of this kind the gateway knows ({})",
                    runtime::convert::shown(token),
                    provider.expected_tokens()
                ),
            ));
        }
        Ok(pb::PaymentKind::BankTransfer) => {
            return Ok(PaymentChoice {
                kind: PaymentKind::BankTransfer,
                method: String::new(),
            });
        }
        _ => {
            return Err(SubError::invalid(
                "payment.kind",
                "must be PAYMENT_KIND_CARD, PAYMENT_KIND_DIRECT_DEBIT or PAYMENT_KIND_BANK_TRANSFER",
            ));
        }
    };
    Ok(PaymentChoice {
        kind,
        method: token.to_string(),
    })
}

/// The catalog's gRPC face.
pub struct CatalogApi {
    cases: UseCases,
}

impl CatalogApi {
    /// Serves `cases`.
    pub fn new(cases: UseCases) -> Self {
        Self { cases }
    }
}

#[tonic::async_trait]
impl Catalog for CatalogApi {
    #[tracing::instrument(skip_all)]
    async fn publish_plan(
        &self,
        req: Request<pb::PublishPlanRequest>,
    ) -> Result<Response<pb::Plan>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("PublishPlan", &r.idempotency_key, &r)?;
        let spec = r
            .plan
            .as_ref()
            .ok_or_else(|| Status::from(SubError::invalid("plan", "is required")))?;
        id("plan.plan_id", &spec.plan_id)?;
        if let Some(tiers) = &spec.contact_tiers
            && tiers.tiers.len() > limits::MAX_TIERS
        {
            return Err(SubError::invalid(
                "plan.contact_tiers",
                format!("at most {} bands", limits::MAX_TIERS),
            )
            .into());
        }
        let plan = convert::plan_from(spec)?;
        answer(self.cases.publish_plan(&key, plan).await)
    }

    #[tracing::instrument(skip_all)]
    async fn list_plans(
        &self,
        req: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let r = req.into_inner();
        let product = if r.product == pb::Product::Unspecified as i32 {
            None
        } else {
            Some(convert::product_from(r.product, "product")?)
        };
        ok(self
            .cases
            .list_plans(product, r.all_versions)
            .await
            .map(|v| convert::plan_list(&v)))
    }

    #[tracing::instrument(skip_all, fields(plan = %req.get_ref().plan_id))]
    async fn get_plan(
        &self,
        req: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::Plan>, Status> {
        let r = req.into_inner();
        id("plan_id", &r.plan_id)?;
        let version = (r.version != 0).then_some(r.version);
        view(self.cases.get_plan(&r.plan_id, version).await)
    }
}

/// The subscriptions' gRPC face.
pub struct SubscriptionsApi {
    platform: Platform,
    cases: UseCases,
}

impl SubscriptionsApi {
    /// Serves `cases` on `platform`.
    pub fn new(platform: Platform, cases: UseCases) -> Self {
        Self { platform, cases }
    }
}

#[tonic::async_trait]
impl Subscriptions for SubscriptionsApi {
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

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn start_trial(
        &self,
        req: Request<pb::StartTrialRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let admin = runtime::auth::principal(&req)?.has(Scope::Admin);
        let r = req.into_inner();
        let key = IdempotencyKey::new("StartTrial", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        id("plan_id", &r.plan_id)?;
        let terms = r.terms_override.as_ref().map(convert::terms_from);
        if terms.is_some() && !admin {
            return Err(SubError::PermissionDenied(
                "larger trials are granted by hand: terms_override needs the admin scope".into(),
            )
            .into());
        }
        if let Some(t) = &terms {
            t.validate("terms_override").map_err(SubError::from)?;
        }
        let contacts = (r.contacts != 0)
            .then(|| domain::check_contacts("contacts", r.contacts))
            .transpose()
            .map_err(SubError::from)?;
        answer(
            self.cases
                .start_trial(&key, &who, account, &r.plan_id, contacts, terms)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("Subscribe", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?.to_string();
        id("plan_id", &r.plan_id)?;
        let selection = domain::Selection::new(r.contacts, r.seats, r.add_ons.clone())
            .map_err(SubError::from)?;
        let payment = payment_choice(self.platform.config.payment_provider, r.payment.as_ref())?;
        let cmd = SubscribeCmd {
            account_id: account,
            plan_id: r.plan_id.clone(),
            selection,
            payment,
            vat_rate: vat_rate(&r.vat_rate)?,
        };
        answer(self.cases.subscribe(&key, &who, cmd).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn get_subscription(
        &self,
        req: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let account = id("account_id", &r.account_id)?;
        view(self.cases.get_subscription(account).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn verify_account(
        &self,
        req: Request<pb::VerifyAccountRequest>,
    ) -> Result<Response<pb::VerifyAccountResponse>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("VerifyAccount", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        answer(self.cases.verify_account(&key, &who, account).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn admit_contacts(
        &self,
        req: Request<pb::AdmitContactsRequest>,
    ) -> Result<Response<pb::AdmitContactsResponse>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("AdmitContacts", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        let n = count("contacts", r.contacts, limits::MAX_CONTACTS)?;
        answer(self.cases.admit_contacts(&key, account, n).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn release_contacts(
        &self,
        req: Request<pb::ReleaseContactsRequest>,
    ) -> Result<Response<pb::ContactUsage>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("ReleaseContacts", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        if r.subscribed == 0 && r.pending == 0 {
            return Err(SubError::invalid("subscribed", "release at least one contact").into());
        }
        for (field, n) in [("subscribed", r.subscribed), ("pending", r.pending)] {
            if n > limits::MAX_CONTACTS {
                return Err(SubError::invalid(
                    field,
                    format!("must be at most {}", limits::MAX_CONTACTS),
                )
                .into());
            }
        }
        answer(
            self.cases
                .release_contacts(&key, account, r.subscribed, r.pending)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn get_contact_usage(
        &self,
        req: Request<pb::GetContactUsageRequest>,
    ) -> Result<Response<pb::ContactUsage>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let account = id("account_id", &r.account_id)?;
        view(self.cases.contact_usage(account).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn preview_change(
        &self,
        req: Request<pb::PreviewChangeRequest>,
    ) -> Result<Response<pb::ChangePreview>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let account = id("account_id", &r.account_id)?;
        let asked = change(r.change.as_ref())?;
        view(self.cases.preview_change(account, &asked).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn apply_change(
        &self,
        req: Request<pb::ApplyChangeRequest>,
    ) -> Result<Response<pb::ApplyChangeResponse>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("ApplyChange", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        let asked = change(r.change.as_ref())?;
        id("preview_token", &r.preview_token)?;
        answer(
            self.cases
                .apply_change(&key, &who, account, &asked, &r.preview_token)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn list_change_requests(
        &self,
        req: Request<pb::ListChangeRequestsRequest>,
    ) -> Result<Response<pb::ListChangeRequestsResponse>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        if !r.account_id.is_empty() {
            id("account_id", &r.account_id)?;
        }
        ok(self
            .cases
            .list_requests(&r.account_id, r.open_only)
            .await
            .map(|v| convert::request_list(&v)))
    }

    #[tracing::instrument(skip_all, fields(request = %req.get_ref().request_id))]
    async fn resolve_change_request(
        &self,
        req: Request<pb::ResolveChangeRequestRequest>,
    ) -> Result<Response<pb::ChangeRequest>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("ResolveChangeRequest", &r.idempotency_key, &r)?;
        let request_id = id("request_id", &r.request_id)?;
        limits::check_text("note", &r.note, limits::MAX_NOTE_LEN, false).map_err(SubError::from)?;
        answer(
            self.cases
                .resolve_request(&key, &who, request_id, r.approve, &r.note)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn cancel_add_on(
        &self,
        req: Request<pb::CancelAddOnRequest>,
    ) -> Result<Response<pb::CancelAddOnResponse>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("CancelAddOn", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        limits::check_code("add_on", &r.add_on).map_err(SubError::from)?;
        let code = r.add_on.as_str();
        answer(self.cases.cancel_add_on(&key, &who, account, code).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("Cancel", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        answer(self.cases.cancel(&key, &who, account, false).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn resume(
        &self,
        req: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("Resume", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        answer(self.cases.cancel(&key, &who, account, true).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn list_invoices(
        &self,
        req: Request<pb::ListInvoicesRequest>,
    ) -> Result<Response<pb::ListInvoicesResponse>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let account = id("account_id", &r.account_id)?;
        ok(self
            .cases
            .list_invoices(account)
            .await
            .map(|v| convert::invoice_list(&v)))
    }

    #[tracing::instrument(skip_all, fields(invoice = %req.get_ref().invoice_id))]
    async fn get_invoice(
        &self,
        req: Request<pb::GetInvoiceRequest>,
    ) -> Result<Response<pb::Invoice>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let invoice = id("invoice_id", &r.invoice_id)?;
        view(self.cases.get_invoice(invoice).await)
    }

    #[tracing::instrument(skip_all, fields(invoice = %req.get_ref().invoice_id))]
    async fn record_bank_transfer(
        &self,
        req: Request<pb::RecordBankTransferRequest>,
    ) -> Result<Response<pb::Invoice>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("RecordBankTransfer", &r.idempotency_key, &r)?;
        let invoice = id("invoice_id", &r.invoice_id)?;
        let amount = r
            .amount
            .as_ref()
            .ok_or_else(|| SubError::invalid("amount", "is required"))
            .and_then(|m| {
                limits::parse_amount("amount", &m.amount, &m.currency).map_err(SubError::from)
            })?;
        answer(
            self.cases
                .record_bank_transfer(&key, &who, invoice, amount)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn update_payment_method(
        &self,
        req: Request<pb::UpdatePaymentMethodRequest>,
    ) -> Result<Response<pb::UpdatePaymentMethodResponse>, Status> {
        let who = actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("UpdatePaymentMethod", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        let payment = payment_choice(self.platform.config.payment_provider, r.payment.as_ref())?;
        answer(
            self.cases
                .update_payment_method(&key, &who, account, payment)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn check_sending(
        &self,
        req: Request<pb::CheckSendingRequest>,
    ) -> Result<Response<pb::SendingDecision>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let account = id("account_id", &r.account_id)?;
        if r.mails > limits::MAX_RECIPIENTS {
            return Err(SubError::invalid(
                "mails",
                format!("must be at most {}", limits::MAX_RECIPIENTS),
            )
            .into());
        }
        view(self.cases.check_sending(account, r.mails).await)
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn record_mails_sent(
        &self,
        req: Request<pb::RecordMailsSentRequest>,
    ) -> Result<Response<pb::SendingDecision>, Status> {
        actor(&req, req.get_ref().actor.as_ref())?;
        let r = req.into_inner();
        let key = IdempotencyKey::new("RecordMailsSent", &r.idempotency_key, &r)?;
        let account = id("account_id", &r.account_id)?;
        let n = count("mails", r.mails, limits::MAX_RECIPIENTS)?;
        answer(self.cases.record_mails_sent(&key, account, n).await)
    }
}
