-- Payments whose outcome arrives later, and monthly credit grants of yearly plans.
--
-- subscriptions.payment_op: the last gateway payment a Subscribe or an immediate change made
-- (JSON: request, gateway key, amount, what it pays for, outcome). payment_since_us is set while
-- its outcome is unknown (the jobs reconcile it with the same gateway key) and NULL once applied.
-- allowance_month: the month (0-based, within cycle allowance_cycle) whose credits were granted
-- last (C7); allowance_next_us: when the next month of the same period is due (yearly plans).
-- invoices.gateway_key: the key of the charge that paid (or is settling) it;
-- returned_at_us: when a direct debit for it came back.
ALTER TABLE subscriptions ADD COLUMN payment_op TEXT;
ALTER TABLE subscriptions ADD COLUMN payment_since_us BIGINT;
ALTER TABLE subscriptions ADD COLUMN allowance_month BIGINT NOT NULL DEFAULT 0;
ALTER TABLE subscriptions ADD COLUMN allowance_next_us BIGINT;
CREATE INDEX subscriptions_payment_in_flight ON subscriptions (payment_since_us);
CREATE INDEX subscriptions_allowance_next ON subscriptions (allowance_next_us);

ALTER TABLE invoices ADD COLUMN gateway_key TEXT NOT NULL DEFAULT '';
ALTER TABLE invoices ADD COLUMN returned_at_us BIGINT;
CREATE INDEX invoices_by_gateway_key ON invoices (gateway_key);
