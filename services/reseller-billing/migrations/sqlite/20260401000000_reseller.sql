-- reseller-billing: partners, their customers, routed sends and holds, the wallet-event relay.
-- Credits live in the credits-wallet service; these tables hold who pays and what was used.

CREATE TABLE partners (
    partner_id TEXT PRIMARY KEY,
    currency TEXT NOT NULL,
    funding TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    wallet_id TEXT NOT NULL,
    -- The partner's price list and rating rule as hex-encoded protobuf, handed to the wallet
    -- service when a customer's own wallet is opened.
    pricing TEXT NOT NULL,
    rating TEXT NOT NULL,
    -- The partner's resale price list (shared::TierTable JSON); '' until set.
    resale_prices TEXT NOT NULL,
    created_at_us BIGINT NOT NULL
);

CREATE TABLE customers (
    customer_id TEXT PRIMARY KEY,
    partner_id TEXT NOT NULL REFERENCES partners (partner_id),
    billing_mode TEXT NOT NULL,
    suspended BIGINT NOT NULL,
    monthly_limit BIGINT NOT NULL,
    wallet_id TEXT NOT NULL,
    created_at_us BIGINT NOT NULL
);
CREATE INDEX customers_by_partner ON customers (partner_id, customer_id);

-- One row per routed send (ChargeMailing) or hold (ReserveMailing), keyed by the caller's
-- idempotency key: the routing is decided once and kept, so a retry after a crash goes to the
-- same wallet with the same wallet key. Status: pending (sent to the wallet), done, failed.
CREATE TABLE routed (
    idempotency_key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    partner_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    payer TEXT NOT NULL,
    payer_wallet_id TEXT NOT NULL,
    mailing_id TEXT NOT NULL,
    recipients BIGINT NOT NULL,
    -- Rated credits (a hold: what it holds; after capture: what was captured).
    credits BIGINT NOT NULL,
    status TEXT NOT NULL,
    -- For holds: the wallet's reservation id and where it stands.
    reservation_id TEXT,
    reservation_status TEXT,
    created_at_us BIGINT NOT NULL
);
CREATE INDEX routed_usage ON routed (customer_id, created_at_us);
CREATE INDEX routed_by_partner_month ON routed (partner_id, created_at_us);
CREATE UNIQUE INDEX routed_reservation ON routed (reservation_id);

-- Where the relay of the partner wallets' events stands in the wallet's event stream.
CREATE TABLE wallet_relay (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    wallet_cursor BIGINT NOT NULL
);
INSERT INTO wallet_relay (id, wallet_cursor) VALUES (1, 0);
