//! Test support: a fresh database per test on the backend the run selects, and a service
//! configuration for `127.0.0.1:0` with the test clock and well-known test tokens.
//!
//! `BILLING_TEST_BACKEND=sqlite` (default) gives each test its own SQLite file in a temporary
//! directory. `BILLING_TEST_BACKEND=postgres` gives each test its own schema (`t_<uuid>`) in
//! the database at `BILLING_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/billing_test`); the run fails, never skips, when that
//! database cannot be reached.

use std::collections::BTreeMap;

use crate::config::{ServiceConfig, ServiceDefaults};

/// Selects the backend of a test run.
pub const BACKEND_ENV: &str = "BILLING_TEST_BACKEND";
/// The PostgreSQL database used by a PostgreSQL test run.
pub const POSTGRES_URL_ENV: &str = "BILLING_TEST_POSTGRES_URL";
/// Default for [`POSTGRES_URL_ENV`].
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/billing_test";

/// A token with every scope.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// A token that may read and mutate.
pub const MUTATE_TOKEN: &str = "test-mutate-token";
/// A token that may only read.
pub const READ_TOKEN: &str = "test-read-token";
/// A token that may read, mutate and act for users.
pub const ACT_FOR_USER_TOKEN: &str = "test-act-for-user-token";

/// The backend of this test run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    /// SQLite files.
    Sqlite,
    /// PostgreSQL schemas.
    Postgres,
}

/// Reads [`BACKEND_ENV`]; an unknown value panics so a typo cannot silently test SQLite twice.
pub fn backend() -> TestBackend {
    match std::env::var(BACKEND_ENV).as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => TestBackend::Sqlite,
        Ok("postgres") => TestBackend::Postgres,
        Ok(other) => panic!("{BACKEND_ENV}={other:?}: expected sqlite or postgres"),
    }
}

/// A database that exists for one test.
pub struct TestDatabase {
    /// Connection URL.
    pub url: String,
    /// PostgreSQL schema (unique per test); unused on SQLite.
    pub schema: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// A fresh, empty database on this run's backend.
    pub fn fresh() -> TestDatabase {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        match backend() {
            TestBackend::Sqlite => {
                let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
                let url = format!("sqlite://{}/test.db", dir.path().display());
                TestDatabase {
                    url,
                    schema: "unused".into(),
                    _dir: Some(dir),
                }
            }
            TestBackend::Postgres => TestDatabase {
                url: std::env::var(POSTGRES_URL_ENV)
                    .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string()),
                schema: format!("t_{unique}"),
                _dir: None,
            },
        }
    }

    /// The same database again, for a second replica of one service.
    pub fn share(&self) -> TestDatabase {
        TestDatabase {
            url: self.url.clone(),
            schema: self.schema.clone(),
            _dir: None,
        }
    }

    /// Another database of the same test at the same place, for a second service (its own file
    /// or schema).
    pub fn sibling(&self, name: &str) -> TestDatabase {
        match &self._dir {
            Some(dir) => TestDatabase {
                url: format!("sqlite://{}/{name}.db", dir.path().display()),
                schema: "unused".into(),
                _dir: None,
            },
            None => TestDatabase {
                url: self.url.clone(),
                schema: format!("{}_{name}", self.schema),
                _dir: None,
            },
        }
    }
}

/// A configuration for a test: ports 0, test clock on, the four test tokens, `db`.
pub fn config(defaults: &ServiceDefaults, db: &TestDatabase) -> ServiceConfig {
    config_with(defaults, db, "")
}

/// Like [`config`], with extra TOML (e.g. `[peers.wallet]`).
pub fn config_with(
    defaults: &ServiceDefaults,
    db: &TestDatabase,
    extra_toml: &str,
) -> ServiceConfig {
    let toml = format!(
        r#"
listen_addr = "127.0.0.1:0"
metrics_addr = "127.0.0.1:0"
database_url = "{url}"
database_schema = "{schema}"
database_max_connections = 5
test_clock = true
{extra_toml}
[[tokens]]
name = "test-admin"
token = "{ADMIN_TOKEN}"
scopes = ["read", "mutate", "admin", "act-for-user"]
[[tokens]]
name = "test-mutate"
token = "{MUTATE_TOKEN}"
scopes = ["read", "mutate"]
[[tokens]]
name = "test-read"
token = "{READ_TOKEN}"
scopes = ["read"]
[[tokens]]
name = "test-act-for-user"
token = "{ACT_FOR_USER_TOKEN}"
scopes = ["read", "mutate", "act-for-user"]
"#,
        url = db.url,
        schema = db.schema,
    );
    ServiceConfig::from_toml(defaults, &toml, &BTreeMap::<String, String>::new())
        .unwrap_or_else(|e| panic!("test config: {e}"))
}

/// Adds `authorization: Bearer <token>` to a request.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    let value = format!("Bearer {token}")
        .parse()
        .unwrap_or_else(|e| panic!("token metadata: {e}"));
    req.metadata_mut().insert("authorization", value);
    req
}

/// A local Stripe for the provider tests: [localstripe](https://pypi.org/project/localstripe/),
/// a stateful fake of Stripe's API, on `127.0.0.1:8420` (or `BILLING_TEST_LOCALSTRIPE_URL`).
///
/// [`localstripe::url`] starts `localstripe --port 8420 --from-scratch` when nothing listens
/// there and the command is installed (`pip install localstripe`; `.ci/run` installs it).
/// Without it the provider tests are skipped with a message on stderr, so `cargo test
/// --workspace` still needs only Rust; `BILLING_TEST_STRIPE=required` (set by `.ci/run`) turns
/// that into a failure.
/// The fixtures create customers and payment methods through its API, as a platform's
/// SetupIntent flow would on real Stripe.
pub mod localstripe {
    use std::{
        net::{SocketAddr, TcpStream, ToSocketAddrs},
        process::{Command, Stdio},
        sync::Mutex,
        time::{Duration, Instant},
    };

    /// Overrides the local Stripe's URL.
    pub const URL_ENV: &str = "BILLING_TEST_LOCALSTRIPE_URL";
    /// `required`: fail instead of skipping when no local Stripe can be had.
    pub const REQUIRED_ENV: &str = "BILLING_TEST_STRIPE";
    /// Where localstripe is started.
    pub const DEFAULT_URL: &str = "http://127.0.0.1:8420";
    /// Any `sk_test_` key: localstripe accepts every one.
    pub const SECRET_KEY: &str = "sk_test_billing_suite";
    /// A card that is always charged.
    pub const CARD_OK: &str = "4242424242424242";
    /// A card that attaches but whose charges are declined (localstripe's 4000000000000341).
    pub const CARD_DECLINED: &str = "4000000000000341";
    /// A SEPA mandate whose debits succeed.
    pub const IBAN_OK: &str = "DE89370400440532013000";
    /// A SEPA mandate whose debits are pending first and fail half a second later.
    pub const IBAN_FAILS_LATER: &str = "DE62370400440532013001";

    static STARTING: Mutex<()> = Mutex::new(());

    fn address(url: &str) -> Option<SocketAddr> {
        let host_port = url.split("://").nth(1)?.trim_end_matches('/');
        host_port.to_socket_addrs().ok()?.next()
    }

    fn listening(addr: SocketAddr) -> bool {
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
    }

    /// The local Stripe's base URL, started if need be; `None` (after a message on stderr)
    /// when there is none and the run does not require it.
    pub fn url() -> Option<String> {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_string());
        let required = std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "required");
        let Some(addr) = address(&url) else {
            panic!("{URL_ENV}={url:?} is not an http://host:port URL");
        };
        let _one_at_a_time = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        if listening(addr) {
            return Some(url);
        }
        let started = url == DEFAULT_URL
            && Command::new("localstripe")
                // A fresh store: the fixtures list PaymentIntents page by page.
                .args(["--port", "8420", "--from-scratch"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .is_ok();
        if started {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if listening(addr) {
                    return Some(url);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let why = format!(
            "no local Stripe at {url} (install it with `pip install localstripe`; the tests start it)"
        );
        assert!(!required, "{why}; {REQUIRED_ENV}=required");
        eprintln!("SKIPPED: a Stripe provider test: {why}");
        None
    }

    /// The TOML settings that point a service at the local Stripe at `url`.
    pub fn settings(url: &str) -> String {
        format!(
            "payment_provider = \"stripe\"\nstripe_api_base = \"{url}\"\nstripe_secret_key = \"{SECRET_KEY}\"\n"
        )
    }

    async fn post(url: &str, path: &str, form: &[(&str, &str)]) -> serde_json::Value {
        let response = reqwest::Client::new()
            .post(format!("{url}{path}"))
            .bearer_auth(SECRET_KEY)
            .form(form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    fn id(v: &serde_json::Value) -> String {
        v["id"].as_str().map(str::to_string).unwrap_or_default()
    }

    async fn attached(url: &str, form: &[(&str, &str)]) -> String {
        let customer = id(&post(url, "/v1/customers", &[("email", "billing@example.com")]).await);
        let method = id(&post(url, "/v1/payment_methods", form).await);
        post(
            url,
            &format!("/v1/payment_methods/{method}/attach"),
            &[("customer", &customer)],
        )
        .await;
        format!("{customer}:{method}")
    }

    /// A new customer with the card `number` saved on it, as the token `cus_...:pm_...`.
    pub async fn customer_with_card(url: &str, number: &str) -> String {
        attached(
            url,
            &[
                ("type", "card"),
                ("card[number]", number),
                ("card[exp_month]", "12"),
                ("card[exp_year]", "2034"),
                ("card[cvc]", "123"),
            ],
        )
        .await
    }

    /// A new customer with a SEPA debit mandate on `iban`, as the token `cus_...:pm_...`.
    pub async fn customer_with_sepa(url: &str, iban: &str) -> String {
        attached(url, &[("type", "sepa_debit"), ("sepa_debit[iban]", iban)]).await
    }

    /// The PaymentIntents of `customer` (`cus_...`), oldest first: localstripe has no filter, so
    /// every page is read.
    pub async fn payment_intents_of(url: &str, customer: &str) -> Vec<serde_json::Value> {
        let client = reqwest::Client::new();
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![("limit", "100".to_string())];
            if let Some(a) = &after {
                query.push(("starting_after", a.clone()));
            }
            let page: serde_json::Value = client
                .get(format!("{url}/v1/payment_intents"))
                .bearer_auth(SECRET_KEY)
                .query(&query)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .unwrap_or_else(|e| panic!("listing PaymentIntents: {e}"))
                .json()
                .await
                .unwrap_or_else(|e| panic!("listing PaymentIntents: {e}"));
            let data = page["data"].as_array().cloned().unwrap_or_default();
            after = data.last().map(id);
            found.extend(
                data.into_iter()
                    .filter(|pi| pi["customer"].as_str() == Some(customer)),
            );
            if page["has_more"].as_bool() != Some(true) || after.is_none() {
                break;
            }
        }
        found.sort_by_key(|pi| pi["created"].as_i64());
        found
    }
}
