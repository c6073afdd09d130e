-- Card numbers and terminal ids are unique across ledgers (contract §2): a card is found by its
-- number alone at the card office, a terminal by field 41 alone at the gateway. That used to be
-- kept by an advisory lock around a read of every ledger, which holds only while every writer
-- takes its locks on the same server. A table keyed by the value itself makes it a unique
-- index, the same guarantee on one PostgreSQL and on a Citus cluster, where these two small
-- tables are reference tables (a copy on every node, the index checked on each; `ledger` is
-- a plain column here, not a distribution key). They also name the ledger a card or terminal
-- belongs to, so a lookup by the value alone reads one ledger, never all of them.
-- A value is claimed in the transaction that creates its card or terminal (engine/campus/
-- unique.py); the rows are never deleted, like the cards and terminals themselves.

CREATE TABLE card_numbers (
    card_no text    PRIMARY KEY,
    ledger  integer NOT NULL
);
-- Fails, rather than choosing, should a number already be in two ledgers.
INSERT INTO card_numbers (card_no, ledger) SELECT card_no, ledger FROM cards;

CREATE TABLE terminal_ids (
    terminal_id text    PRIMARY KEY,
    ledger      integer NOT NULL
);
INSERT INTO terminal_ids (terminal_id, ledger) SELECT terminal_id, ledger FROM terminals;
