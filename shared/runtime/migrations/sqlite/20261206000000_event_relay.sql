-- Events out (issue 19): the relay's state per sink (a webhook endpoint, the NATS publisher),
-- owned by each service alongside its outbox (see shared/runtime/src/relay.rs).

-- One row per sink. `acked_cursor`: every event up to it is delivered (acknowledged),
-- filtered out, or dead-lettered; the relay reads from there. The lease (owner and expiry,
-- microseconds of the wall clock) lets one replica at a time deliver the sink; every write of a
-- delivering relay is fenced on still holding it. `attempts`, `first_failed_at_us`,
-- `next_attempt_at_us` and `last_error` describe the failing head event, if any.
CREATE TABLE relay_sinks (
    sink TEXT PRIMARY KEY,
    acked_cursor BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until_us BIGINT NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_failed_at_us BIGINT,
    next_attempt_at_us BIGINT NOT NULL DEFAULT 0,
    last_error TEXT
);

-- Events a sink gave up on after its retry budget: `dead` until an operator asks for another
-- attempt (`RetryDeadLetter` sets `retrying`), then `delivered` or `dead` again.
CREATE TABLE relay_dead_letters (
    sink TEXT NOT NULL,
    event_cursor BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    dead_at_us BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('dead', 'retrying', 'delivered')),
    PRIMARY KEY (sink, event_cursor)
);
