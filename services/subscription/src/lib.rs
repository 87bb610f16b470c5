//! The subscription service: plans priced by contact tiers, seats, levels, products and add-ons; trials, prorated changes, renewals, invoices and contact slots (rules S1-S19).
//!
//! Layers, each calling only the ones below it: `grpc` (requests validated into commands, the
//! actor check of S5, errors to status codes) -> `service` (the use cases, one file per family:
//! catalog, signup, contacts, changes, invoices, sending, payment, reconciliation, renewal,
//! collection; gateway and wallet calls between transactions) -> `unit` (one locked
//! subscription: changes, history and events saved together) -> `store` (SQL, both backends,
//! one file per table family) -> `domain` (rules, no IO) and `model` (records and the use
//! cases' answers). `convert` turns answers into messages (`convert::Reply`) and messages into
//! domain types; `wallet` is the credits-wallet peer; `jobs` runs direct-debit polling,
//! reconciliation of payments with an unknown outcome, renewal, collection, trial ends and
//! monthly credit grants. The runtime (`shared/runtime`) brings storage, idempotency, the
//! outbox and the middleware.

pub mod convert;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod model;
pub mod service;
pub mod store;
pub mod unit;
pub mod wallet;

use runtime::{
    Platform, ServiceSpec,
    auth::{MethodScopes, Scope},
    config::ServiceDefaults,
    db::Migrations,
};

/// Full gRPC name of the subscriptions service.
pub const SERVICE: &str = "billing.subscription.v1.Subscriptions";
/// Full gRPC name of the catalog service.
pub const CATALOG: &str = "billing.subscription.v1.Catalog";

/// Name, environment prefix (`SUBSCRIPTION_`), default ports and PostgreSQL schema.
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "subscription",
    env_prefix: "SUBSCRIPTION",
    grpc_port: 50052,
    metrics_port: 9102,
    schema: "subscription",
    // Only the monthly credit grants need the wallet, and they wait for it: not required.
    peers: &[runtime::config::PeerSpec {
        name: "wallet",
        service: "credits-wallet",
        required: false,
    }],
};

/// What the runtime needs to know to serve this service.
pub const SPEC: ServiceSpec = ServiceSpec {
    defaults: DEFAULTS,
    grpc_services: &[SERVICE, CATALOG],
    scopes,
    migrations,
};

/// The scope each RPC requires. Requests on behalf of a user also need `act-for-user` (S5),
/// checked by the handlers since it depends on the request's actor.
pub fn scopes() -> MethodScopes {
    let mut scopes = MethodScopes::new()
        .require(CATALOG, "ListPlans", Scope::Read)
        .require(CATALOG, "GetPlan", Scope::Read)
        .require(CATALOG, "PublishPlan", Scope::Admin);
    for method in [
        "WatchEvents",
        "GetSubscription",
        "GetContactUsage",
        "PreviewChange",
        "ListChangeRequests",
        "ListInvoices",
        "GetInvoice",
        "CheckSending",
    ] {
        scopes = scopes.require(SERVICE, method, Scope::Read);
    }
    for method in [
        "StartTrial",
        "Subscribe",
        "AdmitContacts",
        "ReleaseContacts",
        "ApplyChange",
        "CancelAddOn",
        "Cancel",
        "Resume",
        "RecordMailsSent",
        "UpdatePaymentMethod",
    ] {
        scopes = scopes.require(SERVICE, method, Scope::Mutate);
    }
    for method in [
        "VerifyAccount",
        "ResolveChangeRequest",
        "RecordBankTransfer",
    ] {
        scopes = scopes.require(SERVICE, method, Scope::Admin);
    }
    scopes
}

/// This service's migrations, embedded, per backend.
pub fn migrations() -> Migrations {
    Migrations {
        sqlite: sqlx::migrate!("migrations/sqlite"),
        postgres: sqlx::migrate!("migrations/postgres"),
    }
}

/// The service's gRPC routes, with its background jobs started. Payments go through the
/// provider `payment_provider` selects (`runtime::payments`: the simulator, whose bank settles
/// direct debits as the jobs move it with the clock, or Stripe); subscription credits are
/// granted through the wallet peer (`[peers.wallet]`) when one is configured.
pub fn routes(platform: &Platform) -> anyhow::Result<tonic::service::Routes> {
    let wallet = wallet::Wallet::connect(&platform.config)?;
    if wallet.is_none() {
        tracing::info!("no [peers.wallet] configured: subscription credits are not granted");
    }
    let gateways = runtime::payments::Gateways::from_config(&platform.config)?;
    let cases = service::Subscriptions::new(platform.clone(), gateways.gateway, wallet);
    jobs::spawn(platform, cases.clone(), gateways.simulator);
    // Stripe's webhooks, on the metrics listener, when the endpoint has a signing secret.
    platform.serve_stripe_webhooks(std::sync::Arc::new(service::StripeEvents(cases.clone())));
    Ok(tonic::service::Routes::new(
        proto::subscription::v1::subscriptions_server::SubscriptionsServer::new(
            grpc::SubscriptionsApi::new(platform.clone(), cases.clone()),
        )
        .max_decoding_message_size(platform.config.max_request_bytes)
        .max_encoding_message_size(platform.config.max_response_bytes),
    )
    .add_service(
        proto::subscription::v1::catalog_server::CatalogServer::new(grpc::CatalogApi::new(cases))
            .max_decoding_message_size(platform.config.max_request_bytes)
            .max_encoding_message_size(platform.config.max_response_bytes),
    ))
}
