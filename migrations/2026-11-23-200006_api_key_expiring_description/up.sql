-- api_key.expiring is sent once per key and expire_time, DEVGATE_API_KEY_EXPIRING_NOTICE
-- (default 7 days) ahead (src/api_keys/expiring.rs); the catalog said "7 days and 1 day
-- ahead", which no code did. The description now says what is sent; the payload is unchanged.
UPDATE event_types
SET description = 'An API key expires soon: sent once per expiry, 7 days ahead by default (DEVGATE_API_KEY_EXPIRING_NOTICE; a key given a new expire_time gets a new notice); rotate or extend it.',
    schema = jsonb_set(schema, '{description}',
                       to_jsonb('An API key expires soon: sent once per expiry, 7 days ahead by default (DEVGATE_API_KEY_EXPIRING_NOTICE; a key given a new expire_time gets a new notice); rotate or extend it.'::text))
WHERE name = 'api_key.expiring';
