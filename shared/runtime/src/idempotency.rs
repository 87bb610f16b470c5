//! Idempotency keys (Stripe's design): every mutation names a client-supplied key; the key, the
//! change and its outbox events commit in one transaction.
//!
//! - First call: [`IdempotencyKey::claim`] finds nothing, the mutation runs, and
//!   [`IdempotencyKey::record`] stores its response in the same transaction.
//! - Retry with the same key and the same request: `claim` returns the stored response and the
//!   mutation does not run again. A concurrent duplicate blocks on the key's unique index (or on
//!   SQLite's write lock) until the first commits, then replays it.
//! - Same key, different request (or another operation): `ALREADY_EXISTS`, nothing changes.
//! - A refusal that changes nothing (e.g. insufficient credits) may be stored too, with
//!   [`IdempotencyKey::record_status`], so a retry returns the same refusal.
//!
//! Keys are kept for the configured retention (at least 24 hours), then swept.

use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};
use tonic::{Code, Status};

use crate::db::{Backend, Db, DbError, fetch_in, row_chunks};

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// A validated key for one operation and one request.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    key: String,
    operation: &'static str,
    fingerprint: String,
    /// The text the same request's key was stored under before its service moved keys into a
    /// new space (see [`IdempotencyKey::formerly`]).
    former: Option<String>,
}

/// What a claim found.
#[derive(Debug)]
pub enum Claimed<R> {
    /// First use: run the mutation.
    New,
    /// A retry: the first outcome.
    Replay(Result<R, Status>),
}

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// Storage failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The key was used for different parameters.
    #[error(
        "idempotency key {key:?} was already used for a different request ({operation}); use a new key for a new request"
    )]
    Mismatch {
        /// The key.
        key: String,
        /// The operation it was first used for.
        operation: String,
    },
    /// The stored response cannot be decoded (schema drift).
    #[error("stored response for idempotency key {0:?} cannot be decoded")]
    Undecodable(String),
}

impl From<sqlx::Error> for IdempotencyError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

impl IdempotencyKey {
    /// Validates `key` and fingerprints `request` (its canonical protobuf encoding, which
    /// includes the key itself) for `operation`.
    pub fn new<M: Message>(
        operation: &'static str,
        key: &str,
        request: &M,
    ) -> Result<Self, Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument(
                "idempotency_key is required: every mutation takes a client-supplied key",
            ));
        }
        if key.len() > MAX_KEY_LEN || !key.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Status::invalid_argument(format!(
                "idempotency_key must be 1 to {MAX_KEY_LEN} printable ASCII characters"
            )));
        }
        let mut hasher = Sha256::new();
        hasher.update(operation.as_bytes());
        hasher.update([0]);
        hasher.update(request.encode_to_vec());
        let fingerprint = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            key: key.to_string(),
            operation,
            fingerprint,
            former: None,
        })
    }

    /// The same key, also answering for the text `former` it was stored under before its
    /// service moved keys into a new space (e.g. reseller-billing scoping keys by partner): a
    /// first answer stored under `former` is replayed only if it was for this very operation
    /// and request (same fingerprint), and is otherwise none of this key's business (another
    /// caller's key in the old shared space). Such rows go with the retention sweep.
    pub fn formerly(mut self, former: &str) -> Self {
        if former != self.key {
            self.former = Some(former.to_string());
        }
        self
    }

    /// The key text.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Looks the key up inside the mutation's write transaction.
    pub async fn claim<R: Message + Default>(
        &self,
        conn: &mut AnyConnection,
    ) -> Result<Claimed<R>, IdempotencyError> {
        match self.claim_bytes(conn).await? {
            Claimed::New => Ok(Claimed::New),
            Claimed::Replay(Err(status)) => Ok(Claimed::Replay(Err(status))),
            Claimed::Replay(Ok(bytes)) => R::decode(bytes.as_slice())
                .map(|r| Claimed::Replay(Ok(r)))
                .map_err(|_| IdempotencyError::Undecodable(self.key.clone())),
        }
    }

    /// Like [`IdempotencyKey::claim`], with the stored response as its encoded bytes (for an
    /// operation whose response message depends on the request).
    pub async fn claim_bytes(
        &self,
        conn: &mut AnyConnection,
    ) -> Result<Claimed<Vec<u8>>, IdempotencyError> {
        let row = sqlx::query(
            "SELECT operation, fingerprint, status_code, response FROM idempotency_keys \
             WHERE idempotency_key = $1",
        )
        .bind(&self.key)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            return self.judge(StoredKey::from_row(&row, 0)?);
        }
        let Some(former) = &self.former else {
            return Ok(Claimed::New);
        };
        let row = sqlx::query(
            "SELECT operation, fingerprint, status_code, response FROM idempotency_keys \
             WHERE idempotency_key = $1",
        )
        .bind(former)
        .fetch_optional(conn)
        .await?;
        match row {
            None => Ok(Claimed::New),
            Some(row) => Ok(self.judge_former(StoredKey::from_row(&row, 0)?)),
        }
    }

    /// [`IdempotencyKey::claim_bytes`] for many keys in one query (group commit): one answer
    /// per key, in the order given.
    pub async fn claim_many(
        conn: &mut AnyConnection,
        keys: &[&IdempotencyKey],
    ) -> Result<Vec<Result<Claimed<Vec<u8>>, IdempotencyError>>, IdempotencyError> {
        let ids: Vec<&str> = keys
            .iter()
            .flat_map(|k| std::iter::once(k.key.as_str()).chain(k.former.as_deref()))
            .collect();
        let rows = fetch_in(conn, &ids, &[], |list, _| {
            format!(
                "SELECT idempotency_key, operation, fingerprint, status_code, response \
                 FROM idempotency_keys WHERE idempotency_key IN ({list})"
            )
        })
        .await?;
        let mut stored = std::collections::HashMap::new();
        for row in rows {
            let key: String = row.try_get(0)?;
            stored.insert(key, StoredKey::from_row(&row, 1)?);
        }
        Ok(keys
            .iter()
            .map(|k| match stored.remove(&k.key) {
                Some(s) => k.judge(s),
                None => Ok(k
                    .former
                    .as_ref()
                    .and_then(|f| stored.get(f))
                    .map_or(Claimed::New, |s| k.judge_former(s.clone()))),
            })
            .collect())
    }

    /// Stores the first answers of many keys in one statement per chunk (group commit). Like
    /// [`IdempotencyKey::record`], a twin committed first makes this fail with a unique violation.
    pub async fn record_many(
        conn: &mut AnyConnection,
        answers: &[(&IdempotencyKey, Result<Vec<u8>, Status>)],
        now_us: i64,
    ) -> Result<(), IdempotencyError> {
        // Each row's code and stored bytes, borrowed from its answer: a padding row of
        // `row_chunks` binds them again without copying a response.
        let rows: Vec<(&IdempotencyKey, i32, &[u8])> = answers
            .iter()
            .map(|(key, answer)| match answer {
                Ok(bytes) => (*key, Code::Ok as i32, bytes.as_slice()),
                Err(status) => (*key, status.code() as i32, status.message().as_bytes()),
            })
            .collect();
        for chunk in row_chunks(Backend::of(conn), &rows, 6, MANY_CHUNK) {
            let sql = format!(
                "INSERT INTO idempotency_keys \
                 (idempotency_key, operation, fingerprint, status_code, response, created_at_us) \
                 {}",
                chunk.select()
            );
            let mut q = sqlx::query(&sql);
            for &(key, code, response) in chunk.rows() {
                q = q
                    .bind(&key.key)
                    .bind(key.operation)
                    .bind(&key.fingerprint)
                    .bind(code)
                    .bind(response)
                    .bind(now_us);
            }
            q.bind(chunk.count()).execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// What a stored key means for this request: its first answer, or a mismatch.
    fn judge(&self, stored: StoredKey) -> Result<Claimed<Vec<u8>>, IdempotencyError> {
        if stored.operation != self.operation || stored.fingerprint != self.fingerprint {
            return Err(IdempotencyError::Mismatch {
                key: self.key.clone(),
                operation: stored.operation,
            });
        }
        if stored.code == Code::Ok as i32 {
            Ok(Claimed::Replay(Ok(stored.response)))
        } else {
            let message = String::from_utf8_lossy(&stored.response).into_owned();
            Ok(Claimed::Replay(Err(Status::new(
                Code::from_i32(stored.code),
                message,
            ))))
        }
    }

    /// What a row stored under the key's former text means for this request: its first answer
    /// if it was this operation and request, otherwise nothing (a new request in the new space).
    fn judge_former(&self, stored: StoredKey) -> Claimed<Vec<u8>> {
        if stored.operation != self.operation || stored.fingerprint != self.fingerprint {
            return Claimed::New;
        }
        self.judge(stored).unwrap_or(Claimed::New)
    }

    /// Stores the response of the mutation in its transaction. A concurrent twin that got here
    /// first makes this fail with a unique violation, rolling this transaction back.
    pub async fn record<R: Message>(
        &self,
        conn: &mut AnyConnection,
        response: &R,
        now_us: i64,
    ) -> Result<(), IdempotencyError> {
        self.insert(conn, Code::Ok as i32, response.encode_to_vec(), now_us)
            .await
    }

    /// Stores already-encoded response bytes (see [`IdempotencyKey::claim_bytes`]).
    pub async fn record_bytes(
        &self,
        conn: &mut AnyConnection,
        response: Vec<u8>,
        now_us: i64,
    ) -> Result<(), IdempotencyError> {
        self.insert(conn, Code::Ok as i32, response, now_us).await
    }

    /// Stores a refusal (a status that changed nothing) in the caller's transaction, so a
    /// retry gets the same answer instead of a second evaluation.
    pub async fn record_status(
        &self,
        conn: &mut AnyConnection,
        status: &Status,
        now_us: i64,
    ) -> Result<(), IdempotencyError> {
        self.insert(
            conn,
            status.code() as i32,
            status.message().as_bytes().to_vec(),
            now_us,
        )
        .await
    }

    async fn insert(
        &self,
        conn: &mut AnyConnection,
        code: i32,
        response: Vec<u8>,
        now_us: i64,
    ) -> Result<(), IdempotencyError> {
        sqlx::query(
            "INSERT INTO idempotency_keys \
             (idempotency_key, operation, fingerprint, status_code, response, created_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&self.key)
        .bind(self.operation)
        .bind(&self.fingerprint)
        .bind(code)
        .bind(response)
        .bind(now_us)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// Rows per statement of [`IdempotencyKey::record_many`] (half a full batch of group commit):
/// far below SQLite's and PostgreSQL's limits on bound parameters.
const MANY_CHUNK: usize = 128;

/// A key's row, as stored.
#[derive(Clone)]
struct StoredKey {
    operation: String,
    fingerprint: String,
    code: i32,
    response: Vec<u8>,
}

impl StoredKey {
    /// Reads `operation, fingerprint, status_code, response` starting at column `first`.
    fn from_row(row: &sqlx::any::AnyRow, first: usize) -> Result<Self, sqlx::Error> {
        Ok(Self {
            operation: row.try_get(first)?,
            fingerprint: row.try_get(first + 1)?,
            code: row.try_get(first + 2)?,
            response: row.try_get(first + 3)?,
        })
    }
}

/// Deletes keys older than the retention; returns how many.
pub async fn sweep(db: &Db, older_than_us: i64) -> Result<u64, DbError> {
    Ok(
        sqlx::query("DELETE FROM idempotency_keys WHERE created_at_us < $1")
            .bind(older_than_us)
            .execute(db.pool())
            .await?
            .rows_affected(),
    )
}

impl From<IdempotencyError> for Status {
    fn from(e: IdempotencyError) -> Self {
        match e {
            IdempotencyError::Mismatch { .. } => Status::already_exists(e.to_string()),
            IdempotencyError::Db(inner) if inner.is_transient() => {
                tracing::warn!(error = %inner, "idempotency store unavailable");
                Status::unavailable(crate::db::STORAGE_UNAVAILABLE)
            }
            IdempotencyError::Db(inner) => {
                tracing::error!(error = %inner, "idempotency store failed");
                Status::internal("internal error")
            }
            IdempotencyError::Undecodable(_) => {
                tracing::error!(error = %e, "idempotency replay failed");
                Status::internal("internal error")
            }
        }
    }
}
