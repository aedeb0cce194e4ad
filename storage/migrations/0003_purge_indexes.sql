-- Indexes for deletes: without them every deleted message makes PostgreSQL scan messages for reply_to
-- (measured: 2,000 messages purged in 1.8 s without, 34 ms with).
CREATE INDEX messages_reply_to ON messages (reply_to) WHERE reply_to IS NOT NULL;
CREATE INDEX ai_usage_conversation ON ai_usage (conversation_id);
CREATE INDEX message_flags_message ON message_flags (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX conversations_tenant_updated ON conversations (tenant_id, updated_at);
