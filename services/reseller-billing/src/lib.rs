//! The reseller-billing service: partners, their sub-accounts, and who pays each customer's sends (rules W1-W5).
//!
//! Layers, each importing only those before it: `domain` (who pays, caps, resale amounts; no
//! IO); `model` (stored records, statuses as enums, what use cases answer); `store` (SQL, both
//! backends); `convert` (records and results <-> protobuf messages); `routing` (the customer a
//! send is routed on, locked); `wallet` (the credits-wallet client, keys derived from the
//! caller's); `service` (use cases, one file per family, and `service::group_commit`: steps 1
//! and 3 of a send, in a group commit or alone); `jobs` (relay of the partner wallets' events); `grpc` (validation,
//! partner-bound tokens, status codes).

pub mod convert;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod model;
pub mod routing;
pub mod service;
pub mod store;
pub mod wallet;

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
    // Every send is paid at the wallet: reseller-billing cannot serve without it.
    peers: &[runtime::config::PeerSpec {
        name: "wallet",
        service: "credits-wallet",
        required: true,
    }],
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
    let mut scopes = MethodScopes::new();
    for method in [
        "GetPartner",
        "ListCustomers",
        "GetCustomer",
        "GetUsageStatement",
        "WatchEvents",
    ] {
        scopes = scopes.require(SERVICE, method, Scope::Read);
    }
    for method in [
        "AddCustomer",
        "SuspendCustomer",
        "SetBillingMode",
        "ChargeMailing",
        "ReserveMailing",
        "CaptureMailing",
        "ReleaseMailing",
        "SetCustomerLimit",
        "AllocateCredits",
        "SetResalePrices",
        "ConfigurePartnerReminder",
        "ConfigurePartnerAutoTopUp",
    ] {
        scopes = scopes.require(SERVICE, method, Scope::Mutate);
    }
    scopes.require(SERVICE, "RegisterPartner", Scope::Admin)
}

/// This service's migrations, embedded, per backend.
pub fn migrations() -> Migrations {
    Migrations {
        sqlite: sqlx::migrate!("migrations/sqlite"),
        postgres: sqlx::migrate!("migrations/postgres"),
    }
}

/// The service's gRPC routes, with the wallet-event relay started. Needs the `wallet` peer.
pub fn routes(platform: &Platform) -> anyhow::Result<tonic::service::Routes> {
    let wallet = wallet::Wallet::connect(&platform.config)?;
    // One collector per step on either backend: a partner's customers all send at once, and
    // one queue makes fewer, larger batches than four (reseller-hot on PostgreSQL: 4,145/s
    // with 1, 3,375/s with 4, and a lower p99; docs/benchmarks.md).
    let shards = platform.config.group_commit_shards.unwrap_or(1);
    let sends = service::group_commit::SendSteps::batched(
        platform.clone(),
        service::group_commit::MAX_BATCH,
        shards,
    );
    let resellers = service::Resellers::new(platform.clone(), wallet.clone(), sends);
    jobs::spawn(platform, resellers.clone(), wallet);
    Ok(tonic::service::Routes::new(
        proto::reseller::v1::reseller_billing_server::ResellerBillingServer::new(
            grpc::ResellerBillingApi::new(platform.clone(), resellers),
        )
        .max_decoding_message_size(platform.config.max_request_bytes)
        .max_encoding_message_size(platform.config.max_response_bytes),
    ))
}
