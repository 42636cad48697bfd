"""The ledger's rules as data for the database: the state machines and the event shapes.

`ledger_append` trusts no caller, so it cannot take the allowed transitions, or the
shape of a payload, from its arguments. It reads them from two tables, whose rows
are rendered here from the one source of truth (`ledger/state_machine.py` and the
pydantic models of `ledger/events.py`):

    python -m ledger.rules > migrations/sql/<revision>_ledger_rules.sql

A migration loads that file. `tests/test_ledger_trust.py` checks that the tables of a
migrated database say exactly what the Python rules say, so the two cannot drift: a
change to the state machine or to an event's shape needs a new revision with a newly
rendered file.

The shape of each event's payload is rendered as one SQL function,
`ledger_payload_problem`, from each model's JSON schema: every field of the model must
be present, and no other (the store always writes the whole model), each of its JSON
type (string, integer, object or array, or null where the model allows it) and within
its bounds (length, pattern, enum, date-time, minimum, maximum, items). Numbers are
integers everywhere in a payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger.events import EVENT_TYPES, DomainEvent
from ledger.state_machine import NEW, TRANSITIONS, StreamKind

# The payload field that names the stream's entity: `payment-<payment_id>`.
ENTITY_FIELD: dict[StreamKind, str] = {
    StreamKind.PAYMENT: "payment_id",
    StreamKind.ACCOUNT: "account_id",
    StreamKind.RISK: "account_id",
    StreamKind.RECONCILIATION: "run_id",
}
# Events that move positions, and so go through ledger_apply_money.
MONEY_EVENTS = frozenset({"AccountOpened", "FundsReserved", "PaymentSettled", "FundsReleased"})

_BOUNDS = {
    "minLength": "min_length",
    "maxLength": "max_length",
    "pattern": "pattern",
    "enum": "enum",
    "format": "format",
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusiveMinimum": "exclusive_minimum",
    "minItems": "min_items",
    "maxItems": "max_items",
}


@dataclass(frozen=True)
class EventTypeRow:
    event_type: str
    schema_version: int
    stream_kind: str
    entity_field: str
    starts_stream: bool
    moves_money: bool
    fields: dict[str, dict[str, Any]]


def transition_rows() -> list[tuple[str, str, str, str]]:
    """(stream kind, from state, event type, to state), in a stable order."""
    return sorted(
        (kind.value, state, event_type, to)
        for kind, machine in TRANSITIONS.items()
        for (state, event_type), to in machine.items()
    )


def field_spec(schema: dict[str, Any]) -> dict[str, Any]:
    """The database's spec of one field, from its JSON schema."""
    nullable = False
    options = schema.get("anyOf")
    if options is not None:
        non_null = [option for option in options if option.get("type") != "null"]
        nullable = len(non_null) < len(options)
        if len(non_null) != 1:
            raise ValueError(f"cannot render a field with several types: {schema}")
        schema = non_null[0]
    kind = schema.get("type")
    if kind not in ("string", "integer", "object", "array"):
        raise ValueError(f"cannot render a field of type {kind!r}: {schema}")
    spec: dict[str, Any] = {"type": kind, "nullable": nullable}
    for key, name in _BOUNDS.items():
        if key in schema:
            spec[name] = schema[key]
    return spec


def _kind_of(event_type: str) -> StreamKind:
    kinds = {kind for kind, machine in TRANSITIONS.items() for (_, e) in machine if e == event_type}
    if len(kinds) != 1:
        raise ValueError(f"{event_type} must belong to exactly one kind of stream, not {kinds}")
    return kinds.pop()


def event_type_row(cls: type[DomainEvent]) -> EventTypeRow:
    kind = _kind_of(cls.event_type)
    schema = cls.model_json_schema()
    return EventTypeRow(
        event_type=cls.event_type,
        schema_version=cls.schema_version,
        stream_kind=kind.value,
        entity_field=ENTITY_FIELD[kind],
        starts_stream=(NEW, cls.event_type) in TRANSITIONS[kind],
        moves_money=cls.event_type in MONEY_EVENTS,
        fields={name: field_spec(prop) for name, prop in schema["properties"].items()},
    )


def event_type_rows() -> list[EventTypeRow]:
    return [event_type_row(cls) for cls in EVENT_TYPES.values()]


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _text_array(values: list[str]) -> str:
    return "ARRAY[" + ", ".join(_literal(v) for v in values) + "]::text[]"


# Numbers nested in a free-form field are integers too (the verifier hashes integers
# exactly). A function of its own: a sub-select in the payload check would keep the
# planner from inlining it.
_NESTED_INTEGERS_ONLY = "ledger_integers_only({v})"
INTEGERS_ONLY_SQL = """\
CREATE FUNCTION ledger_integers_only(p jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- jsonpath cannot see a number's text, so each number is checked as text.
    RETURN NOT EXISTS (
        SELECT 1 FROM jsonb_path_query(p, 'strict $.** ? (@.type() == "number")') AS n
         WHERE n::text !~ '^-?[0-9]+$');
END
$$;
"""
# RFC 3339, as pydantic writes a datetime; the cast then refuses dates that do not
# exist (a data error, raised, never stored).
_DATE_TIME = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$"
)


def field_check(name: str, spec: dict[str, Any]) -> tuple[str, str]:
    """(an SQL condition over the payload `p` that holds when the field is valid, what it
    must be). Casts sit behind CASE, since SQL does not promise the order of AND."""
    v, t = f"p->{_literal(name)}", f"p->>{_literal(name)}"
    kind = spec["type"]
    if kind == "string":
        parts = [f"jsonb_typeof({v}) = 'string'"]
        low, high = spec.get("min_length", 0), spec.get("max_length")
        if high is not None:
            parts.append(f"length({t}) BETWEEN {low} AND {high}")
        elif low:
            parts.append(f"length({t}) >= {low}")
        if "pattern" in spec:
            parts.append(f"{t} ~ {_literal(spec['pattern'])}")
        if "enum" in spec:
            parts.append(f"{t} = ANY ({_text_array(spec['enum'])})")
        condition = " AND ".join(parts)
        what = "a string" + (f" matching {spec['pattern']}" if "pattern" in spec else "")
        if "enum" in spec:
            what = "one of " + ", ".join(spec["enum"])
        if high is not None:
            what += f" of {low} to {high} characters"
        if spec.get("format") == "date-time":
            condition = (
                f"CASE WHEN {condition} AND {t} ~ {_literal(_DATE_TIME)}"
                f" THEN ({t})::timestamptz IS NOT NULL ELSE false END"
            )
            what = "an RFC 3339 date-time"
    elif kind == "integer":
        bounds = []
        if "minimum" in spec:
            bounds.append(f"({v})::numeric >= {spec['minimum']}")
        if "exclusive_minimum" in spec:
            bounds.append(f"({v})::numeric > {spec['exclusive_minimum']}")
        if "maximum" in spec:
            bounds.append(f"({v})::numeric <= {spec['maximum']}")
        condition = (
            f"CASE WHEN jsonb_typeof({v}) = 'number' AND ({v})::text ~ '^-?[0-9]+$'"
            f" THEN {' AND '.join(bounds) or 'true'} ELSE false END"
        )
        low = spec.get("minimum", spec.get("exclusive_minimum", "-inf"))
        what = f"an integer in ({low}, {spec.get('maximum', 'inf')}]"
        if "minimum" in spec:
            what = f"an integer from {spec['minimum']} to {spec.get('maximum', 'inf')}"
    elif kind == "object":
        # Most objects (metadata) are empty: no call for them.
        condition = (
            f"CASE WHEN {v} = '{{}}'::jsonb THEN true"
            f" WHEN jsonb_typeof({v}) = 'object'"
            f" THEN {_NESTED_INTEGERS_ONLY.format(v=v)} ELSE false END"
        )
        what = "a JSON object whose numbers are integers"
    elif kind == "array":
        # The one array (postings) is checked item by item, integers included, by the
        # money rules (ledger_apply_money).
        low, high = spec.get("min_items", 0), spec.get("max_items", 1000)
        condition = (
            f"CASE WHEN jsonb_typeof({v}) = 'array'"
            f" THEN jsonb_array_length({v}) BETWEEN {low} AND {high} ELSE false END"
        )
        what = f"a JSON array of {low} to {high} items"
    else:
        raise ValueError(f"cannot check a field of type {kind!r}")
    if spec.get("nullable"):
        condition = f"(jsonb_typeof({v}) = 'null' OR {condition})"
        what += ", or null"
    return condition, f"field {name} must be {what}"


def render_payload_check(rows: list[EventTypeRow]) -> str:
    """`ledger_payload_problem(event_type, payload)`: what is wrong with a payload, or NULL.

    Rendered from the catalog: exactly the model's fields, each of its JSON type and
    within its bounds. PL/pgSQL, with one expression per event type behind a CASE
    statement: an append is a transaction of its own, and PL/pgSQL prepares an
    expression once per transaction, so one expression for every type at once cost
    three times as much per append (measured with pg_stat_user_functions).
    """
    branches = []
    for row in rows:
        names = sorted(row.fields)
        exactly = f"{row.event_type} has exactly the fields {', '.join(names)}"
        cases = [
            f"            WHEN NOT (p ?& {_text_array(names)}"
            f" AND p - {_text_array(names)} = '{{}}'::jsonb)\n"
            f"                THEN {_literal(exactly)}"
        ]
        for name in names:
            condition, message = field_check(name, row.fields[name])
            cases.append(
                f"            WHEN NOT ({condition})\n                THEN {_literal(message)}"
            )
        branches.append(
            f"    WHEN {_literal(row.event_type)} THEN\n        RETURN CASE\n"
            + "\n".join(cases)
            + "\n        END;"
        )
    return (
        "CREATE FUNCTION ledger_payload_problem(p_event_type text, p jsonb) RETURNS text\n"
        "LANGUAGE plpgsql STABLE SET search_path = pg_catalog, public, pg_temp AS $rules$\n"
        "BEGIN\n"
        "    IF jsonb_typeof(p) IS DISTINCT FROM 'object' THEN\n"
        "        RETURN 'the payload must be a JSON object';\n"
        "    END IF;\n"
        "    IF pg_column_size(p) > 65536 THEN\n"
        "        RETURN 'the payload is larger than 64 KiB';\n"
        "    END IF;\n"
        "    CASE p_event_type\n"
        + "\n".join(branches)
        + "\n    ELSE\n        RETURN 'unknown event type';\n    END CASE;\nEND\n$rules$;\n"
    )


def render_sql() -> str:
    """The rows of `ledger_transitions` and `ledger_event_types`, and the payload check."""
    lines = [
        "-- Rendered by `python -m ledger.rules` from ledger/state_machine.py and"
        " ledger/events.py.",
        "-- Do not edit by hand: change the Python rules, render a new file, add a revision.",
        "INSERT INTO ledger_transitions (stream_kind, from_state, event_type, to_state) VALUES",
    ]
    transitions = [
        f"    ({_literal(k)}, {_literal(f)}, {_literal(e)}, {_literal(t)})"
        for k, f, e, t in transition_rows()
    ]
    lines.append(",\n".join(transitions) + ";")
    lines.append("")
    lines.append(
        "INSERT INTO ledger_event_types (event_type, schema_version, stream_kind, entity_field,"
        " starts_stream, moves_money) VALUES"
    )
    rows = event_type_rows()
    types = [
        f"    ({_literal(row.event_type)}, {row.schema_version}, {_literal(row.stream_kind)}, "
        f"{_literal(row.entity_field)}, {str(row.starts_stream).lower()}, "
        f"{str(row.moves_money).lower()})"
        for row in rows
    ]
    lines.append(",\n".join(types) + ";")
    lines.append("")
    lines.append(INTEGERS_ONLY_SQL)
    lines.append(render_payload_check(rows))
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_sql(), end="")
