"""Typed records and Arrow schemas shared by every layer.

No heavy imports here: pydantic, pyarrow and yaml only. Every Parquet file we write
carries ``SCHEMA_VERSION`` in its metadata; readers refuse files of another version or shape.
"""

from data_schemas.config import IngestConfig, PoseConfig, ProjectConfig, load_config
from data_schemas.io import SCHEMA_VERSION, SchemaError, arrow_schema, read_records, read_table, write_records
from data_schemas.pose import PoseRecord
from data_schemas.video import ClipRecord, FailureReason, IngestSummary, ProbeInfo, VideoRecord, VideoStatus

__all__ = [
    "SCHEMA_VERSION",
    "ClipRecord",
    "FailureReason",
    "IngestConfig",
    "IngestSummary",
    "PoseConfig",
    "PoseRecord",
    "ProbeInfo",
    "ProjectConfig",
    "SchemaError",
    "VideoRecord",
    "VideoStatus",
    "arrow_schema",
    "load_config",
    "read_records",
    "read_table",
    "write_records",
]
