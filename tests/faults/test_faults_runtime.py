"""The runtime under faults: the cause of a failure on one line, exit codes, one run per
workspace, result files that hold no code, and the gpu concurrency limit at work.

The command-line cases are bench/fault_cases/runtime.py's (one home for each injection);
these tests run them against the session's Prefect API where the workspace's own database
is not the point, and check more."""

from __future__ import annotations

import base64
import errno
import json
import os
import pickle
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.fault_cases import runtime as cases
from data_schemas.workspace import Workspace
from flows import runtime
from tasks.common import foreign_result, remove_foreign_results, remove_incomplete_results
from tests.helpers.cli import cli_env, temp_files

# ---- the cause on one line -------------------------------------------------------------------


def _raised(exc: BaseException, *wrappers: BaseException) -> BaseException:
    """``exc`` raised, then each wrapper raised while handling the one before (as the
    Prefect client wraps a server error)."""
    try:
        try:
            raise exc
        except BaseException as inner:
            current = inner
            for wrapper in wrappers:
                try:
                    raise wrapper from current
                except BaseException as outer:
                    current = outer
            raise current
    except BaseException as top:
        return top


def test_the_cause_is_the_os_error_at_the_root_of_the_chain(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_current_workspace", tmp_path)
    full = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    line = runtime.failure_cause(
        _raised(full, RuntimeError("500 Internal Server Error"), RuntimeError("flow run failed"))
    )
    assert line.startswith("No space left on device [ENOSPC]") and "Error writing bytes" in line and "\n" not in line
    group = ExceptionGroup(
        "tasks",
        [ValueError("a.mp4: fine"), FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/b.mp4")],
    )
    assert runtime.failure_cause(group) == "No such file or directory [ENOENT]: /x/b.mp4"
    # SQLite and some C++ libraries drop the errno: their words still name a full disk
    assert runtime.failure_cause(RuntimeError("(sqlite3.OperationalError) database or disk is full")).startswith(
        "No space left on device"
    )
    assert (
        runtime.failure_cause(ValueError("/in/a.mp4: not a folder\n  (see --help)"))
        == "/in/a.mp4: not a folder (see --help)"
    )


def test_a_failing_disk_is_named_when_the_chain_only_holds_the_api_error(tmp_path, monkeypatch):
    """The issue's case: the temporary server's database could not be written, so the
    command only sees "500 Internal Server Error"; a test write into the workspace meets
    the real error. A file size limit gives a real kernel error (EFBIG) without root."""
    import httpx

    monkeypatch.setattr(runtime, "_current_workspace", tmp_path)
    request = httpx.Request("POST", "http://127.0.0.1:8000/api/flow_runs/1/set_state")
    api_error = httpx.HTTPStatusError(
        "Server error '500 Internal Server Error'", request=request, response=httpx.Response(500, request=request)
    )
    assert runtime.failure_cause(api_error) == (
        "the Prefect API answered 500 Internal Server Error (POST /api/flow_runs/1/set_state); "
        "the server's own error is in its log above"
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (runtime.PROBE_BYTES // 2, hard))
    try:
        line = runtime.failure_cause(api_error)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (
        line
        == f"File too large [EFBIG] writing under {tmp_path} (the run failed with: the Prefect API answered 500 Internal Server Error (POST /api/flow_runs/1/set_state))"
    )
    assert temp_files(tmp_path) == []  # the probe cleans up after itself


def test_a_verb_on_a_disk_that_takes_no_writes_stops_before_prefect_starts(tmp_path):
    """A write test at the start names the disk's error at once (a file size limit gives a
    real EFBIG without root), instead of a temporary server retrying its migration."""
    folder = cases.make_videos(tmp_path / "in", 1)
    limit = runtime.PROBE_BYTES // 4
    done = subprocess.run(
        [*cases.CLI, "ingest", str(folder), "-w", str(tmp_path / "ws")],
        env=cli_env(),
        cwd=cases.REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert cases.last_line(done.stderr) == f"error: File too large [EFBIG]: {tmp_path / 'ws'}"
    assert "temporary server" not in done.stderr and temp_files(tmp_path / "ws") == []


def test_the_temporary_server_gets_minutes_to_start_unless_the_user_said_otherwise(tmp_path):
    show = (
        "from flows.runtime import use_workspace; use_workspace('ws'); from prefect.settings import "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; print(s.value())"
    )
    for extra, expected in (
        ({}, str(runtime.SERVER_STARTUP_TIMEOUT_S)),
        ({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "45"}, "45"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", show], env=cli_env(**extra), cwd=tmp_path, capture_output=True, text=True
        )
        assert done.stdout.strip() == expected, done.stderr[-2000:]


# ---- result files: JSON, and nothing else is decoded -----------------------------------------


def _json_record(tmp_path: Path) -> Path:
    """A result file as our tasks write it: Prefect's record, JSON serializer, one of our records."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer

    from data_schemas.shard import ShardSummary

    summary = ShardSummary(
        num_samples=2,
        shards=("shards/train-000000.tar",),
        num_train=2,
        num_val=0,
        index="shards/index.parquet",
        set_dir="shard-sets/x",
    )
    path = tmp_path / "results" / "shards-key"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = ResultRecord(
        metadata=ResultRecordMetadata(storage_key=str(path), serializer=JSONSerializer()), result=summary
    )
    path.write_bytes(record.serialize())
    assert ResultRecord.deserialize(path.read_bytes()).result == summary  # Prefect reads it back as our record
    return path


def test_only_our_json_records_pass_the_result_gate(tmp_path):
    from prefect._internal.result_records import ResultRecord

    genuine = _json_record(tmp_path)
    assert foreign_result(genuine) is None
    record = json.loads(genuine.read_text())

    def variant(name: str, change) -> Path:
        data = json.loads(json.dumps(record))
        change(data)
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return path

    marker = tmp_path / "code-ran"
    planted = tmp_path / "pickled"
    cases.plant_pickle_result(genuine.rename(planted), marker)
    # Prefect decodes a file with the serializer the file names: this is what the gate stops
    ResultRecord.deserialize(planted.read_bytes())
    assert marker.exists()
    marker.unlink()
    assert "serializer 'pickle'" in foreign_result(planted)
    inner = json.loads(record["result"])
    for path, why in (
        (variant("jsonlib", lambda d: d["metadata"]["serializer"].update(jsonlib="pickle")), "not our JSON serializer"),
        (
            variant("decoder", lambda d: d["metadata"]["serializer"].update(object_decoder="os.system")),
            "not our JSON serializer",
        ),
        (
            variant("class", lambda d: d.update(result=json.dumps(inner | {"__class__": "subprocess.Popen"}))),
            "'subprocess.Popen'",
        ),
        (
            variant(
                "nested",
                lambda d: d.update(
                    result=json.dumps(
                        {"__class__": inner["__class__"], "data": {"x": {"__class__": "os.system", "data": 1}}}
                    )
                ),
            ),
            "'os.system'",
        ),
        (
            variant(
                "exception", lambda d: d.update(result=json.dumps({"__exc_type__": "builtins.OSError", "message": "x"}))
            ),
            "exception",
        ),
        (variant("extra", lambda d: d.update(code="x")), "not a Prefect result record"),
    ):
        assert why in foreign_result(path), (path.name, foreign_result(path))
    (tmp_path / "cut").write_bytes(json.dumps(record).encode()[:100])
    assert "not a complete JSON record" in foreign_result(tmp_path / "cut")
    (tmp_path / "link").symlink_to("/etc/hostname")
    assert "symlink" in foreign_result(tmp_path / "link")
    assert not marker.exists()


def test_a_planted_result_at_a_cache_key_is_removed_before_prefect_reads_it(tmp_path):
    from data_schemas import IngestConfig
    from tasks.common import result_storage
    from tasks.ingest import _ingest_cache_key, ingest_video

    arguments = (tmp_path / "a.mp4", "ab" * 32, IngestConfig(), tmp_path)
    key = _ingest_cache_key(None, dict(zip(("path", "sha256", "config", "workspace"), arguments)))
    planted = result_storage(tmp_path) / key
    planted.parent.mkdir(parents=True)
    planted.write_text(
        json.dumps(
            {
                "metadata": {"serializer": {"type": "pickle", "picklelib": "pickle"}},
                "result": base64.b64encode(pickle.dumps(print)).decode(),
            }
        )
    )
    (result_storage(tmp_path) / "0a1b2c").write_text(
        '{"metadata": {"stora'
    )  # a failure record cut short by a full disk
    assert remove_foreign_results(ingest_video, tmp_path, [arguments]) == [
        (planted, "written with serializer 'pickle', not our JSON serializer")
    ]
    assert not planted.exists()
    assert remove_incomplete_results(tmp_path) == [result_storage(tmp_path) / "0a1b2c"]


@pytest.mark.slow
def test_a_planted_pickle_never_runs_and_all_broken_inputs_exit_non_zero(tmp_path, prefect_api):
    """Two CLI runs over a folder of only broken files: each exits 1 with a last line that
    counts the reasons; between them a result file is replaced by a pickle that would create
    a file: the second run removes it (a warning names it) and computes it again, as JSON."""
    run = cases.run_planted_pickle(tmp_path, prefect_api)
    for done in (run["first"], run["second"]):
        line = cases.last_line(done.stderr)
        assert done.returncode == 1, done.stderr[-3000:]
        assert line.startswith(
            f"error: all 3 input file(s) under {tmp_path / 'in'} failed (2 not_a_video, 1 undecodable); e.g. "
        ), line
        assert line.endswith(f"every file's reason: {Workspace(run['workspace']).videos_manifest}")
    assert not run["code_ran"]
    assert f"removed {run['planted']}: written with serializer 'pickle'" in run["second"].stderr
    assert foreign_result(run["planted"]) is None
    for path in Workspace(run["workspace"]).results.iterdir():  # every result is our JSON, no pickle anywhere
        record = json.loads(path.read_text())
        assert record["metadata"]["serializer"]["type"] == "json" and json.loads(record["result"])[
            "__class__"
        ].startswith("preprocess.")


# ---- one run per workspace -------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from flows.runtime import workspace_lock
with workspace_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_workspace_lock_refuses_or_waits_and_is_reentrant(tmp_path):
    with runtime.workspace_lock(tmp_path), runtime.workspace_lock(tmp_path):  # a verb, then its flow, in one process
        assert Workspace(tmp_path).lock in tmp_path.iterdir()
    env = os.environ | {"PYTHONPATH": str(cases.REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "3"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    with (
        pytest.raises(
            runtime.WorkspaceBusy,
            match=rf"in use by pid {holder.pid} on .* \(.*-c {tmp_path} 3\), since .* pass --wait",
        ),
        runtime.workspace_lock(tmp_path),
    ):
        pass
    start = time.monotonic()
    with runtime.workspace_lock(tmp_path, wait=True):  # queued until the holder let go, 3 s after it took it
        assert time.monotonic() - start > 1 and runtime.lock_holder(tmp_path).startswith(f"pid {os.getpid()} on ")
    holder.wait()
    killed = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "60"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert killed.stdout.readline() == "held\n"
    killed.kill()  # a SIGKILLed holder leaves no stale lock
    killed.wait()
    with runtime.workspace_lock(tmp_path):
        pass


@pytest.mark.slow
def test_a_second_run_on_a_workspace_is_refused_and_a_waiting_one_runs_after(tmp_path, prefect_api):
    run = cases.run_concurrent(tmp_path, prefect_api)
    second = run["second"]
    assert second.returncode == 75, second.stderr[-3000:]
    line = cases.last_line(second.stderr)
    assert line.startswith(f"error: workspace {run['workspace']} is in use by pid {run['first_pid']} on ")
    assert f"(multianimate ingest {run['folder']} -w {run['workspace']})" in line and "pass --wait" in line
    assert second.stdout.strip() == ""  # it did nothing
    assert run["first"] == 0, run["first_out"][-3000:]
    assert run["third"] == 0, run["third_out"][-3000:]
    assert f"waiting for workspace {run['workspace']}: in use by pid {run['first_pid']}" in run["third_out"]
    assert run["third_after_first"]
    assert cases.ingest_problems(run["workspace"], run["folder"]) == []


# ---- disk full, on the real command line ------------------------------------------------------


@pytest.mark.slow
def test_disk_full_mid_run_names_enospc_on_the_last_line_and_a_rerun_completes(tmp_path):
    """The disk fills up once the ingest flow has begun (every writer of the run: the
    temporary server's SQLite, ffmpeg, Arrow): the last line names ENOSPC, not the API's
    500; with space freed, the rerun completes and every product is consistent."""
    if cases.build_enospc(tmp_path / "probe-lib") is None:
        pytest.skip("no C compiler to build the full-disk injection")
    run = cases.run_disk_full(tmp_path)
    line = cases.last_line(run["stderr"])
    assert run["code"] == 1, run["stderr"][-3000:]
    assert line.startswith("error: No space left on device [ENOSPC]"), line
    assert run["rerun"].returncode == 0, run["rerun"].stderr[-3000:]
    assert cases.ingest_problems(run["workspace"], run["folder"]) == []


# ---- the gpu concurrency limit ------------------------------------------------------------------


def test_the_gpu_limit_makes_a_third_run_wait_for_a_slot(prefect_api):
    """``multianimate deploy``'s limit on the gpu tag, with 2 slots, against a real server:
    three flow runs, each with one gpu-tagged task that holds its slot for a while, started
    together: two gpu sections overlap (so the timing would show a third), and the third
    begins only after one of them has ended."""
    import anyio
    from prefect import flow, get_client, task

    from flows.deploy import set_gpu_limit
    from tasks.common import GPU_TAG

    sections: list[tuple[float, float]] = []
    state = {"inside": 0, "most": 0, "started": 0}
    changed = threading.Condition()

    @task(tags=[GPU_TAG])
    def gpu_section(seconds: float) -> None:
        # The first two hold their slots until both are inside (flow start-up is slow on a
        # loaded machine), then for a while longer: time in which a third would get in if
        # the limit let it. Timing alone would not show overlap under load.
        with changed:
            state["inside"] += 1
            state["started"] += 1
            state["most"] = max(state["most"], state["inside"])
            changed.notify_all()
            start, order = time.monotonic(), state["started"]
            if order <= 2:
                changed.wait_for(lambda: state["inside"] >= 2, timeout=60)
                changed.wait_for(lambda: state["inside"] >= 3, timeout=seconds)
            state["inside"] -= 1
            changed.notify_all()
        sections.append((start, time.monotonic()))

    @flow
    def one_run(seconds: float) -> None:
        gpu_section(seconds)

    async def limit(slots: int | None) -> None:
        async with get_client() as client:
            if slots is None:
                await client.delete_concurrency_limit_by_tag(GPU_TAG)
            else:
                await set_gpu_limit(client, slots)

    anyio.run(limit, 2)
    try:
        runs = [threading.Thread(target=one_run, args=(6.0,)) for _ in range(3)]
        for run in runs:
            run.start()
        for run in runs:
            run.join(120)
    finally:
        anyio.run(limit, None)
    assert len(sections) == 3
    sections.sort()
    assert state["most"] == 2, (state, sections)
    assert sections[2][0] >= min(end for _, end in sections[:2]) - 0.05, sections
