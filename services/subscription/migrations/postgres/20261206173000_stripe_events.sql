-- Stripe webhook events this service has applied (issue 17). An event's id is recorded in the
-- transaction that applies it, so a repeated delivery finds it here and changes nothing.
CREATE TABLE stripe_events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    received_at_us BIGINT NOT NULL
);
