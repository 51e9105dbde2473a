DROP TABLE writer_offset;
DROP TABLE event_dedup;
DROP FUNCTION event_ensure_month(date, integer);
-- Drops every month and leaf with it.
DROP TABLE event;
DROP TABLE session;
