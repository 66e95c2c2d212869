UPDATE event_types
SET schema = jsonb_set(schema, '{properties,assets,items,required}',
                       '["asset_id", "kind", "mime_type", "size_bytes", "url"]'::jsonb),
    version = version - 1
WHERE name = 'generation.completed';
