"""data_schemas: Parquet round trips, rejection of wrong files, atomic writes, configs."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import (
    ClipRecord,
    IngestConfig,
    SchemaError,
    VideoRecord,
    VideoStatus,
    arrow_schema,
    load_config,
    read_records,
    read_table,
    write_records,
)
from data_schemas.atomic import atomic_path, is_temp_name, remove_stale_temps, temp_path_for


def _video(**kw) -> VideoRecord:
    fields = dict(path="/in/a.mp4", size_bytes=10, sha256="ab" * 32, status=VideoStatus.ok, width=320, height=240)
    return VideoRecord(**(fields | kw))


def _clip(i: int) -> ClipRecord:
    return ClipRecord(
        clip_id=f"{'ab' * 8}-{i:03d}",
        source_sha256="ab" * 32,
        source_path="/in/a.mp4",
        clip_index=i,
        start_s=float(i),
        end_s=i + 1.0,
        num_frames=25,
        fps=25.0,
        width=320,
        height=240,
        path=f"clips/{'ab' * 8}-{i:03d}.mp4",
        sha256="cd" * 32,
        size_bytes=1000,
    )


def test_round_trip(tmp_path):
    videos = [_video(), _video(path="/in/b.mp4", status=VideoStatus.failed, reason="undecodable", error="b: bad")]
    clips = [_clip(0), _clip(1)]
    write_records(videos, VideoRecord, tmp_path / "videos.parquet")
    write_records(clips, ClipRecord, tmp_path / "clips.parquet")
    assert read_records(tmp_path / "videos.parquet", VideoRecord) == videos
    assert read_records(tmp_path / "clips.parquet", ClipRecord) == clips
    assert sorted(os.listdir(tmp_path)) == ["clips.parquet", "videos.parquet"]  # no temp left


def test_empty_table_round_trip(tmp_path):
    write_records([], ClipRecord, tmp_path / "clips.parquet")
    assert read_records(tmp_path / "clips.parquet", ClipRecord) == []
    assert read_table(tmp_path / "clips.parquet", ClipRecord).schema.names == list(ClipRecord.model_fields)


def test_arrow_schema_follows_fields():
    schema = arrow_schema(VideoRecord)
    assert schema.names == list(VideoRecord.model_fields)
    assert schema.field("status").type == pa.string() and not schema.field("status").nullable
    assert schema.field("sha256").nullable and schema.field("width").type == pa.int64()


def test_wrong_record_kind_is_rejected(tmp_path):
    write_records([_clip(0)], ClipRecord, tmp_path / "clips.parquet")
    with pytest.raises(SchemaError, match="ClipRecord"):
        read_records(tmp_path / "clips.parquet", VideoRecord)


def _rewrite(path, table):
    pq.write_table(table, path)


def test_missing_and_extra_columns_are_rejected(tmp_path):
    path = tmp_path / "clips.parquet"
    write_records([_clip(0)], ClipRecord, path)
    table = pq.read_table(path)
    _rewrite(path, table.drop_columns(["fps"]).append_column("colour", pa.array(["red"])))
    with pytest.raises(SchemaError, match=r"missing \['fps'\].*unexpected \['colour'\]"):
        read_records(path, ClipRecord)


def test_wrong_column_type_is_rejected(tmp_path):
    path = tmp_path / "clips.parquet"
    write_records([_clip(0)], ClipRecord, path)
    table = pq.read_table(path)
    index = table.schema.get_field_index("num_frames")
    bad = table.set_column(index, pa.field("num_frames", pa.string()), pa.array(["25"]))
    _rewrite(path, bad.replace_schema_metadata(table.schema.metadata))
    with pytest.raises(SchemaError, match="num_frames"):
        read_records(path, ClipRecord)


def test_other_schema_version_is_rejected(tmp_path):
    path = tmp_path / "clips.parquet"
    write_records([_clip(0)], ClipRecord, path)
    table = pq.read_table(path)
    meta = dict(table.schema.metadata) | {b"multianimate.schema_version": b"999"}
    _rewrite(path, table.replace_schema_metadata(meta))
    with pytest.raises(SchemaError, match="version"):
        read_records(path, ClipRecord)


def test_invalid_value_is_rejected(tmp_path):
    path = tmp_path / "videos.parquet"
    write_records([_video()], VideoRecord, path)
    table = pq.read_table(path)
    index = table.schema.get_field_index("status")
    _rewrite(path, table.set_column(index, table.schema.field("status"), pa.array(["exploded"])))
    with pytest.raises(SchemaError, match="invalid VideoRecord"):
        read_records(path, VideoRecord)


def test_not_parquet_is_rejected(tmp_path):
    (tmp_path / "x.parquet").write_text("nope")
    with pytest.raises(SchemaError, match="x.parquet"):
        read_records(tmp_path / "x.parquet", VideoRecord)


def test_records_are_typed():
    with pytest.raises(ValueError):
        _video(status="maybe")
    with pytest.raises(ValueError):
        _video(unknown_field=1)


def test_atomic_path_publishes_or_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert is_temp_name(tmp.name) and tmp.suffix == ".bin"
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"done"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_remove_stale_temps_spares_live_writers(tmp_path):
    live = temp_path_for(tmp_path / "live.mp4")
    live.write_bytes(b"x")
    dead = tmp_path / live.name.replace(f"-{os.getpid()}-", "-999999999-")
    dead.write_bytes(b"x")
    (tmp_path / "keep.mp4").write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, "keep.mp4"])


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="max_clip_s"):
        IngestConfig(min_clip_s=5, max_clip_s=2)
    with pytest.raises(ValueError, match="fps"):
        IngestConfig(fps=0)
    (tmp_path / "p.yaml").write_text("ingest:\n  fps: 30\n  max_side: 512\n")
    cfg = load_config(tmp_path / "p.yaml")
    assert cfg.ingest.fps == 30 and cfg.ingest.max_side == 512
    assert cfg.ingest.digest() != IngestConfig().digest()
    assert IngestConfig(fps=30, max_side=512).digest() == cfg.ingest.digest()
    (tmp_path / "bad.yaml").write_text("ingest:\n  fsp: 30\n")
    with pytest.raises(ValueError, match=r"(?s)bad.yaml.*ingest.fsp"):
        load_config(tmp_path / "bad.yaml")


def test_shipped_default_profile_is_the_built_in_default():
    from pathlib import Path

    assert load_config(Path(__file__).parents[2] / "configs" / "default.yaml") == load_config(None)


def test_real_profile_names_the_dwpose_files():
    from pathlib import Path

    pose = load_config(Path(__file__).parents[2] / "configs" / "real.yaml").pose
    assert pose.models == "files" and pose.detector_path.name == "yolox_l.onnx"
    assert pose.pose_model_path.name == "dw-ll_ucoco_384.onnx"
    segment = load_config(Path(__file__).parents[2] / "configs" / "real.yaml").segment
    assert segment.models == "files"
    with pytest.raises(
        ValueError, match=r"(?s)SAM2 weights missing: .*sam2.1-hiera-large.*facebook/sam2.1-hiera-large"
    ):
        segment.model_folder()


def test_train_form_defaults_pass_the_servers_parameter_check():
    """The UI's run form sends every field, None where the default is None (the LoRA sizes
    a profile fills in); the server checks them against the deployment's schema."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from data_schemas.train import TrainConfig
    from flows.train import train

    config = TrainConfig().model_dump(mode="json")
    config["model"] |= {"lora_rank": None, "lora_alpha": None}
    validate({"config": config}, parameter_schema(train).model_dump_for_openapi(), raise_on_error=True)
