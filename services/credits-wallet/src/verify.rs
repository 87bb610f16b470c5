//! Ledger verification: re-derives every wallet's books from its rows and lists what does not
//! add up. Served as the admin RPC `VerifyLedger` and as the `verify-ledger` command.
//!
//! It only reads. Each wallet is read in one snapshot (a read transaction: `REPEATABLE READ,
//! READ ONLY` on PostgreSQL, a deferred transaction on SQLite, whose WAL readers see one
//! snapshot), so a wallet changing while it is checked is seen before or after the change,
//! never half-way; wallets are paged by id, one at a time, and a wallet's ledger and lots are
//! streamed rather than loaded. The queries here are written apart from `store` on purpose:
//! an auditor that decoded rows with the code it audits could not catch that code's mistakes.
//!
//! Checks, per wallet: balance = sum of the ledger; balance = sum of lot credits - debt; every
//! lot within 0..=granted; held = credits of the active holds; sequence numbers 1..=ledger_seq
//! without gaps; each `balance_after` the running sum; each purchase has exactly the ledger
//! entries and the lot its status calls for (one purchase entry and a lot once succeeded, or
//! pending settlement when it funds a send; none when failed or still processing; plus one
//! claw-back when returned; plus a claw-back and a purchase entry more after a dispute won),
//! and no purchase entry names an unknown purchase. Then the outbox:
//! every event typed, delivery cursors 1..=last without gaps, and no event left undelivered
//! longer than the grace period.

use std::{collections::HashMap, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use runtime::db::{Backend, DbError};
use sqlx::{
    Any, AnyPool, Executor, Row, Transaction,
    any::{AnyConnectOptions, AnyPoolOptions},
};
use tokio_stream::StreamExt;

use crate::model::{PurchaseStatus, PurchaseTrigger};

/// Most violations listed in a report (all are counted).
pub const MAX_LISTED: usize = 1000;
/// An undelivered event younger than this is the relay's normal lag, not a violation.
pub const DEFAULT_OUTBOX_GRACE: Duration = Duration::from_secs(60);
/// Wallet ids read per page.
const PAGE: i64 = 200;

/// One rule of the books.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    /// The balance is not the sum of the ledger.
    BalanceVsLedger,
    /// The balance is not the lots' credits minus debt.
    BalanceVsLots,
    /// A lot below zero or above what it was granted.
    LotOutOfRange,
    /// `held` is not the credits of the active holds.
    HeldVsReservations,
    /// Sequence numbers with a gap, or not ending at `ledger_seq`.
    LedgerSequence,
    /// A `balance_after` that is not the running sum.
    RunningBalance,
    /// A purchase whose status or trigger is not one the service writes.
    PurchaseStatus,
    /// A purchase without the ledger entries its status calls for, or with too many.
    PurchaseEntries,
    /// A purchase without the lot its status calls for, or with one it should not have.
    PurchaseLot,
    /// An event with an empty type.
    OutboxEventType,
    /// An event left without a delivery cursor past the grace period.
    OutboxUndelivered,
    /// Delivery cursors with a gap, or not matching the relay's next cursor.
    OutboxCursors,
}

impl Check {
    /// The stable name reported to callers.
    pub fn as_str(self) -> &'static str {
        match self {
            Check::BalanceVsLedger => "balance_vs_ledger",
            Check::BalanceVsLots => "balance_vs_lots",
            Check::LotOutOfRange => "lot_out_of_range",
            Check::HeldVsReservations => "held_vs_reservations",
            Check::LedgerSequence => "ledger_sequence",
            Check::RunningBalance => "running_balance",
            Check::PurchaseStatus => "purchase_status",
            Check::PurchaseEntries => "purchase_entries",
            Check::PurchaseLot => "purchase_lot",
            Check::OutboxEventType => "outbox_event_type",
            Check::OutboxUndelivered => "outbox_undelivered",
            Check::OutboxCursors => "outbox_cursors",
        }
    }
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The wallet, or "" for the outbox.
    pub wallet_id: String,
    /// The rule.
    pub check: Check,
    /// What was found, with the numbers.
    pub detail: String,
}

/// What a verification found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Wallets read.
    pub wallets_checked: u64,
    /// Ledger entries read.
    pub entries_checked: u64,
    /// Purchases read.
    pub purchases_checked: u64,
    /// Outbox events read.
    pub outbox_events_checked: u64,
    /// Events without a delivery cursor yet (late ones are also violations).
    pub outbox_undelivered: u64,
    /// The first [`MAX_LISTED`] violations.
    pub violations: Vec<Violation>,
    /// Violations found in all.
    pub violations_total: u64,
}

impl Report {
    /// Whether the books are sound.
    pub fn is_clean(&self) -> bool {
        self.violations_total == 0
    }

    fn add(&mut self, wallet_id: &str, check: Check, detail: String) {
        self.violations_total += 1;
        if self.violations.len() < MAX_LISTED {
            self.violations.push(Violation {
                wallet_id: wallet_id.to_string(),
                check,
                detail,
            });
        }
    }
}

/// How to verify.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The instant undelivered events are aged against (the service clock).
    pub now: DateTime<Utc>,
    /// How long an event may wait for its delivery cursor.
    pub outbox_grace: Duration,
}

/// A wallet's ledger, walked in sequence order (pure: fed one entry at a time).
#[derive(Debug, Default)]
pub struct LedgerWalk {
    entries: u64,
    last_seq: i64,
    sum: i128,
    first_gap: Option<(i64, i64)>,
    mismatches: u64,
    first_mismatch: Option<(i64, i64, i128)>,
}

impl LedgerWalk {
    /// The next entry (by ascending `seq`).
    pub fn observe(&mut self, seq: i64, delta: i64, balance_after: i64) {
        self.entries += 1;
        let expected = self.last_seq.saturating_add(1);
        if seq != expected && self.first_gap.is_none() {
            self.first_gap = Some((expected, seq));
        }
        self.last_seq = seq;
        self.sum += i128::from(delta);
        if i128::from(balance_after) != self.sum {
            self.mismatches += 1;
            if self.first_mismatch.is_none() {
                self.first_mismatch = Some((seq, balance_after, self.sum));
            }
        }
    }

    /// Entries seen.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Sum of the deltas seen.
    pub fn sum(&self) -> i128 {
        self.sum
    }

    /// What the walk contradicts, given the wallet header's `balance` and `ledger_seq`.
    pub fn findings(&self, balance: i64, ledger_seq: i64) -> Vec<(Check, String)> {
        let mut out = Vec::new();
        if i128::from(balance) != self.sum {
            out.push((
                Check::BalanceVsLedger,
                format!(
                    "balance {balance} but the ledger sums to {} over {} entries",
                    self.sum, self.entries
                ),
            ));
        }
        if let Some((expected, found)) = self.first_gap {
            out.push((
                Check::LedgerSequence,
                format!("sequence number {expected} expected, {found} found"),
            ));
        }
        let count_matches = i64::try_from(self.entries).is_ok_and(|n| n == ledger_seq);
        if !count_matches || self.last_seq != ledger_seq {
            out.push((
                Check::LedgerSequence,
                format!(
                    "ledger_seq is {ledger_seq} but the ledger has {} entries ending at {}",
                    self.entries, self.last_seq
                ),
            ));
        }
        if let Some((seq, after, running)) = self.first_mismatch {
            out.push((
                Check::RunningBalance,
                format!(
                    "entry {seq} says balance_after {after}, the running sum is {running} \
                     ({} entries disagree)",
                    self.mismatches
                ),
            ));
        }
        out
    }
}

/// A wallet header against its lots and holds (pure).
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    /// The header's balance.
    pub balance: i64,
    /// The header's held credits.
    pub held: i64,
    /// The header's debt.
    pub debt: i64,
    /// Sum of the lots' remaining credits.
    pub lots_remaining: i128,
    /// Credits of the active holds.
    pub active_holds: i128,
}

impl Totals {
    /// What the totals contradict.
    pub fn findings(&self) -> Vec<(Check, String)> {
        let mut out = Vec::new();
        if i128::from(self.balance) != self.lots_remaining - i128::from(self.debt) {
            out.push((
                Check::BalanceVsLots,
                format!(
                    "balance {} but lots hold {} and debt is {}",
                    self.balance, self.lots_remaining, self.debt
                ),
            ));
        }
        if i128::from(self.held) != self.active_holds {
            out.push((
                Check::HeldVsReservations,
                format!(
                    "held {} but active holds add up to {}",
                    self.held, self.active_holds
                ),
            ));
        }
        out
    }
}

/// What a purchase's status calls for in the ledger (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// One purchase entry and a lot.
    pub granted: bool,
    /// One claw-back entry.
    pub clawed_back: bool,
}

/// The ledger a purchase must have: credits granted once the payment succeeded, or at once
/// for a direct debit that funds a send (C5, C9); taken back once returned; nothing while
/// processing or after a decline. A purchase whose dispute was won has, besides, the claw-back
/// of the dispute and the grant that gave its credits back.
pub fn expected(status: PurchaseStatus, trigger: PurchaseTrigger, has_origin: bool) -> Expected {
    let (granted, clawed_back) = match status {
        PurchaseStatus::Succeeded => (true, false),
        PurchaseStatus::PendingSettlement => (trigger.funds_a_send(has_origin), false),
        PurchaseStatus::Returned => (true, true),
        PurchaseStatus::Processing | PurchaseStatus::Failed => (false, false),
    };
    Expected {
        granted,
        clawed_back,
    }
}

/// Opens `url` for verification only: SQLite read-only (`mode=ro`), PostgreSQL with read-only
/// transactions in `schema`. Runs no migration, so it never changes the database it checks.
pub async fn connect_read_only(url: &str, schema: &str) -> Result<(AnyPool, Backend), DbError> {
    sqlx::any::install_default_drivers();
    if url.starts_with("sqlite:") {
        let url = if url.contains("mode=") {
            url.to_string()
        } else if url.contains('?') {
            format!("{url}&mode=ro")
        } else {
            format!("{url}?mode=ro")
        };
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    Ok(())
                })
            })
            .connect_with(AnyConnectOptions::from_str(&url)?)
            .await?;
        return Ok((pool, Backend::Sqlite));
    }
    if schema.is_empty()
        || schema.starts_with(|c: char| c.is_ascii_digit())
        || !schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(DbError::Corrupt(format!(
            "schema {schema:?} is not a lower-case SQL identifier"
        )));
    }
    let set_path = format!("SET search_path TO \"{schema}\"");
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            let set_path = set_path.clone();
            Box::pin(async move {
                conn.execute(set_path.as_str()).await?;
                conn.execute("SET default_transaction_read_only = on")
                    .await?;
                Ok(())
            })
        })
        .connect_with(AnyConnectOptions::from_str(url)?)
        .await?;
    Ok((pool, Backend::Postgres))
}

async fn snapshot(pool: &AnyPool, backend: Backend) -> Result<Transaction<'static, Any>, DbError> {
    Ok(match backend {
        Backend::Sqlite => pool.begin_with("BEGIN").await?,
        Backend::Postgres => {
            pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .await?
        }
    })
}

/// Verifies every wallet and the outbox.
pub async fn verify(
    pool: &AnyPool,
    backend: Backend,
    options: &Options,
) -> Result<Report, DbError> {
    let mut report = Report::default();
    let mut after = String::new();
    loop {
        let ids: Vec<String> = sqlx::query(
            "SELECT wallet_id FROM wallets WHERE wallet_id > $1 ORDER BY wallet_id LIMIT $2",
        )
        .bind(&after)
        .bind(PAGE)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        let Some(last) = ids.last() else { break };
        after = last.clone();
        for wallet_id in &ids {
            let mut tx = snapshot(pool, backend).await?;
            verify_wallet(&mut tx, wallet_id, &mut report).await?;
            tx.rollback().await?;
        }
    }
    let mut tx = snapshot(pool, backend).await?;
    verify_outbox(&mut tx, options, &mut report).await?;
    tx.rollback().await?;
    Ok(report)
}

/// Per purchase: (purchase entries, claw-back entries) naming it.
type PurchaseRefs = HashMap<String, (u32, u32)>;

async fn verify_wallet(
    tx: &mut Transaction<'static, Any>,
    wallet_id: &str,
    report: &mut Report,
) -> Result<(), DbError> {
    let Some(header) =
        sqlx::query("SELECT balance, held, debt, ledger_seq FROM wallets WHERE wallet_id = $1")
            .bind(wallet_id)
            .fetch_optional(&mut **tx)
            .await?
    else {
        return Ok(());
    };
    let balance: i64 = header.try_get(0)?;
    let held: i64 = header.try_get(1)?;
    let debt: i64 = header.try_get(2)?;
    let ledger_seq: i64 = header.try_get(3)?;
    report.wallets_checked += 1;

    let mut walk = LedgerWalk::default();
    let mut refs = PurchaseRefs::new();
    {
        let mut rows = sqlx::query(
            "SELECT seq, delta, balance_after, kind, reference FROM ledger_entries \
             WHERE wallet_id = $1 ORDER BY seq",
        )
        .bind(wallet_id)
        .fetch(&mut **tx);
        while let Some(row) = rows.next().await {
            let row = row?;
            walk.observe(row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let kind: String = row.try_get(3)?;
            if kind == "purchase" || kind == "clawback" {
                let reference: String = row.try_get(4)?;
                let id = reference
                    .strip_prefix("purchase:")
                    .unwrap_or(&reference)
                    .to_string();
                let counts = refs.entry(id).or_default();
                if kind == "purchase" {
                    counts.0 += 1;
                } else {
                    counts.1 += 1;
                }
            }
        }
    }
    report.entries_checked += walk.entries();
    for (check, detail) in walk.findings(balance, ledger_seq) {
        report.add(wallet_id, check, detail);
    }

    let mut lots_remaining: i128 = 0;
    {
        let mut rows =
            sqlx::query("SELECT lot_id, granted, remaining FROM credit_lots WHERE wallet_id = $1")
                .bind(wallet_id)
                .fetch(&mut **tx);
        while let Some(row) = rows.next().await {
            let row = row?;
            let granted: i64 = row.try_get(1)?;
            let remaining: i64 = row.try_get(2)?;
            lots_remaining += i128::from(remaining);
            if remaining < 0 || remaining > granted {
                let lot_id: String = row.try_get(0)?;
                report.add(
                    wallet_id,
                    Check::LotOutOfRange,
                    format!("lot {lot_id} has {remaining} credits left of {granted} granted"),
                );
            }
        }
    }
    let active_holds: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM reservations \
         WHERE wallet_id = $1 AND status = 'active'",
    )
    .bind(wallet_id)
    .fetch_one(&mut **tx)
    .await?
    .try_get(0)?;
    let totals = Totals {
        balance,
        held,
        debt,
        lots_remaining,
        active_holds: i128::from(active_holds),
    };
    for (check, detail) in totals.findings() {
        report.add(wallet_id, check, detail);
    }

    verify_purchases(tx, wallet_id, refs, report).await
}

async fn verify_purchases(
    tx: &mut Transaction<'static, Any>,
    wallet_id: &str,
    mut refs: PurchaseRefs,
    report: &mut Report,
) -> Result<(), DbError> {
    let mut rows = sqlx::query(
        "SELECT p.purchase_id, p.status, p.trigger, p.origin_key, p.credits, p.lot_id, \
         l.granted, l.wallet_id FROM purchases p LEFT JOIN credit_lots l ON l.lot_id = p.lot_id \
         WHERE p.wallet_id = $1",
    )
    .bind(wallet_id)
    .fetch(&mut **tx);
    while let Some(row) = rows.next().await {
        let row = row?;
        report.purchases_checked += 1;
        let id: String = row.try_get(0)?;
        let status_text: String = row.try_get(1)?;
        let trigger_text: String = row.try_get(2)?;
        let origin: Option<String> = row.try_get(3)?;
        let credits: i64 = row.try_get(4)?;
        let lot_id: Option<String> = row.try_get(5)?;
        let lot_granted: Option<i64> = row.try_get(6)?;
        let lot_wallet: Option<String> = row.try_get(7)?;
        let (purchase_entries, clawbacks) = refs.remove(&id).unwrap_or_default();
        let (Some(status), Some(trigger)) = (
            PurchaseStatus::parse(&status_text),
            PurchaseTrigger::parse(&trigger_text),
        ) else {
            report.add(
                wallet_id,
                Check::PurchaseStatus,
                format!("purchase {id} has status {status_text:?} and trigger {trigger_text:?}"),
            );
            continue;
        };
        let want = expected(status, trigger, origin.is_some());
        let (want_entries, want_clawbacks) = (u32::from(want.granted), u32::from(want.clawed_back));
        // A dispute won after its credits were taken back granted them once more (a charge is
        // disputed at most once): one more purchase entry and one more claw-back.
        let reinstated =
            want.granted && (purchase_entries, clawbacks) == (want_entries + 1, want_clawbacks + 1);
        if (purchase_entries, clawbacks) != (want_entries, want_clawbacks) && !reinstated {
            report.add(
                wallet_id,
                Check::PurchaseEntries,
                format!(
                    "purchase {id} is {status_text} ({trigger_text}): {want_entries} purchase \
                     and {want_clawbacks} claw-back entries expected, {purchase_entries} and \
                     {clawbacks} found"
                ),
            );
        }
        let lot_problem = match (want.granted, &lot_id, lot_granted) {
            (true, None, _) => Some("has no lot".to_string()),
            (true, Some(lot), None) => Some(format!("names lot {lot}, which does not exist")),
            (true, Some(lot), Some(granted))
                if granted != credits || lot_wallet.as_deref() != Some(wallet_id) =>
            {
                Some(format!(
                    "bought {credits} credits but lot {lot} granted {granted} to wallet {}",
                    lot_wallet.as_deref().unwrap_or("?")
                ))
            }
            (false, Some(lot), _) => Some(format!("has lot {lot} but granted nothing")),
            _ => None,
        };
        if let Some(problem) = lot_problem {
            report.add(
                wallet_id,
                Check::PurchaseLot,
                format!("purchase {id} ({status_text}) {problem}"),
            );
        }
    }
    let mut orphans: Vec<_> = refs.into_iter().filter(|(_, (n, _))| *n > 0).collect();
    orphans.sort();
    for (id, (n, _)) in orphans {
        report.add(
            wallet_id,
            Check::PurchaseEntries,
            format!("{n} purchase entries name purchase {id:?}, which this wallet does not have"),
        );
    }
    Ok(())
}

async fn verify_outbox(
    tx: &mut Transaction<'static, Any>,
    options: &Options,
    report: &mut Report,
) -> Result<(), DbError> {
    let grace = i64::try_from(options.outbox_grace.as_micros()).unwrap_or(i64::MAX);
    let cutoff = options.now.timestamp_micros().saturating_sub(grace);
    let row = sqlx::query(
        "SELECT COUNT(*), COUNT(delivery_cursor), CAST(COALESCE(MAX(delivery_cursor), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN event_type = '' THEN 1 ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN delivery_cursor IS NULL AND occurred_at_us < $1 \
              THEN 1 ELSE 0 END), 0) AS BIGINT) \
         FROM outbox",
    )
    .bind(cutoff)
    .fetch_one(&mut **tx)
    .await?;
    let total: i64 = row.try_get(0)?;
    let numbered: i64 = row.try_get(1)?;
    let max_cursor: i64 = row.try_get(2)?;
    let untyped: i64 = row.try_get(3)?;
    let late: i64 = row.try_get(4)?;
    let next_cursor: i64 = sqlx::query("SELECT next_cursor FROM outbox_relay WHERE id = 1")
        .fetch_one(&mut **tx)
        .await?
        .try_get(0)?;
    report.outbox_events_checked = u64::try_from(total).unwrap_or(0);
    report.outbox_undelivered = u64::try_from(total - numbered).unwrap_or(0);
    if untyped > 0 {
        report.add(
            "",
            Check::OutboxEventType,
            format!("{untyped} events have an empty type"),
        );
    }
    if late > 0 {
        report.add(
            "",
            Check::OutboxUndelivered,
            format!(
                "{late} events still have no delivery cursor {} s after they were written",
                options.outbox_grace.as_secs()
            ),
        );
    }
    if numbered != max_cursor || next_cursor != max_cursor + 1 {
        report.add(
            "",
            Check::OutboxCursors,
            format!(
                "{numbered} events have cursors up to {max_cursor}; the relay's next cursor is \
                 {next_cursor}"
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn checks(found: &[(Check, String)]) -> Vec<Check> {
        found.iter().map(|(c, _)| *c).collect()
    }

    #[test]
    fn a_sound_ledger_has_no_findings() {
        let mut walk = LedgerWalk::default();
        walk.observe(1, 100, 100);
        walk.observe(2, -30, 70);
        walk.observe(3, 5, 75);
        assert!(walk.findings(75, 3).is_empty());
        assert_eq!(walk.entries(), 3);
        assert_eq!(walk.sum(), 75);
    }

    #[test]
    fn an_empty_ledger_matches_a_new_wallet() {
        assert!(LedgerWalk::default().findings(0, 0).is_empty());
        assert_eq!(
            checks(&LedgerWalk::default().findings(0, 1)),
            [Check::LedgerSequence]
        );
    }

    #[test]
    fn a_missing_entry_shows_as_a_gap_a_wrong_sum_and_a_wrong_running_balance() {
        let mut walk = LedgerWalk::default();
        walk.observe(1, 100, 100);
        walk.observe(3, 5, 75);
        let found = walk.findings(75, 3);
        assert_eq!(
            checks(&found),
            [
                Check::BalanceVsLedger,
                Check::LedgerSequence,
                Check::LedgerSequence,
                Check::RunningBalance
            ]
        );
        assert!(found[1].1.contains("2 expected, 3 found"), "{found:?}");
    }

    #[test]
    fn a_header_one_off_is_reported_against_the_ledger() {
        let mut walk = LedgerWalk::default();
        walk.observe(1, 10, 10);
        assert_eq!(checks(&walk.findings(11, 1)), [Check::BalanceVsLedger]);
    }

    #[test]
    fn totals_compare_lots_debt_and_holds() {
        let sound = Totals {
            balance: -5,
            held: 3,
            debt: 10,
            lots_remaining: 5,
            active_holds: 3,
        };
        assert!(sound.findings().is_empty());
        let off = Totals {
            balance: -4,
            held: 4,
            ..sound
        };
        assert_eq!(
            checks(&off.findings()),
            [Check::BalanceVsLots, Check::HeldVsReservations]
        );
    }

    #[test]
    fn a_purchase_is_granted_exactly_when_its_status_says_so() {
        use PurchaseStatus as S;
        use PurchaseTrigger as T;
        let granted = |s, t, o| expected(s, t, o).granted;
        assert!(granted(S::Succeeded, T::Manual, true));
        assert!(!granted(S::PendingSettlement, T::Manual, true));
        assert!(granted(S::PendingSettlement, T::OnDemand, true));
        assert!(granted(S::PendingSettlement, T::AutoShortfall, true));
        assert!(!granted(S::PendingSettlement, T::AutoFixed, false));
        assert!(!granted(S::Failed, T::OnDemand, true));
        assert!(!granted(S::Processing, T::Manual, true));
        assert_eq!(
            expected(S::Returned, T::OnDemand, true),
            Expected {
                granted: true,
                clawed_back: true
            }
        );
    }
}
