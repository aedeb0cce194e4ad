-- How an answer ended, beyond its status, so a reload shows what the live frames said: a complete answer cut
-- short by the output limit, and why a failed one failed (the error code the student was sent) and whether
-- asking again can help. Additive: replicas still running the previous build neither read nor write them
-- (NULL on their failed answers: unknown, shown as before).

ALTER TABLE messages
    ADD COLUMN truncated  boolean NOT NULL DEFAULT false,
    ADD COLUMN error_code text,
    ADD COLUMN retryable  boolean;
