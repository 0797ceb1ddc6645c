"""The tiny base transformer's pretraining (model/pretrain.py) and how a profile loads it."""

from __future__ import annotations

import pytest
import torch

from data_schemas.model import MissingWeightsError, ModelConfig
from model.components import build_components
from model.pretrain import pretrain_tiny_base
from tests.helpers.models import run_config


def test_pretrained_base_is_written_and_loaded_by_the_tiny_profile(train_workspace, tmp_path):
    out = tmp_path / "tiny-base"
    result = pretrain_tiny_base(run_config(train_workspace, "pretrain"), out, steps=3)
    assert result["last_loss"] == result["last_loss"]  # finite, not NaN
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    assert not list(tmp_path.glob(".*tmp"))

    random_base = build_components(ModelConfig()).dit.transformer.state_dict()
    loaded = build_components(ModelConfig(tiny_transformer=out)).dit.transformer.state_dict()
    assert loaded.keys() == random_base.keys()  # the same model, with the fresh (no-op) LoRA added
    changed = [k for k in loaded if "lora_" not in k and not torch.equal(loaded[k], random_base[k])]
    assert changed, "pretraining changed no weight"


def test_missing_pretrained_base_is_one_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"(?s)tiny.*missing-base/config.json.*model.pretrain"):
        build_components(ModelConfig(tiny_transformer=tmp_path / "missing-base"))
    with pytest.raises(ValueError, match="tiny_transformer belongs to the tiny profile"):
        ModelConfig(profile="wan-i2v-14b-720p", wan_folder=tmp_path, tiny_transformer=tmp_path)
