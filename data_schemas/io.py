"""Parquet I/O for typed records: atomic writes, validating reads.

The Arrow schema of a record type is derived from its pydantic fields, so the two can
never drift apart. Files carry the schema version and the record name in their metadata.
"""

from __future__ import annotations

import enum
import types
import typing
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from data_schemas.atomic import atomic_path

SCHEMA_VERSION = 1
_META_VERSION = b"multianimate.schema_version"
_META_RECORD = b"multianimate.record"

R = TypeVar("R", bound=BaseModel)

_ARROW_TYPES: dict[type, pa.DataType] = {
    bool: pa.bool_(),
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
}


class SchemaError(ValueError):
    """A Parquet file does not hold the records it claims to hold."""


def schema_version(model: type[BaseModel]) -> int:
    """A record type's layout version: its own ``SCHEMA_VERSION`` class attribute when it has
    one (a layout change bumps only its own files), else the package's."""
    return getattr(model, "SCHEMA_VERSION", SCHEMA_VERSION)


def _arrow_type(annotation: object) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) of one pydantic field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation!r}")
        return _arrow_type(args[0])[0], True
    if origin is typing.Literal and all(isinstance(a, str) for a in typing.get_args(annotation)):
        return pa.string(), False
    if origin is tuple and typing.get_args(annotation)[1:] == (Ellipsis,):
        return pa.list_(_arrow_type(typing.get_args(annotation)[0])[0]), False
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return pa.string(), False
    if isinstance(annotation, type) and annotation in _ARROW_TYPES:
        return _ARROW_TYPES[annotation], False
    raise TypeError(f"no Arrow type for {annotation!r}")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a flat record type, with our metadata."""
    fields = []
    for name, info in model.model_fields.items():
        arrow_type, nullable = _arrow_type(info.annotation)
        fields.append(pa.field(name, arrow_type, nullable=nullable))
    metadata = {_META_VERSION: str(schema_version(model)).encode(), _META_RECORD: model.__name__.encode()}
    return pa.schema(fields, metadata=metadata)


def write_records(records: typing.Sequence[BaseModel], model: type[BaseModel], path: Path) -> Path:
    """Write records as one Parquet file, atomically (temp name, fsync, rename)."""
    schema = arrow_schema(model)
    for record in records:
        if not isinstance(record, model):
            raise TypeError(f"{path}: expected {model.__name__} records, got {type(record).__name__}")
    rows = [record.model_dump(mode="json") for record in records]
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_table(path: Path, model: type[BaseModel]) -> pa.Table:
    """Read a Parquet file and check its version, record name, column names and types."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from exc
    expected = arrow_schema(model)
    metadata = table.schema.metadata or {}
    version = metadata.get(_META_VERSION)
    # The kind first: versions are per kind of record.
    if metadata.get(_META_RECORD) != model.__name__.encode():
        raise SchemaError(f"{path}: holds {metadata.get(_META_RECORD)!r} records, expected {model.__name__}")
    if version != str(schema_version(model)).encode():
        raise SchemaError(f"{path}: schema version {version!r}, expected {schema_version(model)}")
    if table.schema.names != expected.names:
        missing = sorted(set(expected.names) - set(table.schema.names))
        extra = sorted(set(table.schema.names) - set(expected.names))
        raise SchemaError(f"{path}: wrong columns (missing {missing}, unexpected {extra})")
    for field in expected:
        actual = table.schema.field(field.name)
        if actual.type != field.type:
            raise SchemaError(f"{path}: column {field.name!r} is {actual.type}, expected {field.type}")
    return table


def read_records(path: Path, model: type[R]) -> list[R]:
    """Read and validate every row as a ``model`` record."""
    table = read_table(path, model)
    try:
        return [model.model_validate(row) for row in table.to_pylist()]
    except ValueError as exc:
        raise SchemaError(f"{path}: invalid {model.__name__} row: {exc}") from exc
