//! The credits-wallet service: prepaid credits, rated debits, holds, expiry, reminders, auto top-up and on-demand charging (rules C1-C9).
//!
//! Layers: `domain` (rules, no IO) and `model` (records); `store` (SQL, both backends);
//! `account` (one locked wallet: rules applied, invariant checked, saved with events);
//! `service` (use cases by family, gateway calls between transactions, the send rules and the
//! group-commit front the send use cases try first); `jobs` (settlement,
//! reconciliation, sweeps); `verify` (the books re-derived from the rows: `VerifyLedger` and
//! the `verify-ledger` command); `convert` and `grpc` (messages and status codes). The runtime
//! (`shared/runtime`) brings storage, idempotency keys, the outbox and the middleware.

pub mod account;
pub mod convert;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod model;
pub mod service;
pub mod store;
pub mod verify;

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
    peers: &[],
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
        "GetWallet",
        "QuoteCreditPurchase",
        "RateMailing",
        "ListLedgerEntries",
        "WatchEvents",
    ] {
        scopes = scopes.require(SERVICE, method, Scope::Read);
    }
    for method in [
        "OpenWallet",
        "PurchaseCredits",
        "GrantCredits",
        "ChargeMailing",
        "ReserveCredits",
        "CaptureReservation",
        "ReleaseReservation",
        "ConfigureAutoTopUp",
        "ConfigureLowBalanceReminder",
        "SetFundingMode",
        "TransferCredits",
    ] {
        scopes = scopes.require(SERVICE, method, Scope::Mutate);
    }
    scopes
        .require(SERVICE, "AdjustCredits", Scope::Admin)
        .require(SERVICE, "VerifyLedger", Scope::Admin)
}

/// This service's migrations, embedded, per backend.
pub fn migrations() -> Migrations {
    Migrations {
        sqlite: sqlx::migrate!("migrations/sqlite"),
        postgres: sqlx::migrate!("migrations/postgres"),
    }
}

/// The service's gRPC routes, with its background jobs started. Payments go through the
/// provider `payment_provider` selects (`runtime::payments`): the deterministic simulator by
/// default, or Stripe.
pub fn routes(platform: &Platform) -> anyhow::Result<tonic::service::Routes> {
    let gateways = runtime::payments::Gateways::from_config(&platform.config)?;
    let shards = platform
        .config
        .group_commit_shards
        .unwrap_or(match platform.db.backend() {
            // One writer at a time is all SQLite has: a second batch would only wait for it.
            runtime::db::Backend::Sqlite => 1,
            // Batches of different wallets run side by side (spread sends: 6,111/s with 4,
            // 5,711/s with 1, docs/benchmarks.md); a hot wallet's sends all meet in its
            // shard's queue and commit together.
            runtime::db::Backend::Postgres => 4,
        });
    let wallets = service::Wallets::new(platform.clone(), gateways.gateway);
    // Group commit for sends paid from the balance and captures: up to `MAX_BATCH` per
    // transaction, at most `shards` transactions at a time, a wallet's always in the same shard.
    let group_commit = service::group_commit::GroupCommit::start(
        wallets.clone(),
        service::group_commit::MAX_BATCH,
        shards,
    );
    jobs::spawn(platform, wallets.clone(), gateways.simulator);
    // Stripe's webhooks, on the metrics listener, when the endpoint has a signing secret.
    platform.serve_stripe_webhooks(std::sync::Arc::new(service::purchases::StripeEvents(
        wallets.clone(),
    )));
    Ok(tonic::service::Routes::new(
        proto::wallet::v1::credits_wallet_server::CreditsWalletServer::new(
            grpc::CreditsWalletApi::new(platform.clone(), wallets, Some(group_commit)),
        )
        .max_decoding_message_size(platform.config.max_request_bytes)
        .max_encoding_message_size(platform.config.max_response_bytes),
    ))
}
