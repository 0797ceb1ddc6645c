"""The training config: the loader's section is the loader's own config (each field and check
once), a run's loader differs only where the run decides, old flat configs say what moved, and
the train verb's defaults are the config's."""

from __future__ import annotations

import warnings

import pytest
from typer.testing import CliRunner

from data_schemas.train import LoaderConfig, TrainConfig


def test_the_loader_section_is_the_loaders_config():
    import model.data

    assert model.data.LoaderConfig is LoaderConfig
    assert TrainConfig.model_fields["loader"].annotation is LoaderConfig
    assert not {"num_frames", "height", "width", "max_stride", "min_stride"} & set(TrainConfig.model_fields)
    cfg = TrainConfig(loader={"num_frames": 9, "height": 48, "width": 64})
    assert (cfg.loader.num_frames, cfg.loader.height, cfg.loader.width) == (9, 48, 64)
    for bad, match in (
        ({"num_frames": 10}, "4k\\+1"),
        ({"height": 40}, "divisible by 16"),
        ({"min_stride": 2}, "min_stride"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(loader=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved form reads back as it was, without a warning
        assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_a_run_reads_its_loader_resampled_from_its_seed():
    cfg = TrainConfig(
        seed=7, loader={"num_frames": 9, "height": 48, "width": 64, "crop_fraction": 0.0, "max_stride": 2}
    )
    run = cfg.run_loader(num_shards=3, seed=cfg.seed)
    assert run.resampled and run.seed == 7 and run.shuffle_buffer == 12  # at most 4 samples per shard
    assert run.model_dump(exclude={"resampled", "seed", "shuffle_buffer"}) == cfg.loader.model_dump(
        exclude={"resampled", "seed", "shuffle_buffer"}
    )
    assert cfg.run_loader(num_shards=1000, seed=8).shuffle_buffer == cfg.loader.shuffle_buffer
    with pytest.warns(UserWarning, match="loader.seed: no effect in training"):
        TrainConfig(loader={"seed": 3})


def test_a_config_of_the_old_flat_shape_says_what_moved(tmp_path):
    with pytest.raises(ValueError, match="num_frames, height: moved into the loader section"):
        TrainConfig.model_validate({"num_frames": 9, "height": 48})


def test_run_folder_and_required_members_come_from_their_homes(tmp_path):
    from data_schemas.embedding import TEXT_LEN
    from data_schemas.shard import MEMBERS
    from data_schemas.workspace import Workspace
    from model import pipeline
    from model.data import REQUIRED_MEMBERS

    assert TrainConfig(workspace=tmp_path, run_name="a").run_dir == Workspace(tmp_path).run("a")
    assert set(REQUIRED_MEMBERS) == set(MEMBERS) - {"ref.png"}
    assert pipeline.TEXT_LEN is TEXT_LEN


def test_the_train_verb_takes_its_defaults_from_the_config(tmp_path):
    from flows.cli import app

    shown = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "240"})
    assert shown.exit_code == 0
    for name, default in (("max_steps", 1000), ("checkpoint_every", 100)):
        assert f"{TrainConfig.model_fields[name].description}; default {default}" in shown.output
    assert f"{LoaderConfig.model_fields['num_frames'].description}; default 81" in shown.output
    # an option given goes to its section and is checked there; nothing is created
    refused = CliRunner().invoke(app, ["train", "-w", str(tmp_path / "ws"), "--dry-run", "--num-frames", "10"])
    assert refused.exit_code == 2 and "4k+1" in refused.output
    assert not (tmp_path / "ws").exists()
