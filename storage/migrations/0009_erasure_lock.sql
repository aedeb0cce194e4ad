-- delete-user and the user upsert of a `hello` or a conversation request take one lock per person, so that
-- a token issued before an erasure cannot recreate the account while the deletion's transaction is open.
-- Additive: replicas still running the previous build do not take it (their upsert has that race still).

-- The lock's key: a two-key advisory lock, whose first half (0x5EDC0002) names this use and whose second is
-- taken from the person's subject hash (storage/postgres.py, subject_hash).
CREATE FUNCTION lock_person(subject bytea) RETURNS void LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(1591476226, ('x' || encode(substr(subject, 1, 4), 'hex'))::bit(32)::integer)
$$;

-- Whether a token issued at `issued_at` (NULL: it does not say) may create or refresh the person's account:
-- no erasure recorded since. Called inside the upsert's statement: it waits for a deletion of the person in
-- progress, and (PL/pgSQL, volatile) reads erased_users in a snapshot taken after that wait, which sees
-- the deletion's record; the statement's own snapshot, taken before, does not.
CREATE FUNCTION may_sign_in(tenant text, subject bytea, issued_at timestamptz) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM lock_person(may_sign_in.subject);
    RETURN NOT EXISTS (
        SELECT 1 FROM erased_users e
        WHERE e.tenant_id = may_sign_in.tenant AND e.subject = may_sign_in.subject AND e.expires_at > now()
        AND (may_sign_in.issued_at IS NULL OR may_sign_in.issued_at <= e.deleted_at)
    );
END
$$;
