"""Atomic writes: every output file lands under a temporary name and is renamed over the final one.

A crash therefore never leaves a half-written file that looks finished. Text, JSON, CSV, `.npy`,
`.npz`, Keras models and weights and matplotlib figures all go through `atomic_path`.
"""

import contextlib
import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np


def _suffix(path: Path) -> str:
    # Keras insists on the whole `.weights.h5` ending; other writers pick the format from the suffix.
    return ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffix); rename it over `path` on success.

    The suffix is kept because some writers pick the format from it (Keras `.h5` / `.keras` /
    `.weights.h5`, OpenCV `.png`). On an exception the temporary file is removed and `path` is left
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{_suffix(path)}", dir=path.parent
    )
    os.close(handle)
    temporary = Path(temporary)
    # mkstemp creates the file private (0600); results should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically (fsync before the rename)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_text(path, text: str) -> None:
    """Write UTF-8 text to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def to_json(data) -> str:
    """Indented, key-sorted JSON that also takes NumPy scalars and arrays and Paths."""
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(path, data) -> None:
    """Write `data` as JSON (see `to_json`) atomically."""
    write_text(path, to_json(data))


def write_csv(path, rows: Iterable[Mapping], fieldnames: list[str]) -> None:
    """Write a list of dicts as CSV in one atomic step."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text(path, buffer.getvalue())


def save_npy(path, array, allow_pickle: bool = False) -> None:
    """np.save through a temporary file. `allow_pickle` only for the paper repositories' dict files."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        np.save(file, array, allow_pickle=allow_pickle)


def save_npz(path, arrays: Mapping[str, np.ndarray], compressed: bool = False) -> None:
    """np.savez (or savez_compressed) of named arrays through a temporary file."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        (np.savez_compressed if compressed else np.savez)(file, **arrays)


def _not_the_hdf5_notice(record) -> bool:
    return "HDF5 file via `model.save()`" not in record.getMessage()


def save_keras(model, path) -> None:
    """model.save through a temporary file with the same extension (.h5 or .keras).

    Keras logs a legacy-format notice for every .h5 save; the papers' layouts need .h5, so it is muted.
    """
    if str(path).endswith(".h5"):
        absl_logger = logging.getLogger("absl")
        if _not_the_hdf5_notice not in absl_logger.filters:
            absl_logger.addFilter(_not_the_hdf5_notice)
    with atomic_path(path) as temporary:
        model.save(temporary)


def save_weights(model, path) -> None:
    """model.save_weights through a temporary `.weights.h5` file."""
    with atomic_path(path) as temporary:
        model.save_weights(temporary)


def save_figure(figure, path, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(figure)
