//! End-to-end tests across the three services: each started for real on `127.0.0.1:0` with its
//! own fresh database on the run's backend (`BILLING_TEST_BACKEND`), the test clock on, and
//! talked to only through the generated gRPC clients.

use runtime::{Running, testing};
use tonic::transport::Channel;

/// The three services of one test: the suite's own [`suite::Suite`] (its `wallet`,
/// `subscription` and `reseller`, reached through `Deref`) on the test's database.
pub struct Suite {
    services: suite::Suite,
    _db: testing::TestDatabase,
}

impl std::ops::Deref for Suite {
    type Target = suite::Suite;

    fn deref(&self) -> &suite::Suite {
        &self.services
    }
}

impl Suite {
    /// Starts the three services, each on its own fresh database.
    pub async fn start() -> anyhow::Result<Suite> {
        Self::start_with(None).await
    }

    /// Like [`Suite::start`], each service also accepting `token` with every scope (the
    /// README's development token).
    pub async fn start_with_dev_token(token: &str) -> anyhow::Result<Suite> {
        Self::start_with(Some(token)).await
    }

    async fn start_with(dev_token: Option<&str>) -> anyhow::Result<Suite> {
        Self::start_on(testing::TestDatabase::fresh(), dev_token).await
    }

    /// Like [`Suite::start`], on `db` (each service on a sibling of it), each service also
    /// accepting `dev_token` (if given) with every scope.
    ///
    /// The services are started by the suite's own wiring ([`suite::start`], what
    /// `cargo run -p suite` runs), so subscription and reseller-billing reach the wallet
    /// exactly as there: the suite points them at it, with the development token (here
    /// `dev_token`, or [`testing::ADMIN_TOKEN`]).
    pub async fn start_on(
        db: testing::TestDatabase,
        dev_token: Option<&str>,
    ) -> anyhow::Result<Suite> {
        let mut tokens = TEST_TOKENS.to_string();
        if let Some(token) = dev_token {
            tokens.push_str(&format!(",dev:{token}:read+mutate+admin+act-for-user"));
        }
        let env = suite_env(
            &db,
            Some(&tokens),
            dev_token.unwrap_or(testing::ADMIN_TOKEN),
        );
        Self::from_suite(suite::start(&env).await?, db)
    }

    /// The suite started exactly as README's `cargo run -p suite` starts it (no tokens, no
    /// peers, no test clock configured: the suite's defaults), except for what a test must
    /// choose: ports 0 and `db`. Its one token is `dev_token`.
    pub async fn start_as_readme(
        db: testing::TestDatabase,
        dev_token: &str,
    ) -> anyhow::Result<Suite> {
        Self::start_as_readme_with(db, dev_token, &[]).await
    }

    /// [`Suite::start_as_readme`] with `extra` environment variables on top (e.g. the payment
    /// provider).
    pub async fn start_as_readme_with(
        db: testing::TestDatabase,
        dev_token: &str,
        extra: &[(String, String)],
    ) -> anyhow::Result<Suite> {
        let mut env = suite_env(&db, None, dev_token);
        env.retain(|k, _| !k.ends_with("_TEST_CLOCK"));
        env.extend(extra.iter().cloned());
        Self::from_suite(suite::start(&env).await?, db)
    }

    /// The services `suite::start` started from an environment a test built (e.g.
    /// [`suite_env`] plus settings of its own), on `db`.
    pub fn from_env(services: suite::Suite, db: testing::TestDatabase) -> Suite {
        Suite { services, _db: db }
    }

    fn from_suite(services: suite::Suite, db: testing::TestDatabase) -> anyhow::Result<Suite> {
        Ok(Suite { services, _db: db })
    }

    /// The three services with the gRPC services each declares.
    pub fn all(&self) -> [(&'static [&'static str], &Running); 3] {
        [
            (credits_wallet::SPEC.grpc_services, &self.wallet),
            (subscription::SPEC.grpc_services, &self.subscription),
            (reseller_billing::SPEC.grpc_services, &self.reseller),
        ]
    }

    /// Stops all three gracefully.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.services.stop().await
    }
}

/// The four tokens of [`testing::config`], in the environment's format.
const TEST_TOKENS: &str = "test-admin:test-admin-token:read+mutate+admin+act-for-user,\
test-mutate:test-mutate-token:read+mutate,test-read:test-read-token:read,\
test-act-for-user:test-act-for-user-token:read+mutate+act-for-user";

/// The environment of a suite of one test, like [`testing::config`] for each service: ports
/// 0, the test clock, a sibling of `db` each; `tokens` if given (otherwise the suite's
/// development token); `dev_token` as `BILLING_DEV_TOKEN`. Peers are left to the suite.
pub fn suite_env(
    db: &testing::TestDatabase,
    tokens: Option<&str>,
    dev_token: &str,
) -> std::collections::BTreeMap<String, String> {
    let mut env = std::collections::BTreeMap::from([(
        suite::DEV_TOKEN_ENV.to_string(),
        dev_token.to_string(),
    )]);
    for (prefix, sibling) in [
        ("WALLET", "wallet"),
        ("SUBSCRIPTION", "subscription"),
        ("RESELLER", "reseller"),
    ] {
        let db = db.sibling(sibling);
        for (key, value) in [
            ("LISTEN_ADDR", "127.0.0.1:0"),
            ("METRICS_ADDR", "127.0.0.1:0"),
            ("DATABASE_URL", db.url.as_str()),
            ("DATABASE_SCHEMA", db.schema.as_str()),
            ("DATABASE_MAX_CONNECTIONS", "5"),
            ("TEST_CLOCK", "true"),
        ] {
            env.insert(format!("{prefix}_{key}"), value.to_string());
        }
        if let Some(tokens) = tokens {
            env.insert(format!("{prefix}_TOKENS"), tokens.to_string());
        }
    }
    env
}

/// A channel to a running service.
pub async fn channel(running: &Running) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{}", running.addr))?
        .connect()
        .await?)
}

/// A card subscription (`pm_card_ok`, VAT 21%, one seat, no add-ons) of `account` to `plan` for
/// `contacts` contacts, by `actor` (none: the platform itself).
#[cfg(test)]
fn card_subscribe(
    key: String,
    actor: Option<proto::subscription::v1::Actor>,
    account: &str,
    plan: &str,
    contacts: u64,
) -> proto::subscription::v1::SubscribeRequest {
    use proto::subscription::v1 as spb;
    spb::SubscribeRequest {
        idempotency_key: key,
        actor,
        account_id: account.into(),
        plan_id: plan.into(),
        contacts,
        seats: 1,
        add_ons: vec![],
        payment: Some(spb::Payment {
            kind: spb::PaymentKind::Card as i32,
            payment_method: "pm_card_ok".into(),
        }),
        vat_rate: "0.21".into(),
    }
}

/// Held by the tests that load the PostgreSQL side heavily (connection cuts, a private
/// server's restart), so they do not run beside each other.
#[cfg(test)]
static PG_SERVER_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[cfg(test)]
mod catalogue;
#[cfg(test)]
mod dbloss;
#[cfg(test)]
mod deploy;
#[cfg(test)]
mod events_out;
#[cfg(test)]
mod foundation;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod gateway_faults;
#[cfg(test)]
mod limits;
#[cfg(test)]
mod peer_faults;
#[cfg(test)]
mod pgrestart;
#[cfg(test)]
mod readme;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod secrets;
#[cfg(test)]
mod security;
#[cfg(test)]
mod suite_wiring;
#[cfg(test)]
mod tls;
