//! What PostgreSQL did during a scenario's loads: checkpoints, and the write-ahead log written
//! (bytes, and full-page images, the copy of a whole page that the first change of each page
//! after a checkpoint logs). Read from `pg_stat_bgwriter` and `pg_stat_wal` (PostgreSQL 14+)
//! before and after; they count the whole server, which nothing else uses during a run.

use sqlx::Row;

/// The server's counters at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    checkpoints_timed: i64,
    checkpoints_requested: i64,
    wal_bytes: i64,
    full_page_images: i64,
}

/// What happened between two readings.
#[derive(Clone, Copy, Debug)]
pub struct Activity {
    pub checkpoints_timed: i64,
    pub checkpoints_requested: i64,
    pub wal_bytes: i64,
    pub full_page_images: i64,
}

/// The counters now, or `None` when they cannot be read (the reason on stderr: a missing view
/// or permission leaves the figures out, not the run).
pub async fn read(url: &str) -> Option<Counters> {
    let read = async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await?;
        let row = sqlx::query(
            "SELECT b.checkpoints_timed, b.checkpoints_req, w.wal_bytes::BIGINT, w.wal_fpi \
             FROM pg_stat_bgwriter b, pg_stat_wal w",
        )
        .fetch_one(&pool)
        .await?;
        pool.close().await;
        Ok::<_, sqlx::Error>(Counters {
            checkpoints_timed: row.try_get(0)?,
            checkpoints_requested: row.try_get(1)?,
            wal_bytes: row.try_get(2)?,
            full_page_images: row.try_get(3)?,
        })
    };
    match read.await {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("bench: PostgreSQL's WAL and checkpoint counters not read: {e}");
            None
        }
    }
}

impl Counters {
    /// What happened since `before`.
    pub fn since(&self, before: &Counters) -> Activity {
        Activity {
            checkpoints_timed: self.checkpoints_timed - before.checkpoints_timed,
            checkpoints_requested: self.checkpoints_requested - before.checkpoints_requested,
            wal_bytes: self.wal_bytes - before.wal_bytes,
            full_page_images: self.full_page_images - before.full_page_images,
        }
    }
}
