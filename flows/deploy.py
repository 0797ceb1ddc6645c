"""Set up a Prefect server for the pipeline and deploy its flows from ``prefect.yaml``.

    multianimate deploy            # against PREFECT_API_URL (a running `prefect server start`)

Creates the process work pools ``cpu`` and ``gpu`` when missing, the task concurrency limit
of the ``gpu`` tag (one GPU task at a time per limit slot; ``--gpu-slots`` for more GPUs), and
runs ``prefect --no-prompt deploy --all`` in the project folder, so that process workers run
the flows from this checkout (``prefect worker start --pool gpu``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tasks.common import GPU_TAG

PROJECT_DIR = Path(__file__).resolve().parents[1]
WORK_POOLS = ("cpu", "gpu")


async def _ensure_pools_and_limit(gpu_slots: int) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    done = []
    async with get_client() as client:
        for pool in WORK_POOLS:
            try:
                await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                done.append(f"work pool {pool} created")
            except ObjectAlreadyExists:
                done.append(f"work pool {pool} exists")
        done.append(await set_gpu_limit(client, gpu_slots))
    return done


async def set_gpu_limit(client, gpu_slots: int) -> str:
    """At most ``gpu_slots`` task runs tagged ``gpu`` run at once, across every flow run that
    reports to this server (the task engine takes a slot of the limit ``tag:gpu`` before it
    starts one, and waits while none is free); creating it again updates the slot count."""
    await client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=gpu_slots)
    return f"concurrency limit of tag {GPU_TAG!r}: {gpu_slots}"


def deploy(gpu_slots: int = 1) -> list[str]:
    """Pools, the gpu limit, then every deployment of prefect.yaml. Needs PREFECT_API_URL."""
    import anyio
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ValueError(
            "PREFECT_API_URL is not set: start a server (prefect server start) and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    done = anyio.run(_ensure_pools_and_limit, gpu_slots)
    env = dict(os.environ, MULTIANIMATE_HOME=str(PROJECT_DIR))
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    proc = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    done.append("deployments: preprocess, embed, train, generate, evaluate (prefect.yaml)")
    return done
