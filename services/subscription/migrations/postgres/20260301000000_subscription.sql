-- subscription: plans, accounts, subscriptions with their history, invoices (numbered without
-- gaps through one counter row), change requests.
-- Money is BIGINT minor units plus a currency code; rates are decimal text; instants are BIGINT
-- microseconds since the epoch (UTC); flags are BIGINT 0/1. A plan is stored as its validated
-- JSON document (tier tables and prices as decimal strings), with the columns queries need.

CREATE TABLE plans (
    plan_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    product TEXT NOT NULL,
    level_rank BIGINT NOT NULL,
    document TEXT NOT NULL,
    published_at_us BIGINT NOT NULL,
    PRIMARY KEY (plan_id, version)
);

CREATE TABLE accounts (
    account_id TEXT PRIMARY KEY,
    verified BIGINT NOT NULL,
    verified_at_us BIGINT,
    verified_by TEXT NOT NULL
);

CREATE TABLE subscriptions (
    subscription_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL UNIQUE,
    plan_id TEXT NOT NULL,
    plan_version BIGINT NOT NULL,
    status TEXT NOT NULL,
    contacts BIGINT NOT NULL,
    seats BIGINT NOT NULL,
    add_ons TEXT NOT NULL,
    payment_kind TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    vat_rate TEXT NOT NULL,
    anchor_us BIGINT NOT NULL,
    period_index BIGINT NOT NULL,
    cycle BIGINT NOT NULL,
    period_start_us BIGINT NOT NULL,
    period_end_us BIGINT NOT NULL,
    trial_ends_at_us BIGINT,
    trial_days BIGINT NOT NULL,
    trial_contact_cap BIGINT NOT NULL,
    trial_free_mails BIGINT NOT NULL,
    trial_mails_sent BIGINT NOT NULL,
    trial_ending_notified BIGINT NOT NULL,
    cancel_at_period_end BIGINT NOT NULL,
    scheduled TEXT NOT NULL,
    active_contacts BIGINT NOT NULL CHECK (active_contacts >= 0),
    pending_contacts BIGINT NOT NULL CHECK (pending_contacts >= 0),
    revision BIGINT NOT NULL,
    pending_op TEXT,
    origin_key TEXT,
    allowance_cycle BIGINT NOT NULL,
    history_seq BIGINT NOT NULL,
    created_at_us BIGINT NOT NULL
);
CREATE INDEX subscriptions_due ON subscriptions (period_end_us);

CREATE TABLE subscription_history (
    subscription_id TEXT NOT NULL REFERENCES subscriptions (subscription_id),
    seq BIGINT NOT NULL,
    at_us BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (subscription_id, seq)
);

-- One row: the next invoice number. Locked in the invoice's transaction, so numbers are
-- consecutive without gaps even under concurrency.
CREATE TABLE invoice_counter (
    id BIGINT PRIMARY KEY,
    next_number BIGINT NOT NULL
);
INSERT INTO invoice_counter (id, next_number) VALUES (1, 1);

CREATE TABLE invoices (
    invoice_id TEXT PRIMARY KEY,
    number BIGINT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    -- The subscription cycle a renewal or conversion invoice bills: at most one per cycle.
    cycle BIGINT,
    currency TEXT NOT NULL,
    lines TEXT NOT NULL,
    subtotal_minor BIGINT NOT NULL,
    vat_rate TEXT NOT NULL,
    vat_minor BIGINT NOT NULL,
    total_minor BIGINT NOT NULL,
    status TEXT NOT NULL,
    payment_kind TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    payment_attempts BIGINT NOT NULL,
    next_attempt_at_us BIGINT,
    issued_at_us BIGINT NOT NULL,
    paid_at_us BIGINT,
    UNIQUE (subscription_id, kind, cycle)
);
CREATE INDEX invoices_by_account ON invoices (account_id, number);
CREATE INDEX invoices_collect ON invoices (status, next_attempt_at_us);

CREATE TABLE change_requests (
    request_id TEXT PRIMARY KEY,
    subscription_id TEXT NOT NULL REFERENCES subscriptions (subscription_id),
    account_id TEXT NOT NULL,
    change TEXT NOT NULL,
    status TEXT NOT NULL,
    filed_by TEXT NOT NULL,
    filed_at_us BIGINT NOT NULL,
    resolved_by TEXT NOT NULL,
    resolved_at_us BIGINT,
    note TEXT NOT NULL
);
CREATE INDEX change_requests_by_account ON change_requests (account_id, filed_at_us);
