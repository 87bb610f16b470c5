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
