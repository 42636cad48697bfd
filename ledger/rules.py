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

A field's spec is a small JSON object that the database function checks:
`type` (string, integer, object or array), `nullable`, and the bounds that apply
(`min_length`, `max_length`, `pattern`, `enum`, `format`, `minimum`, `maximum`,
`exclusive_minimum`, `min_items`, `max_items`). Every field of the model must be
present, and no other: the store always writes the whole model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ledger.events import EVENT_TYPES, DomainEvent
from ledger.state_machine import NEW, TRANSITIONS, StreamKind

# The payload field that names the stream's entity: `payment-<payment_id>`.
ENTITY_FIELD: dict[StreamKind, str] = {
    StreamKind.PAYMENT: "payment_id",
    StreamKind.ACCOUNT: "account_id",
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


def render_sql() -> str:
    """INSERT statements for `ledger_transitions` and `ledger_event_types`."""
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
        " starts_stream, moves_money, fields) VALUES"
    )
    types = []
    for row in event_type_rows():
        fields = json.dumps(row.fields, sort_keys=True, separators=(",", ":"))
        types.append(
            f"    ({_literal(row.event_type)}, {row.schema_version}, {_literal(row.stream_kind)}, "
            f"{_literal(row.entity_field)}, {str(row.starts_stream).lower()}, "
            f"{str(row.moves_money).lower()},\n     {_literal(fields)})"
        )
    lines.append(",\n".join(types) + ";")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_sql(), end="")
