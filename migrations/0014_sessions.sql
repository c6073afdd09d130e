-- Login sessions of the web doors (contract §7/§8): a random token in a cookie, stored as its
-- sha256 only. Every use re-reads the session with its operator or holder, so a disabled
-- operator's session ends at once. Sessions of every campus share ledger 0 (a session is found
-- by its token alone); under Citus this small table is a reference table.
CREATE TABLE sessions (
    ledger         integer NOT NULL DEFAULT 0 CHECK (ledger = 0),
    token_hash     bytea   NOT NULL CHECK (length(token_hash) = 32),
    kind           text    NOT NULL CHECK (kind IN ('holder', 'operator')),
    subject_ledger integer NOT NULL,  -- the holder's ledger (0 for an operator)
    subject        text    NOT NULL,  -- holder id or username
    created_at     bigint  NOT NULL,
    last_seen_at   bigint  NOT NULL,
    PRIMARY KEY (ledger, token_hash)
);
CREATE INDEX sessions_subject ON sessions (ledger, kind, subject_ledger, subject);
