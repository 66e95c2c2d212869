-- generation.completed v2: an asset's `size_bytes` is no longer required. The orchestrator's
-- GenerationUpdate names each asset and its URL but not its size (the Asset service has it),
-- and the results consumer emits the event in the update's own transaction, without a call to
-- another service; an event must not claim a size nobody measured. The kind and MIME type
-- follow from the generation's kind and output format.
UPDATE event_types
SET schema = jsonb_set(schema, '{properties,assets,items,required}',
                       '["asset_id", "kind", "mime_type", "url"]'::jsonb),
    version = version + 1
WHERE name = 'generation.completed';
