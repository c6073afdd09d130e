-- The web doors keep their sessions in web_sessions (0015, engine/web/sessions.py); the
-- table of 0014 was a second store for the same thing, never used by a door. One store only.
DROP TABLE IF EXISTS sessions;
