use futures::future::join_all;
use runtime::db::Backend;
use sqlx::Row;

use crate::fresh_db;

#[tokio::test]
async fn the_run_uses_the_backend_it_asked_for() {
    let (db, _t) = fresh_db().await;
    let expected = match runtime::testing::backend() {
        runtime::testing::TestBackend::Sqlite => Backend::Sqlite,
        runtime::testing::TestBackend::Postgres => Backend::Postgres,
    };
    assert_eq!(db.backend(), expected);
}

#[tokio::test]
async fn migrations_are_idempotent_across_restarts() {
    let (db, t) = fresh_db().await;
    db.close().await;
    let migrations = runtime::db::Migrations {
        sqlite: sqlx::migrate::Migrator::DEFAULT,
        postgres: sqlx::migrate::Migrator::DEFAULT,
    };
    let again = runtime::db::Db::connect_url(&t.url, &t.schema, 2, &migrations)
        .await
        .unwrap();
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM outbox_relay")
        .fetch_one(again.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// Read-modify-write in write transactions from many tasks at once loses no update: SQLite
/// takes its write lock at BEGIN IMMEDIATE, PostgreSQL locks the row with FOR UPDATE.
#[tokio::test]
async fn concurrent_write_transactions_lose_no_update() {
    let (db, _t) = fresh_db().await;
    sqlx::query("CREATE TABLE counter (id INTEGER PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("INSERT INTO counter (id, n) VALUES (1, 0)")
        .execute(db.pool())
        .await
        .unwrap();
    let tasks = (0..40).map(|_| {
        let db = db.clone();
        tokio::spawn(async move {
            let mut tx = db.begin_write().await.unwrap();
            let n: i64 = sqlx::query(&format!(
                "SELECT n FROM counter WHERE id = 1{}",
                db.for_update()
            ))
            .fetch_one(&mut *tx)
            .await
            .unwrap()
            .get(0);
            tokio::task::yield_now().await;
            sqlx::query("UPDATE counter SET n = $1 WHERE id = 1")
                .bind(n + 1)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        })
    });
    for r in join_all(tasks).await {
        r.unwrap();
    }
    let n: i64 = sqlx::query("SELECT n FROM counter WHERE id = 1")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 40);
}
