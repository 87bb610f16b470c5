//! One wallet locked inside a write transaction: the domain rules applied in memory, then
//! saved with their ledger entries and outbox events in the same transaction.
//!
//! Invariant checked before every save: balance = sum of the ledger = sum of the lots' remaining
//! credits - debt. A change that would break it aborts the transaction.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use runtime::{
    db::{Db, DbError},
    outbox,
};
use serde_json::{Value, json};
use sqlx::AnyConnection;

use crate::{
    domain::{self, Lot, LotKind, Reminder, Shortfall},
    error::WalletError,
    model::{
        EntryKind, EntryRecord, HoldChanged, ReservationRecord, ReservationStatus, WalletRecord,
        WalletView,
    },
    store,
};

/// A locked wallet and the changes made to it in this transaction.
#[derive(Debug, Clone)]
pub struct Account {
    /// The header as it will be saved.
    pub wallet: WalletRecord,
    /// Lots with credits left when loaded, plus new ones; `granted` alongside.
    pub lots: Vec<(Lot, i64)>,
    /// The transaction's instant (the service clock).
    pub now: DateTime<Utc>,
    /// Credits bought automatically this calendar month (C4/C5 cap). Group commit reads it only
    /// for wallets with automatic top-up on (0 for the others, whose sends never consult it).
    pub auto_bought_this_month: i64,
    original_remaining: Vec<(String, i64)>,
    new_lots: Vec<String>,
    entries: Vec<EntryRecord>,
    reservations: Vec<(ReservationRecord, bool)>,
    events: Vec<(&'static str, Value)>,
}

/// The first instant of `now`'s calendar month (UTC): the monthly cap's window.
pub fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now)
}

impl Account {
    /// Locks `wallet_id` (row lock on PostgreSQL), loads its lots, and removes what is due
    /// ([`Account::housekeeping`]): every transaction on a locked wallet starts so.
    pub async fn lock(
        conn: &mut AnyConnection,
        db: &Db,
        wallet_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Account, WalletError> {
        let wallet = store::lock_wallet(conn, db, wallet_id)
            .await?
            .ok_or_else(|| WalletError::WalletNotFound(wallet_id.to_string()))?;
        let mut acct = Self::load(conn, wallet, now).await?;
        acct.housekeeping(conn).await?;
        Ok(acct)
    }

    /// Loads the lots of a wallet just read or inserted.
    pub async fn load(
        conn: &mut AnyConnection,
        wallet: WalletRecord,
        now: DateTime<Utc>,
    ) -> Result<Account, WalletError> {
        let lots = store::lots_with_credits(conn, &wallet.wallet_id).await?;
        let auto_bought_this_month =
            store::auto_bought_since(conn, &wallet.wallet_id, month_start(now)).await?;
        Ok(Self::from_parts(wallet, lots, auto_bought_this_month, now))
    }

    /// An account from rows already read under the wallet's lock (group commit reads many
    /// wallets' rows at once).
    pub fn from_parts(
        wallet: WalletRecord,
        lots: Vec<(Lot, i64)>,
        auto_bought_this_month: i64,
        now: DateTime<Utc>,
    ) -> Account {
        let original_remaining = lots
            .iter()
            .map(|(l, _)| (l.lot_id.clone(), l.remaining))
            .collect();
        Account {
            wallet,
            lots,
            now,
            auto_bought_this_month,
            original_remaining,
            new_lots: Vec::new(),
            entries: Vec::new(),
            reservations: Vec::new(),
            events: Vec::new(),
        }
    }

    fn plain_lots(&self) -> Vec<Lot> {
        self.lots.iter().map(|(l, _)| l.clone()).collect()
    }

    /// Live lots in consumption order (what the wallet shows).
    pub fn live_lots(&self) -> Vec<(Lot, i64)> {
        let mut live: Vec<(Lot, i64)> = self
            .lots
            .iter()
            .filter(|(l, _)| l.is_live(self.now))
            .cloned()
            .collect();
        let mut order: Vec<Lot> = live.iter().map(|(l, _)| l.clone()).collect();
        domain::consumption_order(&mut order);
        live.sort_by_key(|(l, _)| order.iter().position(|o| o.lot_id == l.lot_id));
        live
    }

    /// Credits that can be spent now (live credits minus held).
    pub fn available(&self) -> i64 {
        domain::available(&self.plain_lots(), self.wallet.held, self.now)
    }

    /// The wallet as a use case answers it.
    pub fn view(&self) -> WalletView {
        WalletView {
            wallet: self.wallet.clone(),
            available: self.available(),
            lots: self.live_lots(),
            auto_bought_this_month: self.auto_bought_this_month,
        }
    }

    /// Queues an outbox event.
    pub fn event(&mut self, event_type: &'static str, payload: Value) {
        self.events.push((event_type, payload));
    }

    fn entry(
        &mut self,
        kind: EntryKind,
        delta: i64,
        reference: String,
        description: String,
    ) -> EntryRecord {
        self.wallet.balance += delta;
        self.wallet.ledger_seq += 1;
        let e = EntryRecord {
            seq: self.wallet.ledger_seq,
            kind,
            delta,
            balance_after: self.wallet.balance,
            reference,
            description,
            created_at: self.now,
        };
        self.entries.push(e.clone());
        e
    }

    fn take_from_lots(&mut self, takes: &[domain::Take]) {
        for t in takes {
            if let Some((lot, _)) = self.lots.iter_mut().find(|(l, _)| l.lot_id == t.lot_id) {
                lot.remaining -= t.credits;
            }
        }
    }

    /// Debits `credits` from live lots in consumption order, leaving held credits alone (C2).
    pub fn debit(
        &mut self,
        credits: i64,
        kind: EntryKind,
        reference: String,
        description: String,
    ) -> Result<EntryRecord, Shortfall> {
        let takes = domain::plan_debit(&self.plain_lots(), self.wallet.held, credits, self.now)?;
        self.take_from_lots(&takes);
        Ok(self.entry(kind, -credits, reference, description))
    }

    /// Debits `credits` like [`Account::debit`] and returns the earliest expiry among the lots
    /// they came from (a transfer passes it on, so moving credits never rescues them from
    /// expiring).
    pub fn debit_for_transfer(
        &mut self,
        credits: i64,
        reference: String,
        description: String,
    ) -> Result<Option<DateTime<Utc>>, Shortfall> {
        let takes = domain::plan_debit(&self.plain_lots(), self.wallet.held, credits, self.now)?;
        let earliest = takes
            .iter()
            .filter_map(|t| {
                self.lots
                    .iter()
                    .find(|(l, _)| l.lot_id == t.lot_id)
                    .and_then(|(l, _)| l.expires_at)
            })
            .min();
        self.take_from_lots(&takes);
        self.entry(EntryKind::Transfer, -credits, reference, description);
        Ok(earliest)
    }

    /// Grants a new lot; credits first pay back any debt (a returned direct debit).
    pub fn grant(
        &mut self,
        kind: LotKind,
        credits: i64,
        expires_at: Option<DateTime<Utc>>,
        entry_kind: EntryKind,
        reference: String,
        description: String,
    ) -> (String, EntryRecord) {
        let (repaid, remaining) = domain::repay_debt(self.wallet.debt, credits);
        let lot_id = format!("lot_{}", uuid::Uuid::now_v7().simple());
        self.lots.push((
            Lot {
                lot_id: lot_id.clone(),
                kind,
                remaining,
                expires_at,
                created_at: self.now,
            },
            credits,
        ));
        self.new_lots.push(lot_id.clone());
        if repaid > 0 {
            self.wallet.debt -= repaid;
            if self.wallet.debt == 0 {
                // The debt is repaid in full. "Settled" in the event's type (a published name)
                // means repaid; elsewhere in the wallet, settlement is a direct debit clearing.
                self.event(
                    "wallet.debt_settled",
                    json!({"wallet_id": self.wallet.wallet_id, "repaid": repaid}),
                );
            }
        }
        let entry = self.entry(entry_kind, credits, reference, description);
        (lot_id, entry)
    }

    /// Takes back the credits of a returned direct debit (C9), or of a payment refunded or
    /// disputed in full: from its own lot first, then the others; what was already spent
    /// becomes debt, and sends stop until it is paid. `why` describes the ledger entry.
    pub fn claw_back(&mut self, own_lot: Option<&str>, credits: i64, reference: String, why: &str) {
        let (takes, debt_added) =
            domain::plan_clawback(&self.plain_lots(), own_lot, credits, self.now);
        self.take_from_lots(&takes);
        self.wallet.debt += debt_added;
        self.entry(EntryKind::Clawback, -credits, reference.clone(), why.into());
        if debt_added > 0 {
            self.event(
                "wallet.debt_recorded",
                json!({"wallet_id": self.wallet.wallet_id, "debt": self.wallet.debt, "reference": reference}),
            );
        }
    }

    /// Removes credits whose lots have expired (C7: monthly credits do not roll over), and
    /// lapses holds past their expiry. Run by [`Account::lock`], first in every transaction on
    /// a wallet, so expired credits never count even before the background sweep.
    async fn housekeeping(&mut self, conn: &mut AnyConnection) -> Result<(), WalletError> {
        let lapsed = store::lapsed_reservations(conn, &self.wallet.wallet_id, self.now).await?;
        self.housekeeping_with(lapsed);
        Ok(())
    }

    /// [`Account::housekeeping`] with the wallet's lapsed holds already read.
    pub fn housekeeping_with(&mut self, lapsed: Vec<ReservationRecord>) {
        for take in domain::due_expiries(&self.plain_lots(), self.now) {
            let kind = self
                .lots
                .iter()
                .find(|(l, _)| l.lot_id == take.lot_id)
                .map(|(l, _)| l.kind.as_str())
                .unwrap_or("unknown");
            self.take_from_lots(std::slice::from_ref(&take));
            self.entry(
                EntryKind::Expiry,
                -take.credits,
                format!("lot:{}", take.lot_id),
                format!("{kind} credits expired unused"),
            );
            self.event(
                "wallet.credits_expired",
                json!({"wallet_id": self.wallet.wallet_id, "lot_id": take.lot_id, "kind": kind, "credits": take.credits}),
            );
        }
        for mut r in lapsed {
            r.status = ReservationStatus::Expired;
            self.wallet.held -= r.credits;
            self.event(
                "wallet.reservation_expired",
                json!({"wallet_id": self.wallet.wallet_id, "reservation_id": r.reservation_id, "mailing_id": r.mailing_id, "credits": r.credits}),
            );
            self.reservations.push((r, false));
        }
    }

    /// Queues a new hold (inserted on save).
    pub fn add_reservation(&mut self, r: ReservationRecord) {
        self.wallet.held += r.credits;
        self.reservations.push((r, true));
    }

    /// Queues a changed hold (updated on save).
    pub fn update_reservation(&mut self, r: ReservationRecord) {
        self.reservations.push((r, false));
    }

    /// C3: one low-balance event per downward crossing of the threshold.
    fn observe_reminder(&mut self) {
        let available = self.available();
        let (next, fire) = self.wallet.reminder.observe(available);
        self.wallet.reminder = next;
        if fire {
            self.event(
                "wallet.low_balance",
                json!({"wallet_id": self.wallet.wallet_id, "available": available, "threshold": next.threshold}),
            );
        }
    }

    /// Re-arms or disarms the reminder for a new threshold.
    pub fn set_reminder(&mut self, threshold: Option<i64>) {
        self.wallet.reminder = Reminder::new(threshold, self.available());
    }

    /// Saves every change in the caller's transaction, after checking the ledger invariant.
    pub async fn save(mut self, conn: &mut AnyConnection) -> Result<(), WalletError> {
        self.check_before_save()?;
        let wallet_id = self.wallet.wallet_id.clone();
        for (lot, granted) in &self.lots {
            if self.new_lots.contains(&lot.lot_id) {
                store::insert_lot(conn, &wallet_id, lot, *granted).await?;
            } else if self.lot_changed(lot) {
                store::set_lot_remaining(conn, &lot.lot_id, lot.remaining).await?;
            }
        }
        for e in &self.entries {
            store::insert_entry(conn, &wallet_id, e).await?;
        }
        save_holds_and_events(conn, &[&self]).await?;
        store::update_wallet(conn, &self.wallet).await?;
        Ok(())
    }

    /// Saves many accounts changed by a batch of sends (group commit) in the caller's
    /// transaction: the same rows as [`Account::save`] on each, but lots, entries and wallet
    /// headers written with one statement per chunk for the whole batch. Only what a send
    /// changes is written back to the headers (see [`store::update_wallet_balances`]).
    pub async fn save_many(
        conn: &mut AnyConnection,
        mut accounts: Vec<Account>,
    ) -> Result<(), WalletError> {
        for a in &mut accounts {
            a.check_before_save()?;
        }
        let mut lots = Vec::new();
        let mut entries = Vec::new();
        for a in &accounts {
            for (lot, granted) in &a.lots {
                if a.new_lots.contains(&lot.lot_id) {
                    store::insert_lot(conn, &a.wallet.wallet_id, lot, *granted).await?;
                } else if a.lot_changed(lot) {
                    lots.push((lot.lot_id.as_str(), lot.remaining));
                }
            }
            entries.extend(a.entries.iter().map(|e| (a.wallet.wallet_id.as_str(), e)));
        }
        store::set_lots_remaining(conn, &lots).await?;
        store::insert_entries(conn, &entries).await?;
        save_holds_and_events(conn, &accounts.iter().collect::<Vec<_>>()).await?;
        // Every header, changed or not: one statement either way, and a reminder re-armed
        // without an event is a change too.
        let headers: Vec<&WalletRecord> = accounts.iter().map(|a| &a.wallet).collect();
        store::update_wallet_balances(conn, &headers).await?;
        Ok(())
    }

    fn lot_changed(&self, lot: &Lot) -> bool {
        self.original_remaining
            .iter()
            .any(|(id, r)| *id == lot.lot_id && *r != lot.remaining)
    }

    /// Observes the reminder (C3) and checks the ledger invariant: the last step before saving.
    fn check_before_save(&mut self) -> Result<(), WalletError> {
        self.observe_reminder();
        let lot_sum: i64 = self.lots.iter().map(|(l, _)| l.remaining).sum();
        if self.wallet.balance != lot_sum - self.wallet.debt
            || self.wallet.held < 0
            || self.lots.iter().any(|(l, _)| l.remaining < 0)
        {
            return Err(DbError::Corrupt(format!(
                "wallet {} would break its invariant: balance {} vs lots {} - debt {}, held {}",
                self.wallet.wallet_id,
                self.wallet.balance,
                lot_sum,
                self.wallet.debt,
                self.wallet.held
            ))
            .into());
        }
        Ok(())
    }

    /// Hold `r` with this wallet's balances as they stand now: the answer of a send or a capture.
    pub fn hold_changed(&self, r: ReservationRecord) -> HoldChanged {
        HoldChanged {
            reservation: r,
            balance_after: self.wallet.balance,
            available_after: self.available(),
        }
    }

    /// Whether saving appends outbox events.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Whether anything will be written.
    pub fn has_changes(&self) -> bool {
        !self.entries.is_empty() || !self.reservations.is_empty() || !self.events.is_empty()
    }
}

/// Writes the holds and outbox events of `accounts`, one statement per kind of row and chunk:
/// each hold once, as its last change left it (inserted when it is new), the events in order.
async fn save_holds_and_events(
    conn: &mut AnyConnection,
    accounts: &[&Account],
) -> Result<(), WalletError> {
    let mut holds: Vec<(&ReservationRecord, bool, DateTime<Utc>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for a in accounts {
        for (r, new) in &a.reservations {
            match index.get(r.reservation_id.as_str()) {
                Some(&i) => holds[i] = (r, holds[i].1 || *new, holds[i].2),
                None => {
                    index.insert(&r.reservation_id, holds.len());
                    holds.push((r, *new, a.now));
                }
            }
        }
    }
    let (new, changed): (Vec<_>, Vec<_>) = holds.into_iter().partition(|(_, new, _)| *new);
    let new: Vec<_> = new.into_iter().map(|(r, _, at)| (r, at)).collect();
    let changed: Vec<_> = changed.into_iter().map(|(r, _, _)| r).collect();
    store::insert_reservations(conn, &new).await?;
    store::update_reservations(conn, &changed).await?;
    let events: Vec<(&str, &str, &Value, i64)> = accounts
        .iter()
        .flat_map(|a| {
            a.events.iter().map(|(event_type, payload)| {
                (
                    *event_type,
                    a.wallet.wallet_id.as_str(),
                    payload,
                    a.now.timestamp_micros(),
                )
            })
        })
        .collect();
    outbox::append_many(conn, &events).await?;
    Ok(())
}
