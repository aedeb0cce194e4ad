-- Erased users and logged-out cookie sessions, kept in PostgreSQL so that losing Redis forgets neither.
-- Additive: replicas still running the previous build neither read nor write them.

-- One row per `smartedu delete-user`: the minimum needed to refuse the tokens issued before the erasure,
-- for as long as one of them can still be valid (SMARTEDU_MAX_TOKEN_LIFETIME_S). The person's external
-- id is not kept: `subject` is SHA-256 of the tenant id, a NUL and the external id (storage/postgres.py,
-- subject_hash), which a token's claims can be checked against.
CREATE TABLE erased_users (
    tenant_id  text NOT NULL,
    subject    bytea NOT NULL,
    deleted_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, subject)
);
CREATE INDEX erased_users_expiry ON erased_users (tenant_id, expires_at);

-- A cookie session logged out, until it would have expired (its id is random: it names no one).
CREATE TABLE revoked_sessions (
    tenant_id  text NOT NULL,
    session_id text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, session_id)
);
CREATE INDEX revoked_sessions_expiry ON revoked_sessions (expires_at);
