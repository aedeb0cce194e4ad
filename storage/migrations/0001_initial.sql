-- Core schema: tenants, users, courses, conversations, messages and the AI usage audit.
-- Every row that belongs to a school carries tenant_id, and every query filters on it.

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    system_prompt text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    external_id  text NOT NULL,
    role         text NOT NULL CHECK (role IN ('student', 'teacher', 'admin')),
    display_name text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, external_id)
);

CREATE TABLE courses (
    tenant_id     text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id            text NOT NULL,
    title         text NOT NULL,
    description   text NOT NULL DEFAULT '',
    system_prompt text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE course_documents (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text NOT NULL,
    course_id  text NOT NULL,
    name       text NOT NULL,
    body       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, course_id) REFERENCES courses (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX course_documents_course ON course_documents (tenant_id, course_id);

CREATE TABLE conversations (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id  text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    course_id  text,
    title      text NOT NULL DEFAULT '',
    last_seq   bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, course_id) REFERENCES courses (tenant_id, id) ON DELETE CASCADE
);
-- "The user's most recent conversation in this course" and the conversation list.
CREATE INDEX conversations_user_recent ON conversations (tenant_id, user_id, course_id, updated_at DESC);
CREATE INDEX conversations_user_list ON conversations (tenant_id, user_id, updated_at DESC);

CREATE TABLE messages (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       text NOT NULL,
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role            text NOT NULL CHECK (role IN ('user', 'assistant', 'teacher')),
    text            text NOT NULL DEFAULT '',
    status          text NOT NULL CHECK (status IN ('streaming', 'complete', 'stopped', 'interrupted', 'failed')),
    client_id       text,
    reply_to        bigint REFERENCES messages (id) ON DELETE CASCADE,
    author_id       uuid REFERENCES users (id) ON DELETE SET NULL,
    seq             bigint NOT NULL DEFAULT 0,
    prompt_tokens   integer,
    output_tokens   integer,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (conversation_id, client_id)
);
-- The last ten turns and history pages: one index range scan, newest first.
CREATE INDEX messages_conversation_recent ON messages (conversation_id, id DESC);
CREATE INDEX messages_streaming ON messages (tenant_id, conversation_id) WHERE status = 'streaming';

CREATE TABLE ai_usage (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       text NOT NULL,
    user_id         uuid REFERENCES users (id) ON DELETE CASCADE,
    conversation_id uuid REFERENCES conversations (id) ON DELETE CASCADE,
    message_id      bigint REFERENCES messages (id) ON DELETE CASCADE,
    provider        text NOT NULL,
    model           text NOT NULL,
    prompt_tokens   integer NOT NULL DEFAULT 0,
    output_tokens   integer NOT NULL DEFAULT 0,
    ttft_ms         double precision,
    duration_ms     double precision NOT NULL DEFAULT 0,
    status          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ai_usage_tenant_time ON ai_usage (tenant_id, created_at);
CREATE INDEX ai_usage_message ON ai_usage (message_id);
