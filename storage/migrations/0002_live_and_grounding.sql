-- Teacher controls, flags, grounding passages, budgets and embedding origins.

ALTER TABLE conversations ADD COLUMN ai_paused boolean NOT NULL DEFAULT false;

-- Things teachers should look at: safety blocks, repeated failures.
CREATE TABLE message_flags (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       text NOT NULL,
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    message_id      bigint REFERENCES messages (id) ON DELETE CASCADE,
    kind            text NOT NULL,
    detail          text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX message_flags_tenant_time ON message_flags (tenant_id, created_at DESC);
CREATE INDEX message_flags_conversation ON message_flags (conversation_id);

-- Course documents are split into passages for ranked full-text search.
CREATE TABLE document_passages (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   text NOT NULL,
    course_id   text NOT NULL,
    document_id bigint NOT NULL REFERENCES course_documents (id) ON DELETE CASCADE,
    ordinal     integer NOT NULL,
    body        text NOT NULL,
    search      tsvector GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED
);
CREATE INDEX document_passages_search ON document_passages USING gin (search);
CREATE INDEX document_passages_course ON document_passages (tenant_id, course_id);

-- Which passages the tutor was given for an answer.
ALTER TABLE ai_usage ADD COLUMN passage_ids bigint[] NOT NULL DEFAULT '{}';

-- Per-tenant settings: budgets (NULL = the environment's default), embedding origins, retention.
ALTER TABLE tenants
    ADD COLUMN daily_token_budget      bigint,
    ADD COLUMN user_daily_token_budget bigint,
    ADD COLUMN allowed_origins         text[] NOT NULL DEFAULT '{}',
    ADD COLUMN retention_days          integer;
