-- Sessions of the web pages (/self for holders, /console for operators), kept server-side.
-- The cookie carries a random id; only its SHA-256 is stored, so a copy of this table opens
-- no session. The times come from the application's clock (tests move it).
CREATE TABLE web_sessions (
    id_hash    bytea PRIMARY KEY CHECK (length(id_hash) = 32),
    kind       text NOT NULL CHECK (kind IN ('self', 'console')),
    subject    text NOT NULL,                  -- holder id (self) or operator (console)
    csrf       bytea NOT NULL CHECK (length(csrf) = 32),  -- every form of the session carries it
    created_at timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL
);
-- Expired sessions are deleted by age; a subject's sessions are ended together (a password
-- changed, an operator disabled).
CREATE INDEX web_sessions_last_seen ON web_sessions (last_seen);
CREATE INDEX web_sessions_subject ON web_sessions (kind, subject);

-- Server-side keys of the web pages, made once by the first server that needs one and shared
-- by every server process: 'csrf' signs the form token of pages shown before a login.
CREATE TABLE web_keys (
    name       text PRIMARY KEY,
    key        bytea NOT NULL CHECK (length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
