//! The subscription service: plans priced by contact tiers, seats, levels, products and add-ons; trials, prorated changes, renewals, invoices and contact slots (rules S1-S19).
//!
//! Layers: `grpc` converts messages and maps errors; the runtime (`shared/runtime`) brings
//! storage, idempotency, the outbox and the middleware.

pub mod grpc;

use runtime::{
    Platform, ServiceSpec,
    auth::{MethodScopes, Scope},
    config::ServiceDefaults,
    db::Migrations,
};

/// Full gRPC name of the service.
pub const SERVICE: &str = "billing.subscription.v1.Subscriptions";

/// Name, environment prefix (`SUBSCRIPTION_`), default ports and PostgreSQL schema.
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "subscription",
    env_prefix: "SUBSCRIPTION",
    grpc_port: 50052,
    metrics_port: 9102,
    schema: "subscription",
};

/// What the runtime needs to know to serve this service.
pub const SPEC: ServiceSpec = ServiceSpec {
    defaults: DEFAULTS,
    grpc_services: &[SERVICE],
    scopes,
    migrations,
};

/// The scope each RPC requires.
pub fn scopes() -> MethodScopes {
    MethodScopes::new().require(SERVICE, "WatchEvents", Scope::Read)
}

/// This service's migrations, embedded, per backend.
pub fn migrations() -> Migrations {
    Migrations {
        sqlite: sqlx::migrate!("migrations/sqlite"),
        postgres: sqlx::migrate!("migrations/postgres"),
    }
}

/// The service's gRPC routes.
pub fn routes(platform: &Platform) -> anyhow::Result<tonic::service::Routes> {
    Ok(tonic::service::Routes::new(
        proto::subscription::v1::subscriptions_server::SubscriptionsServer::new(
            grpc::SubscriptionsApi::new(platform.clone()),
        ),
    ))
}
