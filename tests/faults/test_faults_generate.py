"""Generation under hostile specs and faults (the issue's case 5): the queue refuses what a job
cannot or may not read, every number is bounded, NaN/inf outputs and time limits end a job as
a recorded failure while the batch goes on, and a batch SIGKILLed mid-run resumes with every
output once. The injections live in bench/fault_cases/generate.py (the benchmark runs them
too); these tests assert more of their details."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from pydantic import ValidationError

from bench.fault_cases import generate as cases
from data_schemas import ProjectConfig
from data_schemas.job import GenerateConfig, JobSpec, describe_validation_error, queue_path, read_record, submit_job
from data_schemas.workspace import Workspace

HOSTILE = [(name, function) for name, kind, function in cases.CASES if kind == "hostile"]


@pytest.mark.parametrize("function", [f for _, f in HOSTILE], ids=[n for n, _ in HOSTILE])
def test_hostile_specs_are_refused_naming_the_field_and_nothing_is_queued(tmp_path, function):
    ok, detail = function(tmp_path)
    assert ok, detail


def test_every_number_of_a_job_is_bounded_and_the_message_names_the_field(tmp_path):
    files = dict(reference=tmp_path / "r.png", driving_video=tmp_path / "d.mp4")
    for bad, message in (
        (dict(seed=-1), "seed=-1: Input should be greater than or equal to 0"),
        (dict(seed=2**64), "seed=18446744073709551616: Input should be less than or equal to 9223372036854775807"),
        (dict(guidance_scale=float("nan")), "guidance_scale=nan: Input should be a finite number"),
        (dict(fps=float("inf")), "fps=inf: Input should be a finite number"),
        (dict(steps=10**6), "steps=1000000: Input should be less than or equal to 1000"),
        (dict(num_frames=4001), "num_frames=4001: Input should be less than or equal to 1001"),
        (dict(width=4096), "width=4096: Input should be less than or equal to 2048"),
        (dict(height=2048, width=2048, num_frames=81), "height x width x num_frames = 2048x2048x81 is over the bound"),
        (dict(prompt="x" * 5000), "prompt='xxxx"),
        (dict(person_map={300: 1}), "persons are numbered up to 255"),
    ):
        with pytest.raises(ValidationError) as info:
            JobSpec(**files, **bad)
        assert message in describe_validation_error(info.value), describe_validation_error(info.value)
    # the bounds are the JSON schema's too: the UI's form refuses them before a run starts
    schema = JobSpec.model_json_schema()["properties"]
    assert (
        schema["height"]["maximum"] == 2048
        and schema["guidance_scale"]["maximum"] == 20
        and schema["fps"]["minimum"] == 1
    )


def test_input_checks(tmp_path):
    """Each refusal names the field, the file and the reason; good inputs pass, confined or not."""
    from preprocess.job_inputs import JobInputError, check_job_inputs

    inputs = cases.job_inputs(tmp_path / "ws" / "in")
    ingest, limits = ProjectConfig().ingest, GenerateConfig()
    good = JobSpec(
        reference=inputs["reference"],
        poses=inputs["poses"],
        masks=inputs["masks"],
        reference_poses=inputs["reference_poses"],
        num_frames=5,
        height=64,
        width=64,
    )
    check_job_inputs(good, ingest, limits)
    check_job_inputs(good, ingest, limits, roots=[tmp_path / "ws"])

    def refused(roots=None, **change) -> dict[str, str]:
        with pytest.raises(JobInputError) as info:
            check_job_inputs(good.model_copy(update=change), ingest, limits, roots=roots)
        return info.value.problems

    strip = cases.png(tmp_path / "strip.png", 1000, 1)
    assert refused(reference=strip) == {
        "reference": f"{strip}: reference image of 1000x1 px is smaller than 32 px on a side "
        "(generate.min_reference_side)"
    }
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it would block for ever: refused before it is opened
    assert "is not a regular file" in refused(reference=fifo)["reference"]
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    assert refused(reference=dangling)["reference"] == f"{dangling}: reference image not found (a dangling symlink)"
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, keypoints=np.array([object()], dtype=object))
    assert "holds Python objects (a pickle)" in refused(reference_poses=pickled)["reference_poses"]
    masks_of_another_clip = cases.job_inputs(tmp_path / "other", num_frames=7)["masks"]
    assert "not the same clip" in refused(masks=masks_of_another_clip)["poses/masks"]
    # confined: a link inside the roots to a file inside them is fine; weights outside are not
    link = tmp_path / "ws" / "link.png"
    link.symlink_to(inputs["reference"])
    check_job_inputs(good.model_copy(update={"reference": link}), ingest, limits, roots=[tmp_path / "ws"])
    outside = good.model_copy(update={"model": good.model.model_copy(update={"multianimate": tmp_path / "weights"})})
    with pytest.raises(JobInputError) as info:
        check_job_inputs(outside, ingest, limits, roots=[tmp_path / "ws"])
    assert list(info.value.problems) == ["model.multianimate"]
    check_job_inputs(
        outside,
        ingest,
        limits.model_copy(update={"input_roots": (tmp_path / "weights",)}),
        roots=[tmp_path / "ws", tmp_path / "weights"],
    )
    # every problem at once
    assert set(refused(reference=strip, reference_poses=pickled)) == {"reference", "reference_poses"}


def test_non_finite_latents_end_sampling_at_the_first_bad_step():
    """Guidance 1e308 (allowed by the library's SamplingConfig, not by a job) overflows: the
    pipeline stops at step 1 instead of decoding NaNs into an all-black video."""
    import torch

    from data_schemas.model import ModelConfig
    from model.components import build_components
    from model.generate import check_video
    from model.pipeline import Conditions, DegenerateOutputError, MultiAnimatePipeline, SamplingConfig

    pipe = MultiAnimatePipeline(build_components(ModelConfig()))
    emb = torch.randn(512, pipe.c.dit.transformer.config.text_dim)
    cond = Conditions(
        ref_image=np.zeros((32, 32, 3), np.uint8),
        pose=np.zeros((5, 32, 32, 3), np.uint8),
        ref_pose=np.zeros((32, 32, 3), np.uint8),
        labels=np.zeros((5, 32, 32), np.uint8),
        prompt_embeds=emb,
        negative_embeds=emb,
    )
    steps = []
    with pytest.raises(
        DegenerateOutputError,
        match=r"non-finite latents \(NaN or inf\) after denoising step 1/5 at guidance scale 1e\+308",
    ):
        pipe(cond, SamplingConfig(steps=5, guidance_scale=1e308, progress=False), on_step=lambda i, n: steps.append(i))
    assert steps == []  # stopped before the caller's step hook
    pipe(cond, SamplingConfig(steps=2, progress=False), on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 2), (2, 2)]
    with pytest.raises(DegenerateOutputError, match="every pixel of the generated video is 0"):
        check_video(np.zeros((5, 32, 32, 3), np.uint8))
    check_video(np.arange(5 * 32 * 32 * 3).astype(np.uint8).reshape(5, 32, 32, 3))


@pytest.mark.slow
def test_time_limit_diverged_weights_and_api_jobs(tmp_path, prefect_api):
    """One run: a runaway job (1000 steps at 512x512) under a 10 s limit, then two jobs given through the
    flow's ``jobs`` parameter (the API): one on NaN weights, one healthy. The runaway is
    stopped at a step boundary and recorded ``timeout``, the NaN one ``degenerate_output``,
    the healthy one is generated; failed jobs publish their record alone. A spec reaching
    outside the roots refuses the request whole. (The rerun that finishes a timed-out job is
    the benchmark's case: it costs the job's whole time.)"""
    from flows.generate import generate

    workspace = tmp_path / "ws"
    inputs = cases.job_inputs(workspace / "in")
    common = dict(
        reference=inputs["reference"],
        poses=inputs["poses"],
        masks=inputs["masks"],
        reference_poses=inputs["reference_poses"],
        num_frames=5,
        height=64,
        width=64,
    )
    # minutes on a CPU (seconds a step at this size): stopped long before, whatever the load
    runaway = JobSpec(**(common | {"height": 512, "width": 512}), steps=1000, seed=1)
    submit_job(workspace, runaway)
    time.sleep(0.05)  # queued before the others (the queue is ordered by submission time)
    diverged = JobSpec(
        **common, steps=2, seed=2, model={"multianimate": cases.diverged_adapter(workspace / "diverged")}
    )
    healthy = JobSpec(**common, steps=2, seed=3)
    limit = 10  # the healthy jobs take about a second
    config = ProjectConfig(generate={"job_timeout_s": limit})

    outside = JobSpec(**(common | {"reference": tmp_path / "elsewhere.png"}), steps=2)
    cases.png(tmp_path / "elsewhere.png", 64, 64)
    with pytest.raises(
        ValueError,
        match=f"refused 1 of 2 job.*reference: {tmp_path / 'elsewhere.png'} resolves .* outside the allowed roots",
    ):
        generate(workspace, config, jobs=[healthy, outside])
    assert not queue_path(workspace, healthy.job_id).exists()

    summary = generate(workspace, config, jobs=[diverged, healthy])
    assert sorted(summary.queued) == sorted([diverged.job_id, healthy.job_id])
    assert summary.ok == [healthy.job_id] and sorted(summary.failed) == sorted([runaway.job_id, diverged.job_id])
    stopped = read_record(workspace, runaway.job_id)
    assert stopped.reason == "timeout" and f"ran over its time limit of {limit} s" in stopped.error, stopped
    # stopped at the first step boundary past the limit: the flow went on in the same thread
    steps_done = int(stopped.error.split("after denoising step ")[1].split("/")[0])
    assert steps_done < 1000 and limit <= stopped.seconds < limit + 60, stopped
    nan = read_record(workspace, diverged.job_id)
    assert nan.reason == "degenerate_output" and "non-finite latents (NaN or inf) after denoising step 1/2" in nan.error
    for failed in (runaway, diverged):
        assert [p.name for p in Workspace(workspace).output(failed.job_id).iterdir()] == ["job.json"]
    assert sorted(p.name for p in Workspace(workspace).output(healthy.job_id).iterdir()) == cases.COMPLETE
    assert not [p for p in Workspace(workspace).outputs.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_killed_batch_resumes_with_every_output_once(tmp_path, prefect_api, monkeypatch):
    # the child processes report to this session's Prefect server (no server of their own to start)
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    ok, detail = cases.case_killed_batch(tmp_path)
    assert ok, detail
