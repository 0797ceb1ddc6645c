"""The fixed cost of a run: the CLI and the preprocess flow load no model library until a
stage runs its model (a rerun whose stages are cached never does)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.cli import cli_env

HEAVY = ("torch", "torchvision", "onnxruntime", "scipy", "matplotlib", "diffusers", "transformers")


def test_cli_and_preprocess_flow_import_no_model_library(tmp_path):
    code = (
        "import json, sys\n"
        "import flows.cli, flows.preprocess, flows.stages, tasks.pose, tasks.segment\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=cli_env(PREFECT_HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
