"""The workspace's layout: every folder and file a stage reads or writes, named once.

One folder holds every product (README, "The workspace"). Records store paths relative to
the workspace (``clips/<clip_id>.mp4``), so a workspace can move; ``Workspace.relative``
gives that form and ``Workspace.resolve`` turns it back into a path.

    ws = Workspace(Path("workspace"))
    ws.clip_file("a-0000")          # workspace/clips/a-0000.mp4
    ws.relative(ws.clip_file(...))  # "clips/a-0000.mp4"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_schemas.video import ClipRecord

MANIFESTS = "manifests"
CLIPS = "clips"
POSES = "poses"
MASKS = "masks"
REPORTS = "reports"
SHARDS = "shards"  # what readers open: a relative symlink to the current set
SHARD_SETS = "shard-sets"  # the sets themselves, one folder each
EMBEDDINGS = "embeddings"
RUNS = "runs"
QUEUE = "queue"
DRIVING = "driving"
OUTPUTS = "outputs"
EVALS = "evals"
SAMPLES = "samples"
PREFECT = ".prefect"
MODELS = ".models"  # tiny random-weight models built for the tiny profile
REFERENCES = "references"  # reference images of imported legacy clips
INDEX = "index.parquet"  # the index file of shards/ and embeddings/
LOCK = ".lock"  # the workspace lock (flows/runtime.py), and embeddings/ fillers' (model/text_cache.py)
CLAIMS = ".claims"  # per-job claim files of generation (data_schemas/job.py): held by the process running the job


@dataclass(frozen=True)
class Workspace:
    """Paths of one workspace. ``root`` is kept as given (relative or absolute)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, workspace: Workspace | Path | str) -> Workspace:
        """A Workspace from a Workspace or a folder path."""
        return workspace if isinstance(workspace, Workspace) else cls(Path(workspace))

    def relative(self, path: Path | str) -> str:
        """``path`` (under the workspace) as records store it: relative, with ``/``."""
        return Path(path).relative_to(self.root).as_posix()

    def resolve(self, relative: str | Path) -> Path:
        """A path a record stores (relative to the workspace) as a path to open."""
        return self.root / relative

    # -- manifests: one parquet per stage, written under manifests/.lock ---------------------
    @property
    def manifests(self) -> Path:
        return self.root / MANIFESTS

    @property
    def manifests_lock(self) -> Path:
        return self.manifests / ".lock"

    def manifest(self, name: str) -> Path:
        """``manifests/<name>.parquet``; name is one of videos, clips, poses, masks, quality."""
        return self.manifests / f"{name}.parquet"

    @property
    def videos_manifest(self) -> Path:
        return self.manifest("videos")

    @property
    def clips_manifest(self) -> Path:
        return self.manifest("clips")

    @property
    def poses_manifest(self) -> Path:
        return self.manifest("poses")

    @property
    def masks_manifest(self) -> Path:
        return self.manifest("masks")

    @property
    def quality_manifest(self) -> Path:
        return self.manifest("quality")

    # -- per-clip products -----------------------------------------------------------------
    @property
    def clips(self) -> Path:
        return self.root / CLIPS

    def clip_file(self, clip_id: str) -> Path:
        return self.clips / f"{clip_id}.mp4"

    @property
    def poses(self) -> Path:
        return self.root / POSES

    def pose_file(self, clip_id: str) -> Path:
        return self.poses / f"{clip_id}.npz"

    @property
    def masks(self) -> Path:
        return self.root / MASKS

    def mask_file(self, clip_id: str) -> Path:
        return self.masks / f"{clip_id}.npz"

    def pose_images_file(self, clip_id: str) -> Path:
        """Rendered pose images of an imported legacy clip (its poses exist only as images)."""
        return self.poses / f"{clip_id}.images.npz"

    def reference_file(self, clip_id: str) -> Path:
        """The reference image of an imported legacy clip."""
        return self.root / REFERENCES / f"{clip_id}.png"

    # -- reports ---------------------------------------------------------------------------
    @property
    def reports(self) -> Path:
        return self.root / REPORTS

    @property
    def pose_contact_sheet(self) -> Path:
        return self.reports / "pose-contact-sheet.png"

    @property
    def mask_overlays(self) -> Path:
        return self.reports / "mask-overlays.png"

    @property
    def data_card(self) -> Path:
        return self.reports / "data-card.md"

    @property
    def data_card_figures(self) -> Path:
        return self.reports / "data-card"

    # -- shards ----------------------------------------------------------------------------
    @property
    def shards(self) -> Path:
        return self.root / SHARDS

    @property
    def shard_sets(self) -> Path:
        return self.root / SHARD_SETS

    @property
    def shards_index(self) -> Path:
        return self.shards / INDEX

    # -- embeddings, training --------------------------------------------------------------
    @property
    def embeddings(self) -> Path:
        return self.root / EMBEDDINGS

    @property
    def embeddings_index(self) -> Path:
        return self.embeddings / INDEX

    @property
    def runs(self) -> Path:
        return self.root / RUNS

    def run(self, name: str) -> Path:
        return self.runs / name

    # -- generation ------------------------------------------------------------------------
    @property
    def queue(self) -> Path:
        return self.root / QUEUE

    def queue_file(self, job_id: str) -> Path:
        return self.queue / f"{job_id}.json"

    @property
    def outputs(self) -> Path:
        return self.root / OUTPUTS

    def output(self, job_id: str) -> Path:
        return self.outputs / job_id

    @property
    def driving(self) -> Path:
        return self.root / DRIVING

    @property
    def claims(self) -> Path:
        return self.root / CLAIMS

    def job_claim(self, job_id: str) -> Path:
        """The file whose flock the process running the job holds (kept: unlinking a lock file races)."""
        return self.claims / f"{job_id}.lock"

    def driving_at(self, fps: float) -> Path:
        """Driving videos' clips, poses and masks at one frame rate, apart from training clips."""
        return self.driving / f"{fps:g}fps"

    # -- evaluation, samples, tool state ----------------------------------------------------
    @property
    def evals(self) -> Path:
        return self.root / EVALS

    def eval(self, name: str) -> Path:
        return self.evals / name

    def eval_clips(self, name: str) -> Path:
        """``evals/<name>/per_clip.parquet``: one row per scored clip (and its persons)."""
        return self.eval(name) / "per_clip.parquet"

    def eval_summary(self, name: str) -> Path:
        """``evals/<name>/metrics.parquet``: the aggregates of one evaluation."""
        return self.eval(name) / "metrics.parquet"

    def eval_reference(self, name: str, clip_id: str) -> Path:
        """A held-out clip's first frame, the reference image its evaluation job animates."""
        return self.eval(name) / "references" / f"{clip_id}.png"

    def eval_preview(self, name: str) -> Path:
        """The worst and best clips of an evaluation: truth | generated | error map."""
        return self.eval(name) / "preview.png"

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def raw_samples(self) -> Path:
        """The demo's generated source videos (the folder it preprocesses)."""
        return self.samples / "raw"

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def prefect_home(self) -> Path:
        return self.root / PREFECT

    @property
    def results(self) -> Path:
        """Prefect's persisted task results (the task cache) for this workspace."""
        return self.prefect_home / "results"

    @property
    def models(self) -> Path:
        return self.root / MODELS

    @property
    def tiny_dwpose(self) -> Path:
        """The tiny profile's random-weight DWPose ONNX files, built on first use."""
        return self.models / "dwpose-tiny"


@dataclass(frozen=True)
class ClipRef:
    """One clip and the workspace that holds it and its products: the workspace itself for
    training clips, ``driving/<fps>fps`` for driving videos (same layout, kept apart)."""

    clip: ClipRecord
    workspace: Workspace

    @property
    def clip_id(self) -> str:
        return self.clip.clip_id

    @property
    def video(self) -> Path:
        return self.workspace.resolve(self.clip.path)

    @property
    def pose_file(self) -> Path:
        return self.workspace.pose_file(self.clip.clip_id)

    @property
    def mask_file(self) -> Path:
        return self.workspace.mask_file(self.clip.clip_id)
