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

/// A multi-row write padded to a power of two ([`runtime::db::row_chunks`]) inserts and updates
/// exactly its real rows, whatever their number, with one statement text per padded size.
#[tokio::test]
async fn padded_multi_row_writes_touch_only_their_real_rows() {
    let (db, _t) = fresh_db().await;
    sqlx::query("CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL, note TEXT)")
        .execute(db.pool())
        .await
        .unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let backend = db.backend();
    let rows: Vec<(String, i64, Option<String>)> = (0..11)
        .map(|i| {
            (
                format!("i{i:02}"),
                i,
                (i % 2 == 0).then(|| format!("even {i}")),
            )
        })
        .collect();
    for chunk in runtime::db::row_chunks(backend, &rows, 3, 8) {
        let sql = format!("INSERT INTO items (id, n, note) {}", chunk.select());
        let mut q = sqlx::query(&sql);
        for (id, n, note) in chunk.rows() {
            q = q.bind(id).bind(*n).bind(note.clone());
        }
        q.bind(chunk.count()).execute(&mut *conn).await.unwrap();
    }
    let updates: Vec<(String, i64)> = (0..3).map(|i| (format!("i{i:02}"), 100 + i)).collect();
    for chunk in runtime::db::row_chunks(backend, &updates, 2, 8) {
        let sql = format!(
            "UPDATE items SET n = v.column2 FROM {} WHERE items.id = v.column1 AND {}",
            chunk.table(),
            chunk.real()
        );
        let mut q = sqlx::query(&sql);
        for (id, n) in chunk.rows() {
            q = q.bind(id).bind(*n);
        }
        let done = q.bind(chunk.count()).execute(&mut *conn).await.unwrap();
        assert_eq!(done.rows_affected(), 3, "the padding updates nothing");
    }
    let stored: Vec<(String, i64, Option<String>)> =
        sqlx::query("SELECT id, n, note FROM items ORDER BY id")
            .fetch_all(&mut *conn)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
    let expected: Vec<(String, i64, Option<String>)> = rows
        .iter()
        .map(|(id, n, note)| (id.clone(), if *n < 3 { 100 + n } else { *n }, note.clone()))
        .collect();
    assert_eq!(stored, expected, "8 + 3 rows inserted once each, 3 updated");
}
