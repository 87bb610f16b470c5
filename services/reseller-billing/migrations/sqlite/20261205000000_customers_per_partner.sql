-- Customer ids are each partner's own (issue 16): a customer is (partner_id, customer_id), so
-- two partners may both have a customer `shop` and neither learns of the other's. Its row's key
-- is `<partner_id>:<customer_id>` (ids hold no ':'), by which a transaction that locks several
-- customers locks them in one order. Customers added before keep their rows and wallets.
-- SQLite cannot change a primary key in place: the table is rebuilt.

CREATE TABLE customers_per_partner (
    customer_key TEXT PRIMARY KEY,
    partner_id TEXT NOT NULL REFERENCES partners (partner_id),
    customer_id TEXT NOT NULL,
    billing_mode TEXT NOT NULL,
    suspended BIGINT NOT NULL,
    monthly_limit BIGINT NOT NULL,
    wallet_id TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    UNIQUE (partner_id, customer_id)
);
INSERT INTO customers_per_partner
    (customer_key, partner_id, customer_id, billing_mode, suspended, monthly_limit, wallet_id,
     created_at_us)
SELECT partner_id || ':' || customer_id, partner_id, customer_id, billing_mode, suspended,
       monthly_limit, wallet_id, created_at_us
FROM customers;
DROP TABLE customers;
ALTER TABLE customers_per_partner RENAME TO customers;

-- A customer's month of partner credits is looked up by partner and customer.
DROP INDEX routed_usage;
CREATE INDEX routed_usage ON routed (customer_id, partner_id, created_at_us);

-- Idempotency keys are each partner's own too: a request's key is stored as
-- `<partner_id>:<key>`. Routed sends and holds know their partner, so their keys (and the
-- answers stored under them) move into their partner's space, and a retry across this upgrade
-- still gets its first answer. (Keys too long for that, beyond 237 characters with the partner
-- id, and other operations' keys, stay as they were until swept; a retry of such a request
-- still gets its first answer: the service also looks under the bare key, and replays what it
-- finds there only for the very same request.)
UPDATE idempotency_keys
SET idempotency_key = (
    SELECT r.partner_id || ':' || r.idempotency_key FROM routed r
    WHERE r.idempotency_key = idempotency_keys.idempotency_key
)
WHERE idempotency_key IN (
    SELECT idempotency_key FROM routed
    WHERE length(partner_id) + length(idempotency_key) <= 237
);
-- A send still pending at this upgrade was (or may have been) asked of the wallet under
-- `rs:<key>:send`; its retry asks under that same key, never a new one, so it cannot be debited
-- twice. Later sends leave this empty: their wallet key derives from their scoped key.
ALTER TABLE routed ADD COLUMN former_wallet_key TEXT;
UPDATE routed SET former_wallet_key = 'rs:' || idempotency_key || ':send'
WHERE status = 'pending' AND length(partner_id) + length(idempotency_key) <= 237;
UPDATE routed SET idempotency_key = partner_id || ':' || idempotency_key
WHERE length(partner_id) + length(idempotency_key) <= 237;
