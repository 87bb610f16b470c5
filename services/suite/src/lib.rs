//! The three services in one process, as `cargo run -p suite` starts them (and the end-to-end
//! tests, through [`start`]).
//!
//! Each service reads its usual settings (`{PREFIX}_CONFIG` file, `{PREFIX}_*` environment); the
//! suite's development defaults apply only where neither sets the setting
//! ([`ServiceConfig::load_with_fallback`]):
//!
//! - tokens: one development token with every scope (`BILLING_DEV_TOKEN`, default
//!   `dev-admin-token`), printed at start;
//! - subscription's and reseller-billing's `wallet` peer: the address the credits-wallet service
//!   is serving on, with the development token (so subscription's monthly credits, C7, and
//!   reseller-billing's sends reach the wallet).
//!
//! Everything else falls back to each service's own defaults: SQLite files under `./data/`,
//! ports 50051-50053, metrics 9101-9103.

use std::{collections::BTreeMap, net::SocketAddr};

use runtime::{
    Running,
    config::{ConfigError, Environment, LogFormat, ServiceConfig, ServiceDefaults},
    server,
};

/// The variable naming the development token.
pub const DEV_TOKEN_ENV: &str = "BILLING_DEV_TOKEN";
/// The development token when [`DEV_TOKEN_ENV`] is unset.
pub const DEFAULT_DEV_TOKEN: &str = "dev-admin-token";

/// The three services, serving.
pub struct Suite {
    /// credits-wallet.
    pub wallet: Running,
    /// subscription, calling `wallet`.
    pub subscription: Running,
    /// reseller-billing, calling `wallet`.
    pub reseller: Running,
    dev_token: String,
    /// The services that accept the development token (those without tokens of their own).
    dev_token_services: Vec<&'static str>,
}

/// The development token of `env`.
pub fn dev_token(env: &dyn Environment) -> String {
    env.var(DEV_TOKEN_ENV)
        .unwrap_or_else(|| DEFAULT_DEV_TOKEN.into())
}

/// The suite's defaults for the service with `defaults`, as `{PREFIX}_*` variables:
/// the development token, and the `wallet` peer at `wallet_addr` for the services that call it.
pub fn fallback(
    defaults: &ServiceDefaults,
    dev_token: &str,
    wallet_addr: Option<SocketAddr>,
) -> BTreeMap<String, String> {
    let prefix = defaults.env_prefix;
    let mut vars = BTreeMap::from([(
        format!("{prefix}_TOKENS"),
        format!("dev:{dev_token}:read+mutate+admin+act-for-user"),
    )]);
    if let Some(addr) = wallet_addr
        && defaults.peers.iter().any(|p| p.name == "wallet")
    {
        vars.insert(
            format!("{prefix}_PEER_WALLET_URL"),
            format!("http://{addr}"),
        );
        vars.insert(format!("{prefix}_PEER_WALLET_TOKEN"), dev_token.into());
    }
    vars
}

/// The configuration of one service of the suite: `env` (and the file it names), then the
/// suite's [`fallback`].
pub fn config(
    defaults: &ServiceDefaults,
    env: &dyn Environment,
    wallet_addr: Option<SocketAddr>,
) -> Result<ServiceConfig, ConfigError> {
    let fallback = fallback(defaults, &dev_token(env), wallet_addr);
    ServiceConfig::load_with_fallback(defaults, env, &fallback)
}

/// The log settings of the suite (the wallet's: one process, one subscriber).
pub fn log_settings(env: &dyn Environment) -> Result<(LogFormat, String), ConfigError> {
    let c = config(&credits_wallet::DEFAULTS, env, None)?;
    Ok((c.log_format, c.log_filter))
}

/// Where a peer in this process reaches `addr`: an unspecified listen address (`0.0.0.0`,
/// `[::]`) is reached on loopback.
fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Starts the wallet, then subscription and reseller-billing pointed at it (unless their
/// configuration names another wallet).
pub async fn start(env: &dyn Environment) -> anyhow::Result<Suite> {
    let dev_token = dev_token(env);
    let mut dev_token_services = Vec::new();
    let mut uses_dev_token = |c: &ServiceConfig| {
        if c.tokens.iter().any(|t| t.token == dev_token) {
            dev_token_services.push(c.service_name);
        }
    };
    let wallet_config = config(&credits_wallet::DEFAULTS, env, None)?;
    uses_dev_token(&wallet_config);
    let wallet =
        server::start(&credits_wallet::SPEC, wallet_config, credits_wallet::routes).await?;
    let wallet_addr = Some(reachable(wallet.addr));

    let subscription_config = config(&subscription::DEFAULTS, env, wallet_addr)?;
    let reseller_config = config(&reseller_billing::DEFAULTS, env, wallet_addr)?;
    uses_dev_token(&subscription_config);
    uses_dev_token(&reseller_config);
    // A wallet whose tokens are configured does not know the development token: say so
    // rather than let every wallet call be refused later.
    let wallet_url = format!("http://{}", reachable(wallet.addr));
    let wallet_tokens = &wallet.platform.config.tokens;
    for (defaults, c) in [
        (&subscription::DEFAULTS, &subscription_config),
        (&reseller_billing::DEFAULTS, &reseller_config),
    ] {
        if let Ok(peer) = c.peer("wallet")
            && peer.url == wallet_url
            && !wallet_tokens.iter().any(|t| t.token == peer.token)
        {
            tracing::warn!(
                service = defaults.name,
                "the wallet does not accept this service's wallet peer token, so its wallet calls will be refused: set {}_PEER_WALLET_TOKEN to one of the wallet's tokens",
                defaults.env_prefix
            );
        }
    }
    let subscription = match server::start(
        &subscription::SPEC,
        subscription_config,
        subscription::routes,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let _ = wallet.stop().await;
            return Err(e);
        }
    };
    let reseller = match server::start(
        &reseller_billing::SPEC,
        reseller_config,
        reseller_billing::routes,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let _ = tokio::join!(wallet.stop(), subscription.stop());
            return Err(e);
        }
    };
    Ok(Suite {
        wallet,
        subscription,
        reseller,
        dev_token,
        dev_token_services,
    })
}

impl Suite {
    /// What `cargo run -p suite` prints once the three serve: addresses, metrics, and the
    /// development token where it is accepted (its value is the development default or the
    /// operator's `BILLING_DEV_TOKEN`, printed on purpose).
    pub fn banner(&self) -> String {
        let mut banner = String::from("billing suite is up (Ctrl-C stops it)\n");
        for (name, r) in [
            ("credits-wallet  ", &self.wallet),
            ("subscription    ", &self.subscription),
            ("reseller-billing", &self.reseller),
        ] {
            let metrics = r
                .metrics_addr
                .map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"));
            banner.push_str(&format!("  {name}  grpc {}  metrics {metrics}\n", r.addr));
        }
        match self.dev_token_services.len() {
            0 => banner.push_str("  tokens: as configured (no development token)\n"),
            3 => banner.push_str(&format!(
                "  token: authorization: Bearer {}  (development only)\n",
                self.dev_token
            )),
            _ => banner.push_str(&format!(
                "  token: authorization: Bearer {}  (development only; accepted by {} only: the others take their configured tokens)\n",
                self.dev_token,
                self.dev_token_services.join(", ")
            )),
        }
        banner
    }

    /// Stops the three gracefully.
    pub async fn stop(self) -> anyhow::Result<()> {
        let (a, b, c) = tokio::join!(
            self.wallet.stop(),
            self.subscription.stop(),
            self.reseller.stop()
        );
        a.and(b).and(c)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const WALLET: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50051);

    #[test]
    fn with_nothing_configured_every_service_gets_the_dev_token_and_the_callers_the_wallet() {
        let e = env(&[]);
        for defaults in [
            &credits_wallet::DEFAULTS,
            &subscription::DEFAULTS,
            &reseller_billing::DEFAULTS,
        ] {
            let c = config(defaults, &e, Some(WALLET)).unwrap();
            assert_eq!(c.tokens.len(), 1, "{}", defaults.name);
            assert_eq!(c.tokens[0].token, DEFAULT_DEV_TOKEN);
        }
        // Both callers of the wallet are pointed at it (subscription's monthly credits, C7).
        for defaults in [&subscription::DEFAULTS, &reseller_billing::DEFAULTS] {
            let c = config(defaults, &e, Some(WALLET)).unwrap();
            let peer = c.peer("wallet").unwrap();
            assert_eq!(peer.url, "http://127.0.0.1:50051", "{}", defaults.name);
            assert_eq!(peer.token, DEFAULT_DEV_TOKEN);
        }
        let e = env(&[(DEV_TOKEN_ENV, "my-dev-token-1")]);
        let c = config(&subscription::DEFAULTS, &e, Some(WALLET)).unwrap();
        assert_eq!(c.tokens[0].token, "my-dev-token-1");
        assert_eq!(c.peer("wallet").unwrap().token, "my-dev-token-1");
    }

    #[test]
    fn a_config_files_tokens_and_peers_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("subscription.toml");
        std::fs::write(
            &file,
            "[[tokens]]\nname = \"ops\"\ntoken = \"file-token-1\"\nscopes = [\"admin\"]\n\
             [peers.wallet]\nurl = \"http://wallet.internal:50051\"\ntoken = \"file-peer-1\"\n",
        )
        .unwrap();
        let e = env(&[("SUBSCRIPTION_CONFIG", file.to_str().unwrap())]);
        let c = config(&subscription::DEFAULTS, &e, Some(WALLET)).unwrap();
        assert_eq!(c.tokens.len(), 1);
        assert_eq!(
            c.tokens[0].token, "file-token-1",
            "the dev token replaced the file's"
        );
        let peer = c.peer("wallet").unwrap();
        assert_eq!(peer.url, "http://wallet.internal:50051");
        assert_eq!(peer.token, "file-peer-1");
        // The environment still wins over the file.
        let mut e = e;
        e.insert("SUBSCRIPTION_TOKENS".into(), "env:env-token-1:read".into());
        let c = config(&subscription::DEFAULTS, &e, Some(WALLET)).unwrap();
        assert_eq!(c.tokens[0].token, "env-token-1");
        // Another service without a file still gets the development default.
        let c = config(&reseller_billing::DEFAULTS, &e, Some(WALLET)).unwrap();
        assert_eq!(c.tokens[0].token, DEFAULT_DEV_TOKEN);
    }

    #[test]
    fn an_unspecified_listen_address_is_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:50051".parse().unwrap()),
            "127.0.0.1:50051".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            reachable("[::]:50051".parse().unwrap()),
            "[::1]:50051".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            reachable("10.0.0.5:50051".parse().unwrap()),
            "10.0.0.5:50051".parse::<SocketAddr>().unwrap()
        );
    }
}
