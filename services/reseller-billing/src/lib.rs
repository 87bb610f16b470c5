//! The reseller-billing service: partners, their sub-accounts, and who pays each customer's sends (rules W1-W5).
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
pub const SERVICE: &str = "billing.reseller.v1.ResellerBilling";

/// Name, environment prefix (`RESELLER_`), default ports and PostgreSQL schema.
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "reseller-billing",
    env_prefix: "RESELLER",
    grpc_port: 50053,
    metrics_port: 9103,
    schema: "reseller",
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
        proto::reseller::v1::reseller_billing_server::ResellerBillingServer::new(
            grpc::ResellerBillingApi::new(platform.clone()),
        ),
    ))
}
