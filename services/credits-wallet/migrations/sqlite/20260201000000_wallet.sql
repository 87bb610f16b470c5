-- credits-wallet: wallets, their credit lots, the ledger, purchases and holds.
-- Credits are whole BIGINT numbers; money is BIGINT minor units plus a currency code; rates and
-- price lists are decimal text; instants are BIGINT microseconds since the epoch (UTC).

CREATE TABLE wallets (
    wallet_id TEXT PRIMARY KEY,
    currency TEXT NOT NULL,
    -- Sum of ledger_entries.delta = sum of credit_lots.remaining - debt (asserted on every change).
    balance BIGINT NOT NULL,
    held BIGINT NOT NULL CHECK (held >= 0),
    debt BIGINT NOT NULL CHECK (debt >= 0),
    ledger_seq BIGINT NOT NULL,
    funding_mode TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    credits_per_recipient TEXT NOT NULL,
    per_mailing_surcharge BIGINT NOT NULL,
    pricing TEXT NOT NULL,
    top_up_mode TEXT NOT NULL,
    top_up_threshold BIGINT NOT NULL,
    top_up_amount BIGINT NOT NULL,
    top_up_max_per_purchase BIGINT NOT NULL,
    top_up_monthly_cap BIGINT NOT NULL,
    reminder_threshold BIGINT NOT NULL,
    reminder_armed BIGINT NOT NULL,
    created_at_us BIGINT NOT NULL
);

CREATE TABLE credit_lots (
    lot_id TEXT PRIMARY KEY,
    wallet_id TEXT NOT NULL REFERENCES wallets (wallet_id),
    kind TEXT NOT NULL,
    granted BIGINT NOT NULL CHECK (granted >= 0),
    remaining BIGINT NOT NULL CHECK (remaining >= 0),
    expires_at_us BIGINT,
    created_at_us BIGINT NOT NULL
);
CREATE INDEX credit_lots_live ON credit_lots (wallet_id) WHERE remaining > 0;
CREATE INDEX credit_lots_expiring ON credit_lots (expires_at_us) WHERE remaining > 0 AND expires_at_us IS NOT NULL;

CREATE TABLE ledger_entries (
    wallet_id TEXT NOT NULL REFERENCES wallets (wallet_id),
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    delta BIGINT NOT NULL,
    balance_after BIGINT NOT NULL,
    reference TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (wallet_id, seq)
);

CREATE TABLE purchases (
    purchase_id TEXT PRIMARY KEY,
    wallet_id TEXT NOT NULL REFERENCES wallets (wallet_id),
    -- The request that caused it (idempotency key of PurchaseCredits or ChargeMailing), so a
    -- retry resumes this purchase instead of starting another.
    origin_key TEXT UNIQUE,
    trigger TEXT NOT NULL,
    credits BIGINT NOT NULL CHECK (credits > 0),
    amount_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    status TEXT NOT NULL,
    failure_reason TEXT NOT NULL,
    lot_id TEXT,
    expires_at_us BIGINT,
    created_at_us BIGINT NOT NULL,
    updated_at_us BIGINT NOT NULL
);
CREATE INDEX purchases_open ON purchases (status) WHERE status IN ('processing', 'pending_settlement');
CREATE INDEX purchases_auto_by_month ON purchases (wallet_id, created_at_us);

CREATE TABLE reservations (
    reservation_id TEXT PRIMARY KEY,
    wallet_id TEXT NOT NULL REFERENCES wallets (wallet_id),
    mailing_id TEXT NOT NULL,
    credits BIGINT NOT NULL CHECK (credits > 0),
    status TEXT NOT NULL,
    expires_at_us BIGINT NOT NULL,
    captured_credits BIGINT NOT NULL,
    created_at_us BIGINT NOT NULL
);
CREATE INDEX reservations_active ON reservations (expires_at_us) WHERE status = 'active';
CREATE INDEX reservations_by_wallet ON reservations (wallet_id) WHERE status = 'active';
