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

/// How long [`collect_events`] waits for the first `at_least` items, and [`poll_until`] for
/// its condition: background work (jobs, relays) is asynchronous, but never this slow.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The items of a `WatchEvents`-like stream: waits until `at_least` have come (at most
/// [`WAIT`]), then takes what follows within `quiet` of the one before. Stops at the end of
/// the stream or its first error; the caller asserts on what came.
pub async fn collect_events<T, S>(
    mut stream: S,
    at_least: usize,
    quiet: std::time::Duration,
) -> Vec<T>
where
    S: futures::Stream<Item = Result<T, tonic::Status>> + Unpin,
{
    use futures::StreamExt;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let wait = if out.len() >= at_least {
            quiet
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(Ok(item))) => out.push(item),
            _ => return out,
        }
    }
}

/// Reads with `read` every 100 ms until `holds` (at most [`WAIT`]): `Ok` with the value that
/// satisfied it, or `Err` with a last reading for the caller's failure message.
pub async fn poll_until<T, F, Fut>(mut read: F, holds: impl Fn(&T) -> bool) -> Result<T, T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let step = std::time::Duration::from_millis(100);
    let tries = WAIT.as_millis() / step.as_millis();
    for _ in 0..tries {
        let value = read().await;
        if holds(&value) {
            return Ok(value);
        }
        tokio::time::sleep(step).await;
    }
    Err(read().await)
}

/// Moves a service's test clock to `to` (`TestClock/AdvanceTime` with [`ADMIN_TOKEN`]).
pub async fn advance_clock(
    clock: &proto::common::v1::test_clock_client::TestClockClient<tonic::transport::Channel>,
    to: chrono::DateTime<chrono::Utc>,
) {
    clock
        .clone()
        .advance_time(authed(
            ADMIN_TOKEN,
            proto::common::v1::AdvanceTimeRequest {
                to: Some(crate::convert::timestamp(to)),
            },
        ))
        .await
        .unwrap_or_else(|e| panic!("advancing the test clock to {to}: {e}"));
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
        collections::HashMap,
        net::{SocketAddr, TcpStream, ToSocketAddrs},
        process::{Command, Stdio},
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::{Duration, Instant},
    };

    use axum::{
        body::Bytes,
        extract::State,
        http::{HeaderMap, Method, StatusCode, Uri},
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
        let mut found = all_payment_intents(url).await;
        found.retain(|pi| pi["customer"].as_str() == Some(customer));
        found
    }

    /// Every PaymentIntent localstripe holds, oldest first.
    async fn all_payment_intents(url: &str) -> Vec<serde_json::Value> {
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
            found.extend(data);
            if page["has_more"].as_bool() != Some(true) || after.is_none() {
                break;
            }
        }
        found.sort_by_key(|pi| pi["created"].as_i64());
        found
    }

    /// A front for localstripe that adds the two behaviours of Stripe it lacks, so a service
    /// can be tested against a payment that times out in the middle: it honours
    /// `Idempotency-Key` on `POST /v1/payment_intents` (a second create under a key gets the
    /// first one's answer, as Stripe does for 24 hours, or `409` with an `idempotency_error`
    /// while the first is still in progress; unlike Stripe it does not compare the
    /// parameters), and answers `GET /v1/payment_intents/search` for the one query the adapter
    /// makes (`metadata['billing_key']:'<key>'`) from localstripe's list. Everything else is
    /// passed through. [`Front::hold_next_create`] makes the next create reach localstripe (and
    /// charge) but answer only after a delay: longer than the adapter waits, it is a timeout
    /// after the charge was made.
    pub struct Front {
        /// The front's base URL, for `stripe_api_base`.
        pub url: String,
        state: Arc<FrontState>,
    }

    struct FrontState {
        upstream: String,
        http: reqwest::Client,
        /// Idempotency-Key -> the first create's answer (status, body); `None` while that
        /// create is still in progress.
        answers: Mutex<HashMap<String, Option<(u16, String)>>>,
        /// The delay before the next create's answer, once.
        hold: Mutex<Option<Duration>>,
        creates: AtomicUsize,
        /// Reads of a PaymentIntent answer `processing` ([`Front::keep_payments_processing`]).
        keep_processing: std::sync::atomic::AtomicBool,
    }

    impl Front {
        /// Starts a front for the localstripe at `upstream` on a free local port.
        pub async fn start(upstream: &str) -> Front {
            let state = Arc::new(FrontState {
                upstream: upstream.trim_end_matches('/').to_string(),
                http: reqwest::Client::new(),
                answers: Mutex::default(),
                hold: Mutex::default(),
                creates: AtomicUsize::new(0),
                keep_processing: std::sync::atomic::AtomicBool::new(false),
            });
            let app = axum::Router::new()
                .fallback(axum::routing::any(front_pass))
                .with_state(state.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("binding the Stripe front: {e}"));
            let addr = listener
                .local_addr()
                .unwrap_or_else(|e| panic!("the Stripe front's address: {e}"));
            tokio::spawn(async move { axum::serve(listener, app).await });
            Front {
                url: format!("http://{addr}"),
                state,
            }
        }

        /// The next `POST /v1/payment_intents` is made at localstripe at once but answered
        /// only after `delay`.
        pub fn hold_next_create(&self, delay: Duration) {
            *self.state.hold.lock().unwrap_or_else(|e| e.into_inner()) = Some(delay);
        }

        /// From now on every read of a PaymentIntent answers it `processing`, as a bank that
        /// has not answered yet: localstripe settles or fails a debit half a second after its
        /// creation, and a test that must see a webhook (not the jobs' polling) move the debit
        /// would race that.
        pub fn keep_payments_processing(&self) {
            self.state.keep_processing.store(true, Ordering::SeqCst);
        }

        /// How many creates reached localstripe (a replayed key is not one).
        pub fn creates(&self) -> usize {
            self.state.creates.load(Ordering::SeqCst)
        }
    }

    /// The value of the adapter's search query `metadata['billing_key']:'<value>'`.
    fn searched_key(query: &str) -> Option<String> {
        let literal = query.split_once(':')?.1;
        let inner = literal.strip_prefix('\'')?.strip_suffix('\'')?;
        Some(inner.replace("\\'", "'").replace("\\\\", "\\"))
    }

    async fn front_pass(
        State(s): State<Arc<FrontState>>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, String) {
        let path = uri.path();
        if method == Method::GET && path == "/v1/payment_intents/search" {
            let key = reqwest::Url::parse(&format!("http://front{uri}"))
                .ok()
                .and_then(|u| {
                    u.query_pairs()
                        .find(|(k, _)| k == "query")
                        .and_then(|(_, q)| searched_key(&q))
                });
            let data: Vec<serde_json::Value> = all_payment_intents(&s.upstream)
                .await
                .into_iter()
                .filter(|pi| {
                    key.is_some() && pi["metadata"]["billing_key"].as_str() == key.as_deref()
                })
                .collect();
            let body = serde_json::json!({"object": "search_result", "data": data});
            return (StatusCode::OK, body.to_string());
        }
        let status = |code: u16| StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
        let create = method == Method::POST && path == "/v1/payment_intents";
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if create && let Some(key) = &key {
            let mut answers = s.answers.lock().unwrap_or_else(|e| e.into_inner());
            match answers.get(key) {
                Some(Some((code, body))) => return (status(*code), body.clone()),
                Some(None) => {
                    let body = serde_json::json!({"error": {
                        "type": "idempotency_error",
                        "message": "There is currently another in-progress request using this Idempotent Key",
                    }});
                    return (StatusCode::CONFLICT, body.to_string());
                }
                None => {
                    answers.insert(key.clone(), None);
                }
            }
        }
        let mut request = s
            .http
            .request(method.clone(), format!("{}{uri}", s.upstream))
            .body(body.to_vec());
        for name in ["authorization", "content-type"] {
            if let Some(v) = headers.get(name) {
                request = request.header(name, v.as_bytes());
            }
        }
        let (code, text) = match request.send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (
                502,
                serde_json::json!({"error": {"message": e.to_string()}}).to_string(),
            ),
        };
        let read = method == Method::GET && path.starts_with("/v1/payment_intents/");
        if read
            && code == 200
            && s.keep_processing.load(Ordering::SeqCst)
            && let Ok(mut intent) = serde_json::from_str::<serde_json::Value>(&text)
        {
            intent["status"] = serde_json::json!("processing");
            intent["last_payment_error"] = serde_json::Value::Null;
            return (StatusCode::OK, intent.to_string());
        }
        if create {
            s.creates.fetch_add(1, Ordering::SeqCst);
            let hold = s.hold.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(delay) = hold {
                tokio::time::sleep(delay).await;
            }
            if let Some(key) = key {
                s.answers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, Some((code, text.clone())));
            }
        }
        (status(code), text)
    }
}

/// Stripe webhook deliveries as Stripe makes them, for the services' webhook tests: events
/// built the way Stripe shapes them, signed with the endpoint's secret and POSTed to
/// [`crate::stripe_webhook::PATH`].
pub mod stripe_events {
    use std::net::SocketAddr;

    use crate::{stripe::Secret, stripe_webhook};

    /// A `charge.refunded` event: the Charge of `payment_intent` (`amount` minor units of EUR)
    /// with `amount_refunded` refunded so far (in full when they are equal).
    pub fn refund(id: &str, payment_intent: &str, amount: i64, amount_refunded: i64) -> Vec<u8> {
        serde_json::json!({
            "id": id, "object": "event", "type": "charge.refunded",
            "data": {"object": {
                "id": "ch_refunded", "object": "charge", "payment_intent": payment_intent,
                "amount": amount, "amount_refunded": amount_refunded,
                "refunded": amount_refunded == amount, "currency": "eur",
            }},
        })
        .to_string()
        .into_bytes()
    }

    /// A `charge.dispute.created` event for `amount` minor units of `payment_intent`'s charge.
    pub fn dispute(id: &str, payment_intent: &str, amount: i64) -> Vec<u8> {
        serde_json::json!({
            "id": id, "object": "event", "type": "charge.dispute.created",
            "data": {"object": {
                "id": "dp_1", "object": "dispute", "charge": "ch_disputed",
                "payment_intent": payment_intent, "amount": amount, "currency": "eur",
                "status": "needs_response", "reason": "fraudulent",
            }},
        })
        .to_string()
        .into_bytes()
    }

    /// A `charge.dispute.closed` event ending the dispute of `amount` minor units of
    /// `payment_intent`'s charge with `status` (`won`, `lost`, `warning_closed`).
    pub fn dispute_closed(id: &str, payment_intent: &str, amount: i64, status: &str) -> Vec<u8> {
        serde_json::json!({
            "id": id, "object": "event", "type": "charge.dispute.closed",
            "data": {"object": {
                "id": "dp_1", "object": "dispute", "charge": "ch_disputed",
                "payment_intent": payment_intent, "amount": amount, "currency": "eur",
                "status": status, "reason": "fraudulent",
            }},
        })
        .to_string()
        .into_bytes()
    }

    /// POSTs `payload` to the webhook endpoint on `metrics_addr` with `signature`, or with a
    /// valid signature under `secret` made now: (HTTP status, body).
    pub async fn deliver(
        metrics_addr: SocketAddr,
        payload: &[u8],
        secret: &str,
        signature: Option<String>,
    ) -> (u16, String) {
        let signature = signature.unwrap_or_else(|| {
            let now = chrono::Utc::now().timestamp();
            format!(
                "t={now},v1={}",
                stripe_webhook::sign(&Secret::new(secret), now, payload)
            )
        });
        let response = reqwest::Client::new()
            .post(format!("http://{metrics_addr}{}", stripe_webhook::PATH))
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json")
            .body(payload.to_vec())
            .send()
            .await
            .unwrap_or_else(|e| panic!("delivering a webhook: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn collecting_stops_at_the_end_of_the_stream_or_its_first_error() {
        let items = futures::stream::iter([Ok(1), Ok(2), Ok(3)]);
        assert_eq!(
            collect_events(items, 2, Duration::from_secs(5)).await,
            [1, 2, 3]
        );
        let items = futures::stream::iter([Ok(1), Err(tonic::Status::internal("x")), Ok(3)]);
        assert_eq!(collect_events(items, 0, Duration::from_secs(5)).await, [1]);
    }

    #[tokio::test]
    async fn collecting_waits_only_quiet_once_enough_have_come() {
        let items = futures::stream::iter([Ok(1)]).chain(futures::stream::pending());
        let started = std::time::Instant::now();
        assert_eq!(
            collect_events(items, 1, Duration::from_millis(50)).await,
            [1]
        );
        assert!(started.elapsed() < WAIT / 2, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn polling_answers_the_first_value_that_holds() {
        let mut n = 0;
        let found = poll_until(
            || {
                n += 1;
                std::future::ready(n)
            },
            |n| *n == 3,
        )
        .await;
        assert_eq!(found, Ok(3));
    }

    use futures::StreamExt;
}
