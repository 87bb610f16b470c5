//! Storage plumbing on the run's backend (`BILLING_TEST_BACKEND`): migrations, write
//! transactions, the outbox and idempotency keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod idempotency;
mod outbox;
mod relay;
mod storage;
mod stripe;

use runtime::{
    db::{Db, Migrations},
    testing::TestDatabase,
};
use sqlx::migrate::Migrator;

/// A fresh database with only the runtime's own tables.
pub async fn fresh_db() -> (Db, TestDatabase) {
    let test_db = TestDatabase::fresh();
    let migrations = Migrations {
        sqlite: Migrator::DEFAULT,
        postgres: Migrator::DEFAULT,
    };
    let db = Db::connect_url(&test_db.url, &test_db.schema, 8, &migrations)
        .await
        .unwrap_or_else(|e| panic!("cannot open the test database {}: {e}", test_db.url));
    (db, test_db)
}
