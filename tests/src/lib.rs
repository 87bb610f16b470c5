//! End-to-end tests across the three services: each started for real on `127.0.0.1:0` with its
//! own fresh database on the run's backend (`BILLING_TEST_BACKEND`), the test clock on, and
//! talked to only through the generated gRPC clients.

use runtime::{Running, testing};
use tonic::transport::Channel;

/// The three services of one test.
pub struct Suite {
    /// credits-wallet.
    pub wallet: Running,
    /// subscription.
    pub subscription: Running,
    /// reseller-billing (pointed at `wallet`, like subscription).
    pub reseller: Running,
    _db: testing::TestDatabase,
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
    pub async fn start_on(
        db: testing::TestDatabase,
        dev_token: Option<&str>,
    ) -> anyhow::Result<Suite> {
        let with_token = |mut config: runtime::config::ServiceConfig| {
            if let Some(token) = dev_token {
                config.tokens.push(runtime::config::TokenConfig {
                    name: "dev".into(),
                    token: token.into(),
                    scopes: vec![
                        runtime::auth::Scope::Read,
                        runtime::auth::Scope::Mutate,
                        runtime::auth::Scope::Admin,
                        runtime::auth::Scope::ActForUser,
                    ],
                });
            }
            config
        };
        let wallet_db = db.sibling("wallet");
        let wallet = runtime::server::start(
            &credits_wallet::SPEC,
            with_token(testing::config(&credits_wallet::DEFAULTS, &wallet_db)),
            credits_wallet::routes,
        )
        .await?;
        let peer = format!(
            "[peers.wallet]\nurl = \"http://{}\"\ntoken = \"{}\"\n",
            wallet.addr,
            testing::ADMIN_TOKEN
        );
        let subscription_db = db.sibling("subscription");
        let subscription = runtime::server::start(
            &subscription::SPEC,
            with_token(testing::config_with(
                &subscription::DEFAULTS,
                &subscription_db,
                &peer,
            )),
            subscription::routes,
        )
        .await?;
        let reseller_db = db.sibling("reseller");
        let reseller = runtime::server::start(
            &reseller_billing::SPEC,
            with_token(testing::config_with(
                &reseller_billing::DEFAULTS,
                &reseller_db,
                &peer,
            )),
            reseller_billing::routes,
        )
        .await?;
        Ok(Suite {
            wallet,
            subscription,
            reseller,
            _db: db,
        })
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
        let (a, b, c) = tokio::join!(
            self.wallet.stop(),
            self.subscription.stop(),
            self.reseller.stop()
        );
        a.and(b).and(c)
    }
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
mod dbloss;
#[cfg(test)]
mod deploy;
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
mod tls;
