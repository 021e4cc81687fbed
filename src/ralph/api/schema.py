"""Response models derived from the domain records, so that a new field of a record is added
to its dataclass (and its table) and reaches the API without a third copy."""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model


def response_model(
    record: type[Any],
    name: str,
    *,
    exclude: frozenset[str] = frozenset(),
    descriptions: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> type[BaseModel]:
    """A pydantic model named `name` with the fields of the dataclass `record` (but those in
    `exclude`), read from a record's attributes; `descriptions` document fields in OpenAPI,
    `extra` adds fields the record does not have (name: (type, default))."""
    hints = get_type_hints(record)
    notes = descriptions or {}
    fields: dict[str, Any] = {
        field.name: (hints[field.name], Field(description=notes.get(field.name)))
        for field in dataclasses.fields(record)
        if field.name not in exclude
    }
    fields.update(extra or {})
    model: type[BaseModel] = create_model(
        name, __config__=ConfigDict(from_attributes=True), **fields
    )
    return model
