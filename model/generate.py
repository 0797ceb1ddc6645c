"""One generation job, as a plain function: reference pose, retargeting, prompt embeddings,
sampling and the output files (``run_job``), next to the pipeline it runs on, built once per
process (``load_pipeline``). The generate flow wraps it in a Prefect task (tasks/generate.py);
a notebook calls it directly:

    ws = Workspace(Path("workspace"))
    spec = JobSpec(reference=ref_png, poses=poses_npz, masks=masks_npz, reference_poses=ref_npz, steps=2, num_frames=9)
    result = run_job(spec, spec.poses, spec.masks, PoseConfig(), (), ws, out_dir=Path("out"))  # pose files: DWPose's
    result.timings, sorted(Path("out").iterdir())  # video.mp4, preview.mp4, preview.png

Memory (docs/memory.md): the pipeline is built once per process and model (loading the real
one takes minutes), with the LoRA merged into the base once, not per job: unmerging from a
bf16 base rounds its weights, so merging and unmerging around every job would make a job's
video depend on how many jobs ran before it in the process (and cost a merge per job). The
offload mode is ``SamplingConfig.offload``; its default "none" becomes "model", then
"group", when the GPU cannot hold every network (``choose_offload``; logged). VAE tiling is
on for the real profile unless ``vae_tiling`` says otherwise (the pipeline's default).

Time limit: a job runs in the caller's own thread, next to the loaded model, and stops
itself at a deadline checked between its stages and after every denoising step
(``JobTimeout``). Killing a child process instead would also kill the model it holds
(minutes to load again for the real profile); an exception thrown into the thread from
outside (Prefect's task timeout) cannot interrupt a running kernel and may land anywhere,
e.g. in a half-written file. At most one denoising step runs past the limit; the stages that
run untrusted decoders (ffmpeg) have their own timeouts in child processes. The model's
load, once per batch, is not charged to the job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from data_schemas.config import PoseConfig
from data_schemas.job import GenerationResult, JobSpec, JobTimeout
from data_schemas.model import ModelConfig
from data_schemas.workspace import Workspace
from model.components import build_components
from model.conditions import labels_from_masks
from model.pipeline import (
    Conditions,
    DegenerateOutputError,
    MultiAnimatePipeline,
    Offload,
    SamplingConfig,
    choose_offload,
    write_outputs,
)
from model.text_cache import EmbeddingCache, ensure_cached
from model.text_encoder import WAN_NEGATIVE_PROMPT, default_caption, profile_encoder_id
from preprocess import retarget

Logger = logging.Logger | logging.LoggerAdapter

# UMT5-XXL's encoder in bf16 (5.7 B parameters) and its activations: what encoding a new
# prompt needs on the GPU
TEXT_ENCODER_BYTES = 12 * 2**30

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


class Deadline:
    """A job's time limit, checked at its step boundaries (see the module's docstring)."""

    def __init__(self, job_id: str, seconds: float):
        self.job_id, self.seconds = job_id, seconds
        self.end = time.monotonic() + seconds

    def extend(self, seconds: float) -> None:
        self.end += seconds

    def check(self, where: str) -> None:
        if time.monotonic() > self.end:
            raise JobTimeout(
                f"job {self.job_id} ran over its time limit of {self.seconds:g} s (generate.job_timeout_s) "
                f"and was stopped {where}"
            )

    def on_step(self, step: int, steps: int) -> None:
        self.check(f"after denoising step {step}/{steps}")


def check_video(frames) -> None:
    """A video of one value everywhere is no animation (e.g. the clamp of a saturated guidance)."""
    if frames.size and frames.min() == frames.max():
        raise DegenerateOutputError(
            f"every pixel of the generated video is {int(frames.min())}: a degenerate output, not written"
        )


@dataclass
class LoadedPipeline:
    pipe: MultiAnimatePipeline
    offload: Offload  # the mode its jobs run with
    note: str | None  # why the offload differs from the one asked for


_loaded: dict[tuple, LoadedPipeline] = {}  # at most one: the last model's


def load_pipeline(model: ModelConfig, memory: SamplingConfig) -> LoadedPipeline:
    """The pipeline of ``model`` for ``memory``'s offload and LoRA options, built once per
    process. Without offload the networks go to the GPU before the LoRA is merged (merging into
    16 B weights is fast there); with it they stay on the CPU, where the merge happens."""
    key = (model, memory.offload, memory.merge_lora)
    if key in _loaded:
        return _loaded[key]
    _loaded.clear()  # one model in memory at a time
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    components = build_components(model)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    offload, note = memory.offload, None
    if device.type == "cuda" and offload == "none":
        offload, why = choose_offload(components, torch.cuda.get_device_properties(device).total_memory)
        note = why if offload != "none" else None
    if offload == "none":
        components.to(device)
    if memory.merge_lora and components.dit.has_lora:
        components.dit.merge_lora()
    _loaded[key] = LoadedPipeline(MultiAnimatePipeline(components, device=device), offload, note)
    return _loaded[key]


def release_pipeline() -> None:
    """Drop the resident pipeline and the GPU memory it held (a Dask worker closing)."""
    _loaded.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def job_sampling(spec: JobSpec, memory: SamplingConfig, offload: Offload) -> SamplingConfig:
    """The job's sampling: steps, guidance and seed from the spec, memory options from
    ``memory`` with the offload mode the pipeline was loaded for."""
    job = dict(steps=spec.steps, guidance_scale=spec.guidance_scale, seed=spec.seed, offload=offload, progress=False)
    return SamplingConfig(**memory.model_dump() | job)


def _make_room_for_text_encoder(logger: Logger) -> None:
    """A resident pipeline (offload "none") and UMT5-XXL may not fit on the GPU together:
    then the pipeline's networks go to the CPU while a prompt is encoded (its next call
    moves them back), instead of failing out of memory."""
    if not torch.cuda.is_available() or not _loaded:
        return
    free, _ = torch.cuda.mem_get_info()
    if free >= TEXT_ENCODER_BYTES:
        return
    for loaded in _loaded.values():
        if loaded.offload == "none":
            loaded.pipe.c.to("cpu")
    torch.cuda.empty_cache()
    free_gib = free / 2**30
    logger.info("moved the loaded pipeline to the CPU while the text encoder runs (%.1f GiB were free)", free_gib)


def prompt_embeddings(
    workspace: Workspace | Path, model: ModelConfig, prompt: str, logger: Logger | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) embeddings [512, D] from the workspace cache; the profile's
    text encoder is loaded (and released) only when one of them is missing."""
    folder = Workspace.of(workspace).embeddings
    encoder_id = profile_encoder_id(model.profile, model.wan_folder)
    make_room = None if model.profile == "tiny" else lambda: _make_room_for_text_encoder(logger or _log)
    ensure_cached(
        folder,
        model.profile,
        model.wan_folder,
        [prompt, WAN_NEGATIVE_PROMPT],
        before_load=make_room,
        encoder_id=encoder_id,
    )
    cache = EmbeddingCache(folder, encoder_id)
    return cache.get(prompt), cache.get(WAN_NEGATIVE_PROMPT)


def run_job(
    spec: JobSpec,
    poses: Path,
    masks: Path,
    pose_config: PoseConfig,
    pose_files: tuple[Path, Path] | tuple[()],
    workspace: Workspace | Path,
    out_dir: Path,
    timeout_s: float = math.inf,
    memory: SamplingConfig | None = None,
    logger: Logger | None = None,
) -> GenerationResult:
    """Reference pose, retargeting, prompt embeddings, sampling, outputs of one job, written
    into ``out_dir`` (the generate flow's staging folder: it publishes the folder as
    ``outputs/<job_id>/`` with job.json after this; the result's ``outputs`` name those
    published paths). ``poses``/``masks``: the driving clip's npz files (the spec's own, or
    the preprocessing stages' products of its driving video). ``pose_files``: DWPose's
    detector and pose model, used only when the spec has no ``reference_poses``.

    Stopped with ``JobTimeout`` once past ``timeout_s``; NaN/inf latents or a constant video
    raise ``DegenerateOutputError``. ``memory``: offload, VAE tiling, LoRA merging and step
    cache (its steps, guidance and seed are the spec's). The prompt's embeddings are cached
    under the workspace's embeddings/ (encoded there first when missing)."""
    logger = logger or _log
    ws = Workspace.of(workspace)
    job_id = spec.job_id
    memory = memory or SamplingConfig()
    deadline = Deadline(job_id, timeout_s)
    timings: dict[str, float] = {}
    with _timed(timings, "reference_pose_s"):
        image = retarget.read_reference_image(spec.reference)
        if spec.reference_poses is not None:
            ref_kp, ref_scores = retarget.load_reference_poses(spec.reference_poses)
        else:
            ref_kp, ref_scores = retarget.detect_reference_poses(image, pose_config, pose_files)
    deadline.check("after the reference pose")
    with _timed(timings, "retarget_s"):
        driving = retarget.load_driving(poses, masks, spec.num_frames)
        try:
            inputs = retarget.prepare_inputs(
                driving,
                ref_kp,
                ref_scores,
                (image.shape[1], image.shape[0]),
                (spec.width, spec.height),
                spec.person_map,
                pose_config.style,
                pose_config.keypoint_threshold,
            )
        except ValueError as exc:  # persons that do not match: name both sides
            raise ValueError(
                f"{spec.reference} driven by {spec.driving_video or poses} (first {spec.num_frames} frames): {exc}"
            ) from exc
        labels = labels_from_masks(inputs.masks).numpy()
    deadline.check("after retargeting")
    num_persons = len(inputs.person_map)
    prompt = spec.prompt if spec.prompt is not None else default_caption(num_persons)
    with _timed(timings, "embeddings_s"):
        text, negative = prompt_embeddings(ws, spec.model, prompt, logger)
    deadline.check("after the prompt embeddings")
    with _timed(timings, "load_model_s"):
        loaded = load_pipeline(spec.model, memory)
    deadline.extend(timings["load_model_s"])  # loaded once for the batch: not the job's time
    if loaded.note:
        logger.info("%s: %s", job_id, loaded.note)
    sampling = job_sampling(spec, memory, loaded.offload)
    cond = Conditions(
        ref_image=image,
        pose=inputs.pose,
        ref_pose=inputs.ref_pose,
        labels=labels,
        prompt_embeds=text,
        negative_embeds=negative,
        num_persons=num_persons,
    )
    result = loaded.pipe(cond, sampling, on_step=deadline.on_step)
    check_video(result.frames)
    deadline.check("after decoding")
    timings |= {k: round(v, 3) for k, v in result.timings.items()}
    with _timed(timings, "write_s"):
        paths = write_outputs(result.frames, cond, Path(out_dir), spec.fps)
    logger.info(
        "%s: %d person(s) %s, offload=%s, %s", job_id, num_persons, inputs.person_map, sampling.offload, timings
    )
    return GenerationResult(
        outputs={
            name: ws.relative(ws.output(job_id) / Path(path).name) for name, path in paths.items()
        },  # where they are published
        timings=timings,
        num_persons=num_persons,
        person_map=inputs.person_map,
        prompt=prompt,
    )
