//! `cargo run -p suite`: the three services in one process on the embedded default.
//!
//! Each service reads its usual `{PREFIX}_*` settings; anything unset falls back to the
//! embedded default (SQLite files under `./data/`, ports 50051-50053, metrics 9101-9103) and,
//! when no tokens are configured, to one development token with every scope
//! (`BILLING_DEV_TOKEN`, default `dev-admin-token`) that is printed at start. The
//! reseller-billing and subscription services are pointed at the credits-wallet service they call.

use std::{collections::BTreeMap, process::ExitCode};

use runtime::{
    Running, ServiceSpec,
    config::{Environment, ProcessEnv, ServiceConfig},
    server,
};

/// The process environment, then the suite's development defaults.
struct SuiteEnv {
    defaults: BTreeMap<String, String>,
}

impl Environment for SuiteEnv {
    fn var(&self, name: &str) -> Option<String> {
        ProcessEnv
            .var(name)
            .or_else(|| self.defaults.get(name).cloned())
    }
}

async fn start(
    spec: &ServiceSpec,
    env: &SuiteEnv,
    build: fn(&runtime::Platform) -> anyhow::Result<tonic::service::Routes>,
) -> anyhow::Result<Running> {
    let config = ServiceConfig::load(&spec.defaults, env)?;
    server::start(spec, config, build).await
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("suite: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let token = ProcessEnv
        .var("BILLING_DEV_TOKEN")
        .unwrap_or_else(|| "dev-admin-token".into());
    let mut defaults = BTreeMap::new();
    for prefix in ["WALLET", "SUBSCRIPTION", "RESELLER"] {
        defaults.insert(
            format!("{prefix}_TOKENS"),
            format!("dev:{token}:read+mutate+admin+act-for-user"),
        );
    }
    let wallet_addr = ProcessEnv
        .var("WALLET_LISTEN_ADDR")
        .unwrap_or_else(|| format!("127.0.0.1:{}", credits_wallet::DEFAULTS.grpc_port));
    defaults.insert(
        "RESELLER_PEER_WALLET_URL".into(),
        format!("http://{wallet_addr}"),
    );
    defaults.insert("RESELLER_PEER_WALLET_TOKEN".into(), token.clone());
    let env = SuiteEnv { defaults };

    let log_config = ServiceConfig::load(&credits_wallet::DEFAULTS, &env)?;
    runtime::telemetry::init(log_config.log_format, &log_config.log_filter);

    let wallet = start(&credits_wallet::SPEC, &env, credits_wallet::routes).await?;
    let subscription = start(&subscription::SPEC, &env, subscription::routes).await?;
    let reseller = start(&reseller_billing::SPEC, &env, reseller_billing::routes).await?;

    let mut banner = String::from("billing suite is up (Ctrl-C stops it)\n");
    for (name, r) in [
        ("credits-wallet  ", &wallet),
        ("subscription    ", &subscription),
        ("reseller-billing", &reseller),
    ] {
        let metrics = r
            .metrics_addr
            .map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"));
        banner.push_str(&format!("  {name}  grpc {}  metrics {metrics}\n", r.addr));
    }
    banner.push_str(&format!(
        "  token: authorization: Bearer {token}  (development only)\n"
    ));
    print!("{banner}");

    server::shutdown_signal().await;
    tracing::info!("stopping the suite");
    let (a, b, c) = tokio::join!(wallet.stop(), subscription.stop(), reseller.stop());
    a.and(b).and(c)
}
