"""Training: the objective against independent formulas, a real 2-process torchrun (gloo,
FSDP2) driven by the train flow, and exact resumption after a rank is SIGKILLed."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_schemas.train import TrainConfig
from data_schemas.workspace import Workspace
from model.train import FAULT_ENV, training_sigmas, training_weights
from tests.helpers.models import run_config


def test_training_schedule_and_weights_follow_the_spec():
    shift = 5.0
    s = np.linspace(1, 0, 1001)[:-1]
    sig = shift * s / (1 + (shift - 1) * s)
    np.testing.assert_allclose(training_sigmas(shift).numpy(), sig, rtol=1e-6)
    t = sig * 1000
    w = np.exp(-2 * ((t - 500) / 1000) ** 2)
    w = (w - w.min()) * 1000 / (w - w.min()).sum()
    got = training_weights(shift).numpy()
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    assert math.isclose(got.sum(), 1000, rel_tol=1e-5) and got.min() == 0 and got.argmax() == np.argmin(abs(t - 500))


def metric_steps(run_dir: Path) -> list[int]:
    with (run_dir / "metrics.csv").open() as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_exactly_after_a_sigkill(train_workspace, prefect_api, monkeypatch):
    from flows.train import train

    straight = train(run_config(train_workspace, "straight"))
    run = straight.run_dir
    assert straight.steps == 6 and math.isfinite(straight.final_loss)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]  # keep 2
    assert sorted(p.name for p in (run / "final").iterdir()) == ["adapter.safetensors", "config.json"]
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "pids").iterdir()) == ["rank0.pid", "rank1.pid"]

    # rank 1 SIGKILLs itself at step 3 (after the step-2 checkpoint); torchrun fails, the
    # task's retry relaunches it, and it resumes from step 2
    monkeypatch.setenv(FAULT_ENV, "1:3")
    resumed = train(run_config(train_workspace, "killed"))
    assert (resumed.run_dir / ".fault-fired").is_file()
    assert metric_steps(resumed.run_dir) == [1, 2, 3, 4, 5, 6]  # steps redone after the kill are logged once
    a = load_file(str(run / "final" / "adapter.safetensors"))
    b = load_file(str(resumed.run_dir / "final" / "adapter.safetensors"))
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # training moved the weights: LoRA B starts at zero
    assert max(float(a[k].abs().max()) for k in a if ".lora_B." in k) > 0

    # the final weights load into the pipeline's model
    from data_schemas.model import ModelConfig
    from model.components import build_components

    comps = build_components(ModelConfig(multianimate=run / "final"))
    assert comps.loaded is not None and comps.loaded.placed == len(a)


def test_train_flow_checks_its_inputs(train_workspace, tmp_path, prefect_api):
    from flows.train import train

    with pytest.raises(ValueError, match="no training shards"):
        train(run_config(tmp_path, "nothing"))
    empty = tmp_path / "ws"
    Workspace(empty).shards.mkdir(parents=True)
    for f in Workspace(train_workspace).shards.iterdir():
        (Workspace(empty).shards / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="person are dancing.*run the embed flow"):
        train(run_config(empty, "no-embeddings"))


def test_encoders_train_at_their_own_rate_when_asked():
    from data_schemas.model import ModelConfig
    from model.components import build_components
    from model.train import ConditionedDenoiser, parameter_groups

    dit = build_components(ModelConfig()).dit
    dit.set_trainable()
    model = ConditionedDenoiser(dit)
    lora, encoders = parameter_groups(model, TrainConfig(lr=1e-4))
    assert lora["lr"] == encoders["lr"] == 1e-4  # the release: one rate
    assert lora["params"] and all(p.ndim == 2 for p in lora["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        ".lora_" not in names[id(p)] and not names[id(p)].startswith("dit.transformer.") for p in encoders["params"]
    )
    assert len(lora["params"]) + len(encoders["params"]) == sum(p.requires_grad for p in model.parameters())
    assert parameter_groups(model, TrainConfig(lr=1e-4, encoder_lr=1e-3))[1]["lr"] == 1e-3
    with pytest.raises(ValueError, match="min_stride"):
        TrainConfig(loader={"min_stride": 3, "max_stride": 2})
