ALTER TABLE outbox DROP COLUMN not_before;
