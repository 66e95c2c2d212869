DROP TABLE generations;
DELETE FROM outbox WHERE event_id IS NULL;
ALTER TABLE outbox
    DROP CONSTRAINT outbox_message_addressed,
    DROP CONSTRAINT outbox_event_or_message,
    DROP COLUMN message_id,
    DROP COLUMN message_type,
    DROP COLUMN content_type,
    DROP COLUMN body,
    DROP COLUMN routing_key,
    DROP COLUMN exchange,
    ALTER COLUMN event_id SET NOT NULL;
