UPDATE event_types
SET description = 'An API key expires soon (sent 7 days and 1 day ahead); rotate or extend it.',
    schema = jsonb_set(schema, '{description}',
                       to_jsonb('An API key expires soon (sent 7 days and 1 day ahead); rotate or extend it.'::text))
WHERE name = 'api_key.expiring';
