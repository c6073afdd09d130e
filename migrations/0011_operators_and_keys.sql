-- People and machines that may act: operators (console logins) and API keys (bearer tokens on
-- the JSON API), each with one role (contract §6). Both are small tables shared by every campus:
-- `ledger` is 0 ("the installation"), kept so every key includes it; under Citus they are
-- reference tables.

CREATE TABLE operators (
    ledger        integer NOT NULL DEFAULT 0 CHECK (ledger = 0),
    username      text    NOT NULL CHECK (username ~ '^[A-Za-z0-9._@-]{1,64}$'),
    role          text    NOT NULL CHECK (role IN ('admin', 'card_office', 'finance', 'auditor')),
    -- Argon2id (PHC string); the password itself is never stored
    password_hash text    NOT NULL,
    created_at    bigint  NOT NULL,  -- wall clock, ns
    disabled_at   bigint,            -- set once: a disabled operator stays disabled
    PRIMARY KEY (ledger, username)
);

CREATE TABLE api_keys (
    ledger              integer NOT NULL DEFAULT 0 CHECK (ledger = 0),
    name                text    NOT NULL CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$'),
    role                text    NOT NULL
        CHECK (role IN ('admin', 'card_office', 'finance', 'auditor', 'topup')),
    -- sha256 of the key: the key is 256 random bits, so a fast hash is as good as a slow one
    key_hash            bytea   NOT NULL CHECK (length(key_hash) = 32),
    -- a topup key's own clearing account (and its ledger); no other role has one
    clearing_ledger     integer,
    clearing_account_id bigint,
    created_at          bigint  NOT NULL,
    revoked_at          bigint,
    PRIMARY KEY (ledger, name),
    CHECK ((role = 'topup') = (clearing_account_id IS NOT NULL AND clearing_ledger IS NOT NULL))
);
CREATE UNIQUE INDEX api_keys_key_hash ON api_keys (ledger, key_hash);
