-- Revision 0005: what is wrong with a payload, judged by the catalog's spec of its
-- event type (ledger_event_types.fields); NULL when nothing is.
--
-- Every field of the spec must be present and no other; each has its JSON type and
-- its bounds. Numbers anywhere in a payload are integers: there are no floats in the
-- ledger, and the verifier reproduces an event's hash from integers exactly.
CREATE FUNCTION ledger_payload_problem(p_fields jsonb, p_payload jsonb) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r        record;
    v_value  jsonb;
    v_type   text;
    v_text   text;
    v_number numeric;
BEGIN
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RETURN 'the payload must be a JSON object';
    END IF;
    IF pg_column_size(p_payload) > 65536 THEN
        RETURN 'the payload is larger than 64 KiB';
    END IF;
    SELECT k INTO v_text FROM jsonb_object_keys(p_payload) AS k WHERE NOT p_fields ? k LIMIT 1;
    IF v_text IS NOT NULL THEN
        RETURN format('unknown field %s', v_text);
    END IF;
    SELECT n::text INTO v_text
      FROM jsonb_path_query(p_payload, 'strict $.** ? (@.type() == "number")') AS n
     WHERE n::text !~ '^-?[0-9]+$'
     LIMIT 1;
    IF v_text IS NOT NULL THEN
        RETURN format('%s is not an integer: a payload holds no fractional numbers', v_text);
    END IF;

    FOR r IN SELECT f.key, f.value AS spec FROM jsonb_each(p_fields) AS f LOOP
        IF NOT p_payload ? r.key THEN
            RETURN format('field %s is missing', r.key);
        END IF;
        v_value := p_payload -> r.key;
        v_type := jsonb_typeof(v_value);
        IF v_type = 'null' THEN
            IF (r.spec->>'nullable')::boolean THEN
                CONTINUE;
            END IF;
            RETURN format('field %s may not be null', r.key);
        END IF;
        CASE r.spec->>'type'
        WHEN 'string' THEN
            IF v_type <> 'string' THEN
                RETURN format('field %s must be a string', r.key);
            END IF;
            v_text := v_value #>> '{}';
            IF length(v_text) < coalesce((r.spec->>'min_length')::integer, 0)
               OR length(v_text) > coalesce((r.spec->>'max_length')::integer, 100000) THEN
                RETURN format('field %s must be %s to %s characters long', r.key,
                              coalesce(r.spec->>'min_length', '0'),
                              coalesce(r.spec->>'max_length', '100000'));
            END IF;
            IF v_text !~ coalesce(r.spec->>'pattern', '') THEN
                RETURN format('field %s must match %s', r.key, r.spec->>'pattern');
            END IF;
            IF r.spec ? 'enum' AND NOT (r.spec->'enum') @> jsonb_build_array(v_text) THEN
                RETURN format('field %s must be one of %s', r.key, r.spec->'enum');
            END IF;
            IF r.spec->>'format' = 'date-time' THEN
                IF v_text !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$' THEN
                    RETURN format('field %s must be an RFC 3339 date-time', r.key);
                END IF;
                BEGIN
                    PERFORM v_text::timestamptz;
                EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
                    RETURN format('field %s is not a real date-time', r.key);
                END;
            END IF;
        WHEN 'integer' THEN
            IF v_type <> 'number' THEN
                RETURN format('field %s must be an integer', r.key);
            END IF;
            v_number := v_value::numeric;
            IF v_number < (r.spec->>'minimum')::numeric
               OR v_number <= (r.spec->>'exclusive_minimum')::numeric
               OR v_number > (r.spec->>'maximum')::numeric THEN
                RETURN format('field %s is out of range', r.key);
            END IF;
        WHEN 'object' THEN
            IF v_type <> 'object' THEN
                RETURN format('field %s must be a JSON object', r.key);
            END IF;
        WHEN 'array' THEN
            IF v_type <> 'array' THEN
                RETURN format('field %s must be a JSON array', r.key);
            END IF;
            IF jsonb_array_length(v_value) < coalesce((r.spec->>'min_items')::integer, 0)
               OR jsonb_array_length(v_value) > coalesce((r.spec->>'max_items')::integer, 1000) THEN
                RETURN format('field %s must have %s to %s items', r.key,
                              coalesce(r.spec->>'min_items', '0'),
                              coalesce(r.spec->>'max_items', '1000'));
            END IF;
        ELSE
            RETURN format('field %s has an unknown type in the catalog', r.key);
        END CASE;
    END LOOP;
    RETURN NULL;
END
$$;
