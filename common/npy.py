"""Arrays in .npz archives without loading them: names, shapes, dtypes, rows in batches, row chunks.

`np.load` of an .npz is lazy per key but reads a whole array at once; these helpers read the .npy
headers inside the zip and stream an array's rows a batch at a time, so memory stays bounded by one
batch (np.savez and np.savez_compressed alike). Object arrays are refused: loading them runs pickle.
"""

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from common import atomic
from common.errors import InputError, require


def npz_keys(path) -> list[str]:
    """The array names in an .npz archive (np.load of an .npz reads nothing until a key is used)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        archive = None
    require(
        isinstance(archive, np.lib.npyio.NpzFile),
        path,
        "not a readable .npz archive",
        "a data.npz written by np.savez",
    )
    with archive:
        return list(archive.files)


def npz_array_header(path, key: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of `key` in the .npz without reading its data."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        shape, _, dtype = read_npy_header(path, key, member)
    return shape, dtype


def read_npy_header(path, key: str, member) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open .npy member; object arrays are refused (pickle)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise InputError(path, f"'{key}' uses .npy format version {version}", "version 1.0 or 2.0 (np.savez)")
    require(
        not dtype.hasobject,
        path,
        f"'{key}' holds Python objects (loading them would run pickle)",
        "a numeric image array",
    )
    return shape, fortran_order, dtype


def iter_npz_batches(path, key: str, batch_size: int, first: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, images) batches of `key` from sample `first` on, read straight from the archive,
    so memory stays bounded by one batch whatever N is (np.savez and np.savez_compressed alike)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        shape, fortran_order, dtype = read_npy_header(path, key, member)
        if fortran_order:
            # Column-major data cannot be cut into samples while streaming: read the array once.
            with np.load(path, allow_pickle=False) as npz:
                images = np.ascontiguousarray(npz[key])
            for start in range(first, shape[0], batch_size):
                yield start, images[start : start + batch_size]
            return
        sample_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for skipped in range(0, first, batch_size):
            # Zip members are read sequentially: step over the rows already embedded, a batch at a time.
            member.read(min(batch_size, first - skipped) * sample_bytes)
        for start in range(first, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            buffer = member.read(count * sample_bytes)
            require(
                len(buffer) == count * sample_bytes,
                path,
                f"'{key}' is truncated at sample {start}",
                f"{shape[0]} complete samples",
            )
            yield start, np.frombuffer(buffer, dtype=dtype).reshape((count, *shape[1:]))


def value_range(data_path, image_key: str, batch_size: int) -> tuple[float, float]:
    """One streaming pass over an array: its global min and max; a non-finite sample is an InputError."""
    low, high = np.inf, -np.inf
    for start, images in iter_npz_batches(data_path, image_key, batch_size):
        if images.dtype.kind == "f":
            finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
            first_bad = start + int(np.argmin(finite))
            require(
                finite.all(),
                data_path,
                f"'{image_key}' sample {first_bad} contains NaN or Inf",
                "finite pixels",
            )
        low, high = min(low, float(images.min())), max(high, float(images.max()))
    return low, high


def save_row_chunk(folder, first: int, rows: np.ndarray) -> Path:
    """Save `rows` (the rows from `first` on) as `<folder>/rows_<first>_<end>.npy`, atomically."""
    path = Path(folder) / f"rows_{first:09d}_{first + len(rows):09d}.npy"
    atomic.save_npy(path, rows)
    return path


def load_row_chunks(folder) -> list[np.ndarray]:
    """The `rows_<first>_<end>.npy` chunks of `folder` in order; a gap or a wrong length is an InputError."""
    chunks, next_row = [], 0
    for chunk_file in sorted(Path(folder).glob("rows_*.npy")):
        first, end = (int(part) for part in chunk_file.stem.split("_")[1:])
        chunk = np.load(chunk_file, allow_pickle=False)
        require(
            first == next_row and chunk.shape[0] == end - first,
            chunk_file,
            f"chunk does not continue at row {next_row}",
            "contiguous checkpoint chunks (--overwrite to start over)",
        )
        chunks.append(chunk)
        next_row = end
    return chunks
