"""The prompt-embedding cache writes the same bytes for the same texts in every process."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
FILL = """
import sys
from pathlib import Path
from model.text_cache import fill_cache
from model.text_encoder import build_tiny_text_encoder
fill_cache(Path(sys.argv[1]), build_tiny_text_encoder(), ["two persons are dancing", "one person walks", "a crowd"])
"""


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_entries_are_the_same_bytes_across_processes(tmp_path):
    # safetensors writes its metadata in hash-map order, seeded per process: three texts in
    # three separate processes would give differing headers without the sorted rewrite
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", FILL, str(tmp_path / name)], check=True, cwd=REPO)
    first = _digests(tmp_path / "a")
    assert len(first) == 3
    assert _digests(tmp_path / "b") == first and _digests(tmp_path / "c") == first
    for entry in (tmp_path / "a").glob("*.safetensors"):
        data = entry.read_bytes()
        size = int.from_bytes(data[:8], "little")
        assert size % 8 == 0 and data[8 : 8 + size].startswith(b'{"__metadata__":{"encoder_id":')
        with safe_open(str(entry), "pt") as f:
            assert set(f.metadata()) == {"encoder_id", "text", "num_tokens"}
