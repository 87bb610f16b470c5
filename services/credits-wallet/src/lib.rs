//! The credits-wallet service: prepaid credits, rated debits, holds, expiry, reminders, auto top-up and on-demand charging (rules C1-C9).
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
pub const SERVICE: &str = "billing.wallet.v1.CreditsWallet";

/// Name, environment prefix (`WALLET_`), default ports and PostgreSQL schema.
pub const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "credits-wallet",
    env_prefix: "WALLET",
    grpc_port: 50051,
    metrics_port: 9101,
    schema: "wallet",
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
        proto::wallet::v1::credits_wallet_server::CreditsWalletServer::new(
            grpc::CreditsWalletApi::new(platform.clone()),
        ),
    ))
}
