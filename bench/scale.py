"""What a run costs besides its work, and how that grows with the number of clips (CPU).

* noop_rerun_s: ``multianimate preprocess`` over 6 synthetic videos (two persons, 320x240,
  50 frames; the truth profile, so the first run is quick) run again when everything is
  cached: the whole command's wall time, process start to exit, against an already-running
  ``prefect server start`` (``PREFECT_API_URL``: the documented route for frequent reruns).
  Printed before it: the same rerun on Prefect's temporary server (no ``PREFECT_API_URL``),
  ``noop_rerun_temporary_server_s``, and each route's first run.
* overhead_per_clip_ms: a flow that pushes N clips through ``flows.runtime.run_cached``, a
  cached, persisted per-clip task as the stages' are, with the granularity ``run_pipeline``
  chooses (``flows.runtime.batch_size``: a task run per clip up to 1,000 clips, beyond that
  one per batch of ceil(N / 1,000) clips, each clip cached on its own). The stand-in for a
  stage's work is ``stand_in_work``: SHA-256 over 64 KiB derived from the clip id, returning
  a small record (about 0.1 ms, so what is measured is the orchestration). Overhead = (time
  from the flow's call until the server has recorded every task run as completed, or stopped
  recording any more for 60 s - the same function over the same clips in a plain loop) / N,
  at N = 10,000; also printed: until the flow returned, at 1,000 clips, and at 10,000 clips
  with a task run per clip (``batch=1``, "per-clip tasks"), the granularity before batches.
* flow_rss_growth_10k_vs_1k: peak RSS of the process that runs that flow (a fresh process
  per count, Prefect and the flow module imported, as the CLI's) at 10,000 clips over 1,000,
  with the chosen granularity; the same with per-clip tasks is printed before it.
* preprocess_2workers_vs_1: the preprocess flow (tiny random-weight models, so the stages do
  real CPU work) over 8 synthetic clips (3 s, 320x240, two persons) on a 2-worker Dask
  LocalCluster whose workers each declare resources={"GPU": 1}, over the same on 1 worker
  (wall time of the flow call, in fresh workspaces); the runner is
  ``flows.runtime.make_task_runner(dask_address=...)``. Each worker is pinned to a core of
  its own and runs one thread, as a GPU worker owns one GPU (goal <= 0.6 on 2 cores). The
  workers are started warm, as the README starts them (``--preload flows.dask_worker``: the
  stages' libraries imported as a worker starts; the cluster's start is printed, not
  counted, on both sides). The tiny DWPose is exported to ONNX files once, before any run,
  and loaded from them as real weights are. Each count runs twice, in the order 1, 2, 2, 1
  (a drift of the machine's speed weighs on both alike); the figure is the mean 2-worker
  wall over the mean 1-worker wall, each round's ratio printed before it. Also printed: the
  CPU seconds of the workers (the stages' work), of the flow's process and of the Prefect
  server recording the runs, how many cores the last two kept busy, and the 2 workers'
  CPU-bound floor: every CPU-second of their runs spread evenly over the 2 cores, over the
  1-worker wall, which no schedule can beat.
  Measured on an idle machine: before warm workers, one pair per run, 0.605, 0.701, 0.505,
  0.686 and 0.646; with warm workers (and hashing batched, the data card 0.6 s quicker),
  0.637 (rounds 0.652, 0.623), 0.717 (rounds 0.754, 0.680; floor 0.561) and 0.702 (rounds
  0.755, 0.664; floor 0.553). The 1-worker wall ranged 39.2-53.7 s, within one run as well
  (the machine's speed drifts by a third); the workers spent 30-41 CPU-s on 1 and 38-48 on 2 (the
  same work runs slower with both cores busy), the flow and the server 9-12.5 CPU-s per
  run (0.21-0.24 of a core on 1 worker, 0.32-0.33 on 2, taken from the workers on 2 cores), so the
  floor alone is ~0.56 and the serial parts (flow start, the ingest subflow's end, reports:
  ~4 s) put the reachable figure at ~0.6 on this machine. Tried and dropped: holding GPU
  tasks until a GPU is free (Dask gives a resource-restricted task to a worker as it is
  submitted, so one can wait behind a long SAM2 clip while the other GPU idles until work
  stealing moves it, ~2.7 s seen): 0.708 (0.723, 0.693), the flow's reaction to each
  finished task costing more than the idle it saved with these 0.1-2 s tasks.

Every part runs in fresh processes, against one ``prefect server start`` the benchmark starts
(its own start is not counted, except in the temporary-server figure, which includes it).

Granularity, from these figures (2 cores shared with other jobs, Prefect 3.9 with its SQLite
server): one task per clip cost the flow 11.4 ms per clip at 1,000 clips and 13.4 ms at 10,000,
and the server 58.7 ms per clip to record the task runs (it writes task states from events,
behind the flow, answering 503 meanwhile); at 10,000 clips its queue of 10,000 events
overflowed and it recorded 3,606 of the 10,000 task runs. The flow process kept 51 KiB per
task run until the flow ended (Prefect links each result to its state in the flow run's
context; the thread-pool runner keeps a cancel event per task): 225 MiB at 1,000 clips, 676
MiB at 10,000 (x3.0), some 5 GiB at 100,000. Batches of 100 clips per task (then a
stand-in with one result file per batch): 0.28 ms per clip in the flow, 0.66 ms with the
server's recording, every task run recorded, 195 MiB at 10,000 clips. So: per-clip tasks
are fine up to ~1,000 clips per flow run (the stages' work is seconds per clip); beyond, one task per batch of clips, at least clips / 1,000 per batch,
each batch skipping the clips whose results are cached (per-clip caching survives).

That is what ``flows.runtime.run_pipeline`` now does by default (``batch_size``; the batch
task is ``tasks.batch.run_batch``, which still reads and writes one result file per clip).
Measured with it (same machine): 10,000 clips in 1,000 task runs of 10 clips cost the flow
2.0 ms per clip and 3.7 ms until the server had recorded every task run (1,000 of 1,000);
flow peak RSS 194 MiB against 185 MiB at 1,000 clips (per-clip tasks there: 8.5 ms per clip
in the flow, 43.0 ms recorded), so flow_rss_growth_10k_vs_1k 1.05. Per-clip tasks on the
same 10,000 clips, in the same run: 11.1 ms per clip in the flow, the server recorded 3,613
of the 10,000 task runs before it stopped (its 23.2 ms per clip counts only those), 575 MiB
(x3.10). An earlier run, on a busier machine: 3.3 and 6.1 ms per clip, x1.10 (per-clip
tasks: 16.9 ms, 4,045 of 10,000 recorded, x2.93).

    python bench/scale.py [--part noop|overhead|dask ...] [--clips 1000 10000]

Headline figures, printed last: preprocess_2workers_vs_1 (goal <= 0.6), overhead_per_clip_ms,
flow_rss_growth_10k_vs_1k (goal <= 2), noop_rerun_s (goal <= 8).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
STAND_IN_BYTES = 64 << 10
PARTS = ("dask", "overhead", "noop")


# ---- the no-op rerun ----------------------------------------------------------------------


def make_videos(folder: Path, count: int, num_frames: int = 50) -> None:
    from preprocess.synthetic import SyntheticSpec, make_synthetic_video

    for i in range(count):
        make_synthetic_video(
            SyntheticSpec(width=320, height=240, num_frames=num_frames, num_persons=2, seed=i), folder, f"v{i}"
        )


def truth_profile(path: Path) -> Path:
    path.write_text("pose:\n  models: truth\nsegment:\n  models: truth\n")
    return path


def timed_cli(args: list[str], env: dict) -> float:
    """Wall time of one CLI command, process start to exit; fails loudly on a failed run."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"multianimate {' '.join(args)} failed: {done.stderr[-3000:]}")
    return took


def noop_rerun(tmp: Path, api_url: str) -> dict[str, float]:
    from tests.helpers.cli import cli_env

    folder = tmp / "videos"
    make_videos(folder, 6)
    profile = truth_profile(tmp / "truth.yaml")
    figures = {}
    for route, env in (("temporary_server", cli_env()), ("running_server", cli_env(api_url))):
        args = ["preprocess", str(folder), "-w", str(tmp / f"ws-{route}"), "-c", str(profile)]
        figures[f"first_run_{route}_s"] = timed_cli(args, env)
        figures[f"noop_rerun_{route}_s"] = timed_cli(args, env)
    return figures


# ---- orchestration overhead per clip ------------------------------------------------------


def stand_in_work(clip_id: str) -> dict:
    """The stand-in for a stage's work on one clip: SHA-256 of 64 KiB made from its id."""
    block = hashlib.sha256(clip_id.encode()).digest() * (STAND_IN_BYTES // 32)
    return {"clip_id": clip_id, "digest": hashlib.sha256(block).hexdigest()}


class PeakRss:
    """The process's resident memory, sampled every 50 ms while running (MiB)."""

    def __init__(self) -> None:
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def wait_until_recorded(flow_run_id, count: int, stalled_s: float = 60) -> tuple[float, int]:
    """(seconds, task runs) until the server has recorded ``count`` completed task runs of the
    flow run, or until its count stopped growing for ``stalled_s``: task states reach it as
    events, which it writes behind the flow (answering other calls 503 while it catches up)
    and drops when its queue of 10,000 events is full."""
    import httpx

    body = {
        "flow_runs": {"id": {"any_": [str(flow_run_id)]}},
        "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
    }
    start = last_change = time.perf_counter()
    seen = -1
    while True:
        try:
            answer = httpx.post(f"{os.environ['PREFECT_API_URL']}/task_runs/count", json=body, timeout=30)
            recorded = answer.json() if answer.status_code == 200 else seen
        except httpx.HTTPError:
            recorded = seen
        if recorded >= count:
            return time.perf_counter() - start, recorded
        if recorded != seen:
            seen, last_change = recorded, time.perf_counter()
        elif time.perf_counter() - last_change > stalled_s:
            return last_change - start, seen
        time.sleep(1.0)


def overhead_child(workspace: Path, clips: int, batch: int | None) -> dict:
    """In a fresh process (the CLI's set-up first): the plain loop, then the flow, with
    ``batch`` clips per task run (None: as ``run_pipeline`` chooses)."""
    from flows.runtime import use_workspace

    use_workspace(workspace)
    from prefect import flow, task

    from flows.runtime import batch_size, run_cached
    from tasks.common import retry_transient

    keys = {c: (c,) for c in (f"{i:016x}-000" for i in range(clips))}
    batch = batch or batch_size(clips)
    # As the stage tasks are declared: a cache key of the inputs, results persisted, one retry.
    stand_in = task(
        stand_in_work,
        name="stand-in",
        cache_key_fn=lambda ctx, p: f"stand-in-{p['clip_id']}",
        persist_result=True,
        retries=1,
        retry_condition_fn=retry_transient,
    )

    @flow(name="scale-stand-in")
    def stand_in_flow(keys: dict) -> int:
        outcomes = run_cached(stand_in, workspace, keys, lambda record: [], "stand-in", batch=batch)
        failed = [k for k, o in outcomes.items() if isinstance(o, BaseException)]
        if failed:
            raise RuntimeError(f"{len(failed)} stand-in task(s) failed, e.g. {outcomes[failed[0]]!r}")
        return len(outcomes)

    start = time.perf_counter()
    for args in keys.values():
        stand_in_work(*args)
    loop_s = time.perf_counter() - start
    stand_in_flow({"warm-up": keys[next(iter(keys))]})  # the first flow run's one-off costs
    rss_before = PeakRss.now()
    with PeakRss() as rss:
        start = time.perf_counter()
        state = stand_in_flow(keys, return_state=True)
        flow_s = time.perf_counter() - start
        state.result()
        tasks = -(-clips // batch)
        waited_s, recorded = wait_until_recorded(state.state_details.flow_run_id, tasks)
    return {
        "clips": clips,
        "batch": batch,
        "loop_s": loop_s,
        "flow_s": flow_s,
        "recorded_s": flow_s + waited_s,
        "tasks": tasks,
        "tasks_recorded": recorded,
        "rss_before_mib": rss_before,
        "rss_peak_mib": rss.peak,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(args: list[str], api_url: str, log: Path) -> dict:
    """``python bench/scale.py --child ...`` in a fresh process; its last stdout line is JSON."""
    from tests.helpers.cli import cli_env

    with log.open("w") as err:
        done = subprocess.run(
            [sys.executable, __file__, "--child", *args],
            env=cli_env(api_url),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    if done.returncode != 0:
        raise RuntimeError(f"bench child {args} failed (log {log}): {log.read_text()[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def overhead(tmp: Path, api_url: str, counts: list[int]) -> dict[str, dict]:
    """Each count with the chosen granularity, then the largest with per-clip tasks."""
    runs = {}
    for clips in counts:
        runs[f"{clips}"] = run_child(
            ["overhead", str(tmp / f"ws-{clips}"), str(clips), "chosen"], api_url, tmp / f"{clips}.log"
        )
        print(f"chosen granularity, {json.dumps(runs[f'{clips}'])}", flush=True)
    clips = max(counts)
    runs[f"{clips}-per-clip"] = run_child(
        ["overhead", str(tmp / f"ws-{clips}-per-clip"), str(clips), "1"], api_url, tmp / f"{clips}-per-clip.log"
    )
    print(f"per-clip tasks, {json.dumps(runs[f'{clips}-per-clip'])}", flush=True)
    return runs


# ---- 2 workers against 1 ------------------------------------------------------------------


def pin_to_core(cores: dict, dask_worker=None) -> str:
    """Run on each Dask worker (``client.run``): one core and one thread of its own, as a GPU
    worker owns one GPU."""
    import torch

    core = cores[dask_worker.address]
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return f"core {core}"


def dask_child(folder: Path, workspace: Path, workers: int, dwpose: Path) -> dict:
    from flows.runtime import use_workspace

    use_workspace(workspace)
    from distributed import Client, LocalCluster

    from data_schemas import ProjectConfig
    from preprocess.pose.onnx_models import build_tiny_models

    # DWPose from files, as a user's real weights are: the tiny models are exported once,
    # before either run (the export is a test stand-in's cost, not a run's).
    detector, pose_model = build_tiny_models(dwpose)
    config = ProjectConfig.model_validate(
        {"pose": {"models": "files", "detector_path": detector, "pose_model_path": pose_model}}
    )
    from flows.cluster import warm_workers
    from flows.preprocess import preprocess
    from flows.runtime import GPU_RESOURCE, make_task_runner

    cores = sorted(os.sched_getaffinity(0))
    started = time.perf_counter()
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            resources={GPU_RESOURCE: 1},
            host="127.0.0.1",
            dashboard_address=None,
            **warm_workers(("preprocess",)),  # warm workers, as the README starts them
        ) as cluster,
        Client(cluster) as client,
    ):
        cluster_start = time.perf_counter() - started
        addresses = sorted(client.scheduler_info()["workers"])
        client.run(pin_to_core, {a: cores[i % len(cores)] for i, a in enumerate(addresses)})
        runner = make_task_runner(dask_address=cluster.scheduler_address)
        workers_before, flow_before = sum(client.run(cpu_seconds).values()), cpu_seconds()
        start = time.perf_counter()
        summary = preprocess.with_options(task_runner=runner)(folder, workspace, config)
        took = time.perf_counter() - start
        workers_cpu, flow_cpu = sum(client.run(cpu_seconds).values()) - workers_before, cpu_seconds() - flow_before
    expected = len(list(folder.glob("*.mp4")))
    if summary.num_clips != expected or summary.num_segmented != expected or summary.failed_clips:
        raise RuntimeError(f"preprocess on {workers} worker(s) did not finish every clip: {summary}")
    return {
        "workers": workers,
        "wall_s": took,
        "cluster_start_s": cluster_start,  # workers started and warmed, before the flow
        "clips": summary.num_clips,
        "workers_cpu_s": workers_cpu,  # the stages' work (with ffmpeg's)
        "flow_cpu_s": flow_cpu,  # the flow's process: submitting, streaming shards, reports (with ffmpeg's)
    }


def cpu_seconds(dask_worker=None) -> float:
    """CPU time of this process and of the child processes it has waited for (ffmpeg)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def server_cpu_seconds(api_url: str) -> float:
    """CPU time so far of the ``prefect server start`` answering at ``api_url`` and its children."""
    import psutil

    port = api_url.split(":")[-1].split("/")[0]
    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        command = proc.info["cmdline"] or []
        if "server" in command and "--port" in command and port in command:
            for member in (proc, *proc.children(recursive=True)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    cpu = member.cpu_times()
                    total += cpu.user + cpu.system
    return total


def two_workers_vs_one(tmp: Path, api_url: str, clips: int, rounds: int = 2) -> dict[int, list[float]]:
    """Each worker count ``rounds`` times, in the order 1, 2, 2, 1 (...): a drift in the
    machine's speed during the part weighs on both counts alike. Returns the wall times."""
    folder = tmp / "videos"
    make_videos(folder, clips, num_frames=75)  # 3 s each: the stages' work outweighs the flow's fixed parts
    from preprocess.pose.onnx_models import build_tiny_models

    build_tiny_models(tmp / "dwpose")
    walls: dict[int, list[float]] = {1: [], 2: []}
    floors: list[float] = []
    order = [w for r in range(rounds) for w in ((1, 2) if r % 2 == 0 else (2, 1))]
    for run, workers in enumerate(order):
        server_before = server_cpu_seconds(api_url)
        outcome = run_child(
            ["dask", str(folder), str(tmp / f"ws-{run}"), str(workers), str(tmp / "dwpose")],
            api_url,
            tmp / f"{run}.log",
        )
        outcome["server_cpu_s"] = server_cpu_seconds(api_url) - server_before  # recording the runs
        busy = (outcome["flow_cpu_s"] + outcome["server_cpu_s"]) / outcome["wall_s"]
        print(f"flow process and Prefect server, {workers} worker(s): {busy:.2f} cores on average", flush=True)
        print(f"preprocess on {workers} worker(s): {json.dumps(outcome)}", flush=True)
        walls[workers].append(outcome["wall_s"])
        if workers == 2:  # no schedule beats every CPU-second spent spread evenly over the cores
            spent = outcome["workers_cpu_s"] + outcome["flow_cpu_s"] + outcome["server_cpu_s"]
            floors.append(spent / len(os.sched_getaffinity(0)))
    one = sum(walls[1]) / len(walls[1])
    print(
        f"2 workers' CPU-bound floor (their CPU-seconds, the flow's and the server's over "
        f"{len(os.sched_getaffinity(0))} cores) over 1 worker's wall: {sum(floors) / len(floors) / one:.3f}",
        flush=True,
    )
    return walls


# ---- main ---------------------------------------------------------------------------------


def child(argv: list[str]) -> None:
    part, *rest = argv
    if part == "overhead":
        outcome = overhead_child(Path(rest[0]), int(rest[1]), None if rest[2] == "chosen" else int(rest[2]))
    else:
        outcome = dask_child(Path(rest[0]), Path(rest[1]), int(rest[2]), Path(rest[3]))
    print(json.dumps(outcome))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="which figures to measure")
    parser.add_argument("--clips", nargs=2, type=int, default=[1000, 10000], help="the two trivial clip counts")
    parser.add_argument("--dask-clips", type=int, default=8, help="synthetic clips of the 2-vs-1 worker run")
    args = parser.parse_args()
    from tests.helpers.prefect_server import prefect_server

    print(f"{os.cpu_count()} CPU(s); each part on a fresh prefect server start of its own", flush=True)
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        for part in args.part:
            (tmp / part).mkdir()
            with prefect_server(tmp / part / "server") as url:
                if part == "dask":
                    walls = two_workers_vs_one(tmp / part, url, args.dask_clips)
                    ratios = [two / one for one, two in zip(walls[1], walls[2], strict=True)]
                    print(f"2 workers over 1, each round: {', '.join(f'{r:.3f}' for r in ratios)}")
                    mean = {w: sum(times) / len(times) for w, times in walls.items()}
                    lines.append(f"preprocess_2workers_vs_1: {mean[2] / mean[1]:.3f}")
                elif part == "overhead":
                    lines += overhead_figures(overhead(tmp / part, url, sorted(args.clips)))
                else:
                    figures = noop_rerun(tmp / part, url)
                    for name, value in figures.items():
                        if name != "noop_rerun_running_server_s":
                            print(f"{name}: {value:.2f}")
                    lines.append(f"noop_rerun_s: {figures['noop_rerun_running_server_s']:.2f}")
    for line in lines:
        print(line)


def overhead_figures(runs: dict[str, dict]) -> list[str]:
    """Prints the supporting figures; returns the two headline lines (the chosen granularity)."""
    small, large = (runs[k] for k in sorted((k for k in runs if k.isdigit()), key=int))
    per_clip = runs[f"{large['clips']}-per-clip"]

    def per_clip_ms(run: dict, until: str = "recorded_s") -> float:
        return (run[until] - run["loop_s"]) / run["clips"] * 1000

    for name, run in ((str(small["clips"]), small), (str(large["clips"]), large)):
        print(
            f"overhead_per_clip_ms_{name}: flow returned {per_clip_ms(run, 'flow_s'):.2f}, server recorded {per_clip_ms(run):.2f}"
        )
    print(
        f"per-clip tasks at {per_clip['clips']} clips: overhead_per_clip_ms flow returned "
        f"{per_clip_ms(per_clip, 'flow_s'):.2f}, server recorded {per_clip_ms(per_clip):.2f}; "
        f"flow_rss_growth_10k_vs_1k {per_clip['rss_peak_mib'] / small['rss_peak_mib']:.3f} "
        f"(peak {per_clip['rss_peak_mib']:.0f} MiB)"
    )
    for run in (small, large, per_clip):
        print(
            f"task runs the server recorded at {run['clips']} clips, batch {run['batch']}: {run['tasks_recorded']}/{run['tasks']}"
        )
    print(
        f"flow peak RSS: {small['rss_peak_mib']:.0f} MiB at {small['clips']} clips, {large['rss_peak_mib']:.0f} MiB at {large['clips']}"
    )
    return [
        f"overhead_per_clip_ms: {per_clip_ms(large):.2f}",
        f"flow_rss_growth_10k_vs_1k: {large['rss_peak_mib'] / small['rss_peak_mib']:.3f}",
    ]


if __name__ == "__main__":
    main()
