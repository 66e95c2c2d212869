-- A message no queue takes yet (the orchestrator's jobs while it has not bound its queue) is
-- set aside until `not_before` instead of failing its whole batch again and again: the events
-- and other messages behind it are published meanwhile.
ALTER TABLE outbox ADD COLUMN not_before timestamptz;
