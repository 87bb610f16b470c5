//! Contact slots: admitted up to the limit, the rest pending; pending ones promoted when the
//! limit grows (S1, S11, S12).

/// S12: of `n` new contacts, how many become subscribed (up to `limit`) and how many wait as
/// pending upgrade. S11: nothing here changes the plan.
pub fn admit(limit: u64, active: u64, n: u64) -> (u64, u64) {
    let free = limit.saturating_sub(active);
    let subscribed = n.min(free);
    (subscribed, n - subscribed)
}

/// S12: pending contacts promoted after an upgrade, as many as the new limit allows.
pub fn promote(limit: u64, active: u64, pending: u64) -> u64 {
    pending.min(limit.saturating_sub(active))
}
