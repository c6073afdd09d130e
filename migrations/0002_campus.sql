-- The campus layer: holders, cards, terminals, rooms and the reversal memory.
-- Every table carries `ledger` and every key includes it (Citus: distribute by ledger).
-- Purses, subsidy purses and room purses are ordinary ledger accounts; these tables only map
-- campus identities onto them. Daily spending is not stored: it is summed from the ledger's
-- own transfers, so it can never drift from the money that actually moved.

CREATE TABLE holders (
    ledger             integer NOT NULL,
    id                 text    NOT NULL CHECK (length(id) BETWEEN 1 AND 64),
    name               text    NOT NULL,
    kind               text    NOT NULL CHECK (kind IN ('student', 'staff')),
    purse_account_id   bigint  NOT NULL,
    subsidy_account_id bigint  NOT NULL,
    created_at         bigint  NOT NULL,  -- wall clock, ns
    PRIMARY KEY (ledger, id),
    FOREIGN KEY (purse_account_id, ledger) REFERENCES accounts (id, ledger),
    FOREIGN KEY (subsidy_account_id, ledger) REFERENCES accounts (id, ledger)
);

CREATE TABLE cards (
    ledger        integer NOT NULL,
    card_no       text    NOT NULL CHECK (card_no ~ '^[0-9]{8,19}$'),
    holder_id     text    NOT NULL,
    status        text    NOT NULL CHECK (status IN ('active', 'lost', 'replaced', 'closed')),
    daily_limit   bigint  CHECK (daily_limit >= 0),
    -- The PIN is needed in clear: the terminal proves it with an HMAC under its own key.
    pin           text    CHECK (pin ~ '^[0-9]{4,6}$'),
    pin_threshold bigint  CHECK (pin_threshold >= 0),
    replaced_by   text,
    created_at    bigint  NOT NULL,
    updated_at    bigint  NOT NULL,
    PRIMARY KEY (ledger, card_no),
    FOREIGN KEY (ledger, holder_id) REFERENCES holders (ledger, id)
);
-- One holder has at most one active card (contract §2).
CREATE UNIQUE INDEX cards_one_active ON cards (ledger, holder_id) WHERE status = 'active';
CREATE INDEX cards_holder ON cards (ledger, holder_id);
-- Card numbers are unique across ledgers (enforced under an advisory lock, since a unique
-- index without `ledger` cannot be distributed); admin paths look a card up by number alone.
CREATE INDEX cards_card_no ON cards (card_no);

CREATE TABLE terminals (
    ledger      integer NOT NULL,
    terminal_id text    NOT NULL CHECK (length(terminal_id) = 8),
    merchant_id text    NOT NULL CHECK (length(merchant_id) = 15),
    kind        text    NOT NULL CHECK (kind IN ('pos', 'water', 'kiosk', 'meter')),
    account_id  bigint  NOT NULL,
    mac_key     bytea   NOT NULL CHECK (length(mac_key) = 32),
    created_at  bigint  NOT NULL,
    PRIMARY KEY (ledger, terminal_id),
    FOREIGN KEY (account_id, ledger) REFERENCES accounts (id, ledger)
);
-- Terminal ids are unique across ledgers (advisory lock, as for cards): a frame names only
-- field 41, so the gateway finds the terminal, and with it the ledger, by id alone.
CREATE INDEX terminals_terminal_id ON terminals (terminal_id);

CREATE TABLE rooms (
    ledger     integer NOT NULL,
    room_id    text    NOT NULL CHECK (length(room_id) BETWEEN 1 AND 28),
    account_id bigint  NOT NULL,
    created_at bigint  NOT NULL,
    PRIMARY KEY (ledger, room_id),
    FOREIGN KEY (account_id, ledger) REFERENCES accounts (id, ledger)
);

-- The reversal memory: every reversal a terminal sent, by the key of the operation it
-- reverses. An original that arrives after its reversal finds its row here and moves no money.
CREATE TABLE reversals (
    ledger       integer NOT NULL,
    original_key uuid    NOT NULL,
    key          uuid    NOT NULL,
    terminal_id  text    NOT NULL,
    created_at   bigint  NOT NULL,
    PRIMARY KEY (ledger, original_key)
);
