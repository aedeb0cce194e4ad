-- LTI 1.3: the platforms (LMS registrations) of each tenant, logins in flight, and the nonces they issued.

CREATE TABLE lti_platforms (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    issuer         text NOT NULL,
    client_id      text NOT NULL,
    -- NULL accepts every deployment of this client; otherwise launches must name this one.
    deployment_id  text CHECK (deployment_id <> ''),
    auth_login_url text NOT NULL CHECK (auth_login_url ~ '^https?://'),
    jwks_url       text NOT NULL CHECK (jwks_url ~ '^https?://'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (issuer, client_id)
);
CREATE INDEX lti_platforms_tenant ON lti_platforms (tenant_id);

-- Between /lti/login and /lti/launch: the state sent to the platform, taken (deleted) by the launch.
CREATE TABLE lti_login_states (
    state       text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    platform_id bigint NOT NULL REFERENCES lti_platforms (id) ON DELETE CASCADE,
    nonce       text NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX lti_login_states_expiry ON lti_login_states (tenant_id, expires_at);

-- Nonces issued at login and not used yet. A launch deletes its nonce, so a replayed id_token finds
-- nothing; rows past expires_at are refused and purged at the tenant's next login.
CREATE TABLE lti_nonces (
    nonce       text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    platform_id bigint NOT NULL REFERENCES lti_platforms (id) ON DELETE CASCADE,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX lti_nonces_expiry ON lti_nonces (tenant_id, expires_at);
