-- Monthly credits waiting for the account's wallet, and the key preview tokens are signed with.
--
-- subscriptions.allowance_wait_us: the month's credits (C7) found no wallet for the account
-- (wallet id = account id): nothing is recorded as granted, and the jobs ask the wallet again
-- from this time on (NULL: not waiting).
-- preview_token_key: one row, the HMAC-SHA256 key of PreviewChange's tokens, generated here so
-- that every replica and every restart verifies the tokens the others issued.
ALTER TABLE subscriptions ADD COLUMN allowance_wait_us BIGINT;

CREATE TABLE preview_token_key (
    id BIGINT PRIMARY KEY,
    secret TEXT NOT NULL
);
INSERT INTO preview_token_key (id, secret) VALUES (1, replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));
