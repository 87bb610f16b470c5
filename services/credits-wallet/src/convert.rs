//! Conversions between the wallet's records and its protobuf messages, by hand.

use prost::Message;
use proto::{common::v1::Money as PbMoney, wallet::v1 as pb};
use runtime::convert::{Reply, timestamp};
use rust_decimal::Decimal;
use shared::{Credits, Currency, Money, RatingRule, TierTable};

use crate::{
    domain::{AutoTopUp, AutoTopUpMode, Lot, LotKind},
    error::WalletError,
    model::{
        CreditQuote, EntryKind, EntryRecord, FundingMode, HoldChanged, LedgerPage, MailingCharged,
        MailingRated, PurchaseRecord, PurchaseStatus, PurchaseTrigger, ReservationStatus,
        SendAnswer, SendDone, Transferred, WalletChanged, WalletView,
    },
};

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Money as its message (rendered by [`Money::amount_text`], e.g. "0.00").
pub fn money(m: &Money) -> PbMoney {
    runtime::convert::money(m)
}

fn lot_kind(k: LotKind) -> pb::LotKind {
    match k {
        LotKind::Purchased => pb::LotKind::Purchased,
        LotKind::Signup => pb::LotKind::Signup,
        LotKind::Promotional => pb::LotKind::Promotional,
        LotKind::SubscriptionAllowance => pb::LotKind::SubscriptionAllowance,
        LotKind::Adjustment => pb::LotKind::Adjustment,
    }
}

/// The lot kinds a caller may grant.
pub fn grant_kind(k: i32) -> Result<LotKind, WalletError> {
    match pb::LotKind::try_from(k) {
        Ok(pb::LotKind::Signup) => Ok(LotKind::Signup),
        Ok(pb::LotKind::Promotional) => Ok(LotKind::Promotional),
        Ok(pb::LotKind::SubscriptionAllowance) => Ok(LotKind::SubscriptionAllowance),
        _ => Err(WalletError::invalid(
            "kind",
            "must be LOT_KIND_SIGNUP, LOT_KIND_PROMOTIONAL or LOT_KIND_SUBSCRIPTION_ALLOWANCE",
        )),
    }
}

fn lot(l: &Lot, granted: i64) -> pb::CreditLot {
    pb::CreditLot {
        lot_id: l.lot_id.clone(),
        kind: lot_kind(l.kind) as i32,
        granted: u(granted),
        remaining: u(l.remaining),
        expires_at: l.expires_at.map(timestamp),
        created_at: Some(timestamp(l.created_at)),
    }
}

fn funding(f: FundingMode) -> pb::FundingMode {
    match f {
        FundingMode::Prepaid => pb::FundingMode::Prepaid,
        FundingMode::OnDemand => pb::FundingMode::OnDemand,
    }
}

/// Parses a funding mode.
pub fn funding_from(v: i32) -> Result<FundingMode, WalletError> {
    match pb::FundingMode::try_from(v) {
        Ok(pb::FundingMode::Prepaid) => Ok(FundingMode::Prepaid),
        Ok(pb::FundingMode::OnDemand) => Ok(FundingMode::OnDemand),
        _ => Err(WalletError::invalid(
            "funding_mode",
            "must be FUNDING_MODE_PREPAID or FUNDING_MODE_ON_DEMAND",
        )),
    }
}

fn auto_top_up(t: &AutoTopUp) -> pb::AutoTopUp {
    let cap = u(t.monthly_cap.unwrap_or(0));
    match t.mode {
        AutoTopUpMode::Off => pb::AutoTopUp {
            mode: pb::AutoTopUpMode::Off as i32,
            monthly_cap: cap,
            ..Default::default()
        },
        AutoTopUpMode::Fixed { threshold, amount } => pb::AutoTopUp {
            mode: pb::AutoTopUpMode::Fixed as i32,
            threshold: u(threshold),
            amount: u(amount),
            monthly_cap: cap,
            ..Default::default()
        },
        AutoTopUpMode::Shortfall { max_per_purchase } => pb::AutoTopUp {
            mode: pb::AutoTopUpMode::Shortfall as i32,
            max_per_purchase: u(max_per_purchase),
            monthly_cap: cap,
            ..Default::default()
        },
    }
}

fn credits_field(field: &'static str, v: u64) -> Result<i64, WalletError> {
    i64::try_from(v)
        .ok()
        .filter(|v| *v <= crate::domain::MAX_CREDITS)
        .ok_or_else(|| WalletError::invalid(field, "is larger than the largest credit amount"))
}

/// Parses auto top-up settings (C4, C5, C6).
pub fn auto_top_up_from(t: Option<&pb::AutoTopUp>) -> Result<AutoTopUp, WalletError> {
    let t = t.ok_or_else(|| WalletError::invalid("auto_top_up", "is required"))?;
    let mode = match pb::AutoTopUpMode::try_from(t.mode) {
        Ok(pb::AutoTopUpMode::Off) => AutoTopUpMode::Off,
        Ok(pb::AutoTopUpMode::Fixed) => AutoTopUpMode::Fixed {
            threshold: credits_field("auto_top_up.threshold", t.threshold)?,
            amount: credits_field("auto_top_up.amount", t.amount)?,
        },
        Ok(pb::AutoTopUpMode::Shortfall) => AutoTopUpMode::Shortfall {
            max_per_purchase: credits_field("auto_top_up.max_per_purchase", t.max_per_purchase)?,
        },
        _ => {
            return Err(WalletError::invalid(
                "auto_top_up.mode",
                "must be AUTO_TOP_UP_MODE_OFF, _FIXED or _SHORTFALL",
            ));
        }
    };
    let cap = credits_field("auto_top_up.monthly_cap", t.monthly_cap)?;
    let cfg = AutoTopUp {
        mode,
        monthly_cap: (cap > 0).then_some(cap),
    };
    cfg.validate()
        .map_err(|e| WalletError::invalid("auto_top_up", e.to_string()))?;
    Ok(cfg)
}

/// The price list as its message.
pub fn pricing(t: &TierTable) -> pb::CreditPricing {
    runtime::convert::tier_table_message(t)
}

fn decimal(field: &'static str, s: &str) -> Result<Decimal, WalletError> {
    runtime::convert::decimal(field, s).map_err(|(f, m)| WalletError::invalid(f, m))
}

/// Parses and validates a price list (C1) in `currency`.
pub fn pricing_from(
    p: Option<&pb::CreditPricing>,
    currency: Currency,
) -> Result<TierTable, WalletError> {
    let p = p.ok_or_else(|| WalletError::invalid("pricing", "is required"))?;
    runtime::convert::tier_table(p, currency).map_err(|(f, m)| WalletError::invalid(f, m))
}

/// The rating rule as its message.
pub fn rating(r: &RatingRule) -> pb::RatingRule {
    pb::RatingRule {
        credits_per_recipient: r.credits_per_recipient().to_string(),
        per_mailing_surcharge: u(r.per_mailing_surcharge().get()),
    }
}

/// Parses a rating rule (C2).
pub fn rating_from(r: Option<&pb::RatingRule>) -> Result<RatingRule, WalletError> {
    let r = r.ok_or_else(|| WalletError::invalid("rating", "is required"))?;
    let cpr = decimal("rating.credits_per_recipient", &r.credits_per_recipient)?;
    let surcharge = credits_field("rating.per_mailing_surcharge", r.per_mailing_surcharge)?;
    let surcharge = Credits::new(surcharge)
        .map_err(|e| WalletError::invalid("rating.per_mailing_surcharge", e.to_string()))?;
    RatingRule::new(cpr, surcharge)
        .map_err(|e| WalletError::invalid("rating.credits_per_recipient", e.to_string()))
}

/// The wallet as its message.
pub fn wallet(v: &WalletView) -> pb::Wallet {
    let w = &v.wallet;
    pb::Wallet {
        wallet_id: w.wallet_id.clone(),
        currency: w.currency.code().to_string(),
        balance: w.balance,
        held: u(w.held),
        available: u(v.available),
        debt: u(w.debt),
        lots: v.lots.iter().map(|(l, g)| lot(l, *g)).collect(),
        funding_mode: funding(w.funding) as i32,
        payment_method: w.payment_method.clone(),
        auto_top_up: Some(auto_top_up(&w.top_up)),
        low_balance_threshold: u(w.reminder.threshold.unwrap_or(0)),
        rating: Some(rating(&w.rating)),
        pricing: Some(pricing(&w.pricing)),
        created_at: Some(timestamp(w.created_at)),
        auto_top_up_bought_this_month: u(v.auto_bought_this_month),
    }
}

impl Reply for WalletView {
    type Message = pb::Wallet;
    fn to_message(&self) -> pb::Wallet {
        wallet(self)
    }
}

impl Reply for WalletChanged {
    type Message = pb::WalletChange;
    fn to_message(&self) -> pb::WalletChange {
        pb::WalletChange {
            entry: Some(entry(&self.entry)),
            wallet: Some(wallet(&self.wallet)),
        }
    }
}

impl Reply for Transferred {
    type Message = pb::CreditTransfer;
    fn to_message(&self) -> pb::CreditTransfer {
        pb::CreditTransfer {
            credits: u(self.credits),
            from_wallet: Some(wallet(&self.from)),
            to_wallet: Some(wallet(&self.to)),
        }
    }
}

impl Reply for LedgerPage {
    type Message = pb::ListLedgerEntriesResponse;
    fn to_message(&self) -> pb::ListLedgerEntriesResponse {
        let next = self.entries.last().filter(|_| self.more);
        pb::ListLedgerEntriesResponse {
            next_page_token: next.map(|e| e.seq.to_string()).unwrap_or_default(),
            entries: self.entries.iter().map(entry).collect(),
        }
    }
}

impl Reply for CreditQuote {
    type Message = pb::CreditQuote;
    fn to_message(&self) -> pb::CreditQuote {
        pb::CreditQuote {
            credits: u(self.credits),
            amount: Some(money(&self.amount)),
            unit_price: self.unit_price.to_string(),
        }
    }
}

impl Reply for MailingRated {
    type Message = pb::MailingRating;
    fn to_message(&self) -> pb::MailingRating {
        pb::MailingRating {
            recipients: self.recipients,
            credits: u(self.credits),
            covered: self.covered,
            available: u(self.available),
        }
    }
}

impl Reply for PurchaseRecord {
    type Message = pb::Purchase;
    fn to_message(&self) -> pb::Purchase {
        purchase(self)
    }
}

impl Reply for HoldChanged {
    type Message = pb::Reservation;
    fn to_message(&self) -> pb::Reservation {
        hold(self)
    }
}

/// A ledger entry as its message.
pub fn entry(e: &EntryRecord) -> pb::LedgerEntry {
    let kind = match e.kind {
        EntryKind::Purchase => pb::LedgerEntryKind::Purchase,
        EntryKind::Grant => pb::LedgerEntryKind::Grant,
        EntryKind::Mailing => pb::LedgerEntryKind::Mailing,
        EntryKind::ReservationCapture => pb::LedgerEntryKind::ReservationCapture,
        EntryKind::Expiry => pb::LedgerEntryKind::Expiry,
        EntryKind::Adjustment => pb::LedgerEntryKind::Adjustment,
        EntryKind::Clawback => pb::LedgerEntryKind::Clawback,
        EntryKind::Transfer => pb::LedgerEntryKind::Transfer,
    };
    pb::LedgerEntry {
        sequence: u(e.seq),
        kind: kind as i32,
        delta: e.delta,
        balance_after: e.balance_after,
        reference: e.reference.clone(),
        description: e.description.clone(),
        created_at: Some(timestamp(e.created_at)),
    }
}

/// A purchase as its message.
pub fn purchase(p: &PurchaseRecord) -> pb::Purchase {
    let status = match p.status {
        PurchaseStatus::Processing => pb::PurchaseStatus::Processing,
        PurchaseStatus::PendingSettlement => pb::PurchaseStatus::PendingSettlement,
        PurchaseStatus::Succeeded => pb::PurchaseStatus::Succeeded,
        PurchaseStatus::Failed => pb::PurchaseStatus::Failed,
        PurchaseStatus::Returned => pb::PurchaseStatus::Returned,
    };
    let trigger = match p.trigger {
        PurchaseTrigger::Manual => pb::PurchaseTrigger::Manual,
        PurchaseTrigger::AutoFixed => pb::PurchaseTrigger::AutoFixed,
        PurchaseTrigger::AutoShortfall => pb::PurchaseTrigger::AutoShortfall,
        PurchaseTrigger::OnDemand => pb::PurchaseTrigger::OnDemand,
    };
    pb::Purchase {
        purchase_id: p.purchase_id.clone(),
        wallet_id: p.wallet_id.clone(),
        credits: u(p.credits),
        amount: Some(money(&p.amount)),
        status: status as i32,
        trigger: trigger as i32,
        failure_reason: p.failure_reason.clone(),
        payment_method: p.payment_method.clone(),
        lot_id: p.lot_id.clone().unwrap_or_default(),
        created_at: Some(timestamp(p.created_at)),
    }
}

/// A hold a send or a capture left, as its message.
pub fn hold(h: &HoldChanged) -> pb::Reservation {
    let r = &h.reservation;
    let status = match r.status {
        ReservationStatus::Active => pb::ReservationStatus::Active,
        ReservationStatus::Captured => pb::ReservationStatus::Captured,
        ReservationStatus::Released => pb::ReservationStatus::Released,
        ReservationStatus::Expired => pb::ReservationStatus::Expired,
    };
    pb::Reservation {
        reservation_id: r.reservation_id.clone(),
        wallet_id: r.wallet_id.clone(),
        mailing_id: r.mailing_id.clone(),
        credits: u(r.credits),
        status: status as i32,
        expires_at: Some(timestamp(r.expires_at)),
        captured_credits: u(r.captured_credits),
        balance_after: h.balance_after,
        available_after: u(h.available_after),
    }
}

/// A mailing charged, as its message.
pub fn mailing_charge(c: &MailingCharged) -> pb::MailingCharge {
    pb::MailingCharge {
        charge_id: c.charge_id.clone(),
        wallet_id: c.wallet_id.clone(),
        mailing_id: c.mailing_id.clone(),
        recipients: c.recipients,
        credits: u(c.credits),
        credits_bought: u(c.purchase.as_ref().map_or(0, |p| p.credits)),
        purchase: c.purchase.as_ref().map(purchase),
        balance_after: c.balance_after,
        available_after: u(c.available_after),
    }
}

/// What a send did, encoded: the answer recorded under its idempotency key.
pub fn send_done_bytes(d: &SendDone) -> Vec<u8> {
    match d {
        SendDone::Charged(c) => mailing_charge(c).encode_to_vec(),
        SendDone::Hold(h) => hold(h).encode_to_vec(),
    }
}

/// A send's answer encoded, as it is (or was) recorded under its key.
pub fn send_answer_bytes(a: SendAnswer) -> Vec<u8> {
    match a {
        SendAnswer::Done(d) => send_done_bytes(&d),
        SendAnswer::Replayed(bytes) => bytes,
    }
}

/// The answer of a ChargeMailing as its message.
pub fn mailing_charge_answer(a: SendAnswer) -> Result<pb::MailingCharge, WalletError> {
    match a {
        SendAnswer::Done(SendDone::Charged(c)) => Ok(mailing_charge(&c)),
        SendAnswer::Done(SendDone::Hold(_)) => Err(mismatch("a charge answered with a hold")),
        SendAnswer::Replayed(bytes) => decode(&bytes),
    }
}

/// The answer of a ReserveCredits or a CaptureReservation as its message.
pub fn reservation_answer(a: SendAnswer) -> Result<pb::Reservation, WalletError> {
    match a {
        SendAnswer::Done(SendDone::Hold(h)) => Ok(hold(&h)),
        SendAnswer::Done(SendDone::Charged(_)) => Err(mismatch("a hold answered with a charge")),
        SendAnswer::Replayed(bytes) => decode(&bytes),
    }
}

fn mismatch(what: &str) -> WalletError {
    runtime::db::DbError::Corrupt(what.into()).into()
}

fn decode<T: Message + Default>(bytes: &[u8]) -> Result<T, WalletError> {
    T::decode(bytes).map_err(|_| mismatch("stored send answer"))
}

/// A verification report as its message.
pub fn verify_report(r: &crate::verify::Report) -> pb::VerifyLedgerResponse {
    pb::VerifyLedgerResponse {
        wallets_checked: r.wallets_checked,
        entries_checked: r.entries_checked,
        purchases_checked: r.purchases_checked,
        outbox_events_checked: r.outbox_events_checked,
        outbox_undelivered: r.outbox_undelivered,
        violations: r
            .violations
            .iter()
            .map(|v| pb::LedgerViolation {
                wallet_id: v.wallet_id.clone(),
                check: v.check.as_str().to_string(),
                detail: v.detail.clone(),
            })
            .collect(),
        violations_total: r.violations_total,
    }
}
