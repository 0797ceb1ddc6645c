"""The fault catalogue, injected: every case of bench/fault_cases/<area>.py run in a fresh
temporary folder, on the real CLI and stages (real ffmpeg, Prefect, torchrun, tars).

    .venv/bin/python bench/faults.py [AREA ...]     # areas: shards ingest generate train runtime

A "fault" case injects a failure (disk full, SIGKILL, a transient probe error, ...) and
survives when the products are consistent and nothing is lost after it and a rerun; a
"hostile" case feeds a crafted input (a path outside the roots, a header claiming 2^62
bytes, a pickle that runs code, ...) and is refused when it stops with a clear error in
bounded time. A case that raises counts as neither.

Prints one line per case, then last ``faults_survived: k/n`` and
``hostile_inputs_refused: k/n``."""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AREAS = ("shards", "ingest", "generate", "train", "runtime")


def run_case(function) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="fault-") as tmp:
        try:
            ok, detail = function(Path(tmp))
        except Exception as exc:
            return False, f"raised {type(exc).__name__}: {exc}"
    return bool(ok), detail


def main(areas: list[str]) -> None:
    tally = {"fault": [0, 0], "hostile": [0, 0]}
    for area in areas:
        module = importlib.import_module(f"bench.fault_cases.{area}")
        for name, kind, function in module.CASES:
            start = time.perf_counter()
            ok, detail = run_case(function)
            tally[kind][0] += ok
            tally[kind][1] += 1
            verdict = ("survived" if ok else "LOST") if kind == "fault" else ("refused" if ok else "ACCEPTED")
            print(f"[{area}] {name}: {verdict} ({time.perf_counter() - start:.1f} s) - {detail}", flush=True)
    print(f"faults_survived: {tally['fault'][0]}/{tally['fault'][1]}")
    print(f"hostile_inputs_refused: {tally['hostile'][0]}/{tally['hostile'][1]}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(AREAS))
