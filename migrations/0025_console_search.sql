-- The console's holder search (contract §8: by holder id, name or card number, on 100,000
-- holders). A clerk types the start of an id, a name or a card number: each is a prefix range
-- over a byte-ordered ("C" collation) index, so the search is an index range scan whatever
-- the database's collation, and also as a prepared statement's generic plan (a LIKE with a
-- parameter cannot use an index there). Plain btree, no extension: pg_trgm (infix search)
-- is a contrib module that not every PostgreSQL the engine runs on has installed.
CREATE INDEX holders_search_id ON holders ((id COLLATE "C"));
CREATE INDEX holders_search_name ON holders ((lower(name) COLLATE "C"));
CREATE INDEX cards_search_no ON cards ((card_no COLLATE "C"));
