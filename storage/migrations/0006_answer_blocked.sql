-- A complete answer that a safety filter stopped (the provider blocked the question, or its answer partway):
-- the student saw its text so far and the safety note, and a reload shows the same, marked `blocked`. Such an
-- answer, and the question that led to it, stay out of the model's context for later questions.
-- Additive: replicas still running the previous build neither read nor write it.

ALTER TABLE messages ADD COLUMN blocked boolean NOT NULL DEFAULT false;

-- Answers blocked before this release: the complete answer of a question flagged for a safety block, made
-- before the flag (a flag is made only by a block; an answer regenerated after one stopped there is later).
UPDATE messages m SET blocked = true
FROM message_flags f
WHERE f.kind = 'safety_block' AND f.message_id IS NOT NULL AND m.reply_to = f.message_id
  AND m.tenant_id = f.tenant_id AND m.role = 'assistant' AND m.status = 'complete'
  AND m.created_at <= f.created_at;
