"""The real path's parts on the CPU: fp32 trained weights on a bf16 base, per-rank sharded
loading from safetensors files, the bf16 timestep rule, the persons a checkpoint allows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_schemas.model import TINY_DIT, ModelConfig
from data_schemas.train import TrainConfig
from model.checkpoint import load_released
from model.dit import MultiAnimateDiT, build_transformer
from model.train import NUM_TRAIN_TIMESTEPS, build_training_model, seen_timestep_index, training_sigmas
from tests.helpers.models import released_tensors, write_released

ROOT = Path(__file__).resolve().parents[2]


def test_real_profiles_default_to_a_bf16_base_and_tiny_to_fp32(tmp_path):
    assert ModelConfig(profile="wan-i2v-14b-720p", wan_folder=tmp_path).dtype == "bfloat16"
    assert ModelConfig().dtype == "float32"
    assert ModelConfig(profile="wan-i2v-14b-720p", wan_folder=tmp_path, dtype="float16").dtype == "float16"


def _step_inputs(dtype: torch.dtype) -> tuple:
    g = torch.Generator().manual_seed(0)
    T, H, W = 5, 32, 32
    t = (T - 1) // 4 + 1
    pose = torch.randint(0, 256, (1, 3, T, H, W), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (1, T, H, W), generator=g)
    return (
        torch.randn(1, 16, t, H // 8, W // 8, generator=g).to(dtype),
        torch.randn(1, 20, t, H // 8, W // 8, generator=g).to(dtype),
        torch.tensor([700.0], dtype=dtype),
        torch.randn(1, 512, TINY_DIT.text_dim, generator=g).to(dtype),
        torch.randn(1, 257, TINY_DIT.image_dim, generator=g).to(dtype),
        pose,
        labels,
        torch.tensor([[0, 3, 5]]),
        torch.randint(0, 256, (1, 3, H, W), generator=g, dtype=torch.uint8),
        torch.ones(1, 1, 1, 1, 1, dtype=dtype),
    )


def test_one_adamw_step_on_a_bf16_base_changes_every_trained_tensor(tmp_path):
    """lr 1e-4 moves a weight of 0.1 by far less than bf16's ulp there (4.9e-4): in bf16 most
    of the trained tensors would not change at all; in fp32 every one does. The zero-initialised
    tensors (LoRA B, the encoders' output convs, biases) get small values first, as after
    loading a checkpoint, so that every tensor has a gradient."""
    cfg = TrainConfig(
        workspace=tmp_path, model=ModelConfig(dtype="bfloat16"), loader={"num_frames": 5, "height": 32, "width": 32}
    )
    built = build_training_model(cfg, torch.device("cpu"))
    dit = built.comps.dit
    trained = {n: p for n, p in built.model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert {p.dtype for n, p in dit.transformer.named_parameters() if not p.requires_grad} >= {torch.bfloat16}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trained.values():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    before = {n: p.detach().clone() for n, p in trained.items()}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-4, weight_decay=0.01)
    out = built.model(*_step_inputs(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    optimizer.step()
    unchanged = [n for n, p in trained.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged


def test_the_dry_run_describes_dtypes_and_persons(tmp_path, capsys):
    from model.train import train

    cfg = TrainConfig(
        workspace=tmp_path, model=ModelConfig(dtype="bfloat16"), loader={"num_frames": 5, "height": 32, "width": 32}
    )
    train(cfg, dry_run=True)
    out = capsys.readouterr().out
    assert re.search(
        r"^trainable: \d+ parameters \(float32\); frozen: \d+ parameters \(bfloat16\)$", out, re.MULTILINE
    ), out
    assert "persons: at most 7 (fresh LoRA and encoders; label pool 8)" in out


def test_a_widened_checkpoint_allows_only_the_persons_it_learned(tmp_path):
    D = TINY_DIT.inner_dim
    write_released(tmp_path / "o", released_tensors(TINY_DIT.num_layers, D, TINY_DIT.ffn_dim, rank=4, label_channels=4))
    torch.manual_seed(0)
    dit = MultiAnimateDiT(build_transformer(TINY_DIT), label_pool=8)
    report = load_released(dit, tmp_path / "o")
    assert report.widened == {"identifier_adapter.0.weight": (4, 8)}
    assert (dit.label_pool, dit.max_persons) == (8, 3)
    own = MultiAnimateDiT(build_transformer(TINY_DIT), label_pool=4)
    load_released(own, tmp_path / "o")
    assert own.max_persons == 3
    assert all(
        p.dtype == torch.float32 for n, p in dit.named_parameters() if ".lora_" in n or not n.startswith("transformer.")
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_timestep_the_model_sees_picks_the_sigma(dtype):
    """Independently: round each training timestep to the dtype, then take the first index
    of the smallest distance in plain Python (the release's scheduler lookup)."""
    sigmas = training_sigmas(5.0)
    timesteps = [float(s) * NUM_TRAIN_TIMESTEPS for s in sigmas.double()]
    index = torch.arange(NUM_TRAIN_TIMESTEPS)
    got = seen_timestep_index(index, sigmas, dtype).tolist()
    want = []
    for i in range(NUM_TRAIN_TIMESTEPS):
        seen = float(torch.tensor(float(sigmas[i]) * NUM_TRAIN_TIMESTEPS, dtype=torch.float32).to(dtype))
        dists = [abs(t - seen) for t in timesteps]
        want.append(dists.index(min(dists)))
    assert got == want
    if dtype == torch.float32:
        assert got == list(range(NUM_TRAIN_TIMESTEPS))
    else:
        assert sum(g != i for i, g in enumerate(got)) > 100  # bf16's grid is coarser than the schedule's


def test_each_rank_reads_only_its_rows_and_gets_the_files_exact_values(tmp_path):
    torch.manual_seed(0)
    transformer = build_transformer(TINY_DIT).to(torch.bfloat16)
    for name, p in transformer.named_parameters():  # diffusers keeps these fp32 under torch_dtype
        if any(m in name.split(".") for m in transformer._keep_in_fp32_modules):
            p.data = p.data.float()
    transformer.save_pretrained(tmp_path / "tr", max_shard_size="300KB")
    assert len(list((tmp_path / "tr").glob("*.safetensors"))) > 1
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(ROOT / "tests" / "helpers" / "shard_load_worker.py"),
            str(tmp_path / "tr"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    rows = re.findall(
        r"rank (\d) read=(\d+) total=(\d+) mismatched=(\[.*?\]) trained_not_fp32=(\[.*?\]) buffers_ok=(True|False)",
        done.stdout,
    )
    assert done.returncode == 0 and sorted(r[0] for r in rows) == ["0", "1"], done.stdout + done.stderr
    reads = []
    for _, read, total_bytes, mismatched, not_fp32, buffers_ok in rows:
        assert (mismatched, not_fp32, buffers_ok) == ("[]", "[]", "True"), rows
        reads.append(int(read))
        total = int(total_bytes)
    assert sum(reads) == total and max(reads) < 0.55 * total  # the two halves, nothing twice
