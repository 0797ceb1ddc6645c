"""Numpy archives whose bytes depend only on their arrays, published atomically.

numpy's own ``savez`` stamps the current time into every zip entry, so two writes of the
same arrays differ; here every entry has a fixed timestamp. No pickles, ever.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from data_schemas.atomic import atomic_write_bytes


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """A compressed npz of ``arrays`` (entries sorted by name, fixed timestamps)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.asanyarray(arrays[name]), allow_pickle=False)
    return buffer.getvalue()


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    """Write ``arrays`` to ``path`` atomically; returns the file's sha256."""
    data = npz_bytes(**arrays)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an npz file (pickles refused)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
