"""safetensors band records (BigEarthNet v2 LMDB values) -> float32 reflectance, one record or a batch.

A record is a safetensors dict of band name -> 2-D array at the band's native size. Bands not at the
model size are resampled with ConfigILM's nearest rule (BENv2DataSet: `F.interpolate(mode="nearest")`,
source index floor(i * in / out)); values become reflectance (/ 10000). `decode_value` is the readable
one-record reference; `decode_records` decodes a batch for tf.data at memory speed: records read in
place (zero-copy LMDB buffers), a few at a time inside the CPU cache, into 64-byte aligned output that
`tf.numpy_function` hands to TensorFlow without a copy, taken from an `OutputBuffers` pool so that no
batch pays for fresh pages (bench/multilabel_input_speed.py measures it).
"""

import json
import sys
import threading

import numpy as np

# safetensors dtype names -> NumPy (little-endian, as the format stores them).
SAFETENSORS_DTYPES = {
    "U8": "u1",
    "U16": "<u2",
    "I16": "<i2",
    "U32": "<u4",
    "I32": "<i4",
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
}


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows of ConfigILM's nearest resampling: min(floor(i * in / out), in - 1), in float32 as
    torch computes it (`F.interpolate(mode="nearest")`; tests/test_benv2.py checks the equality)."""
    scale = np.float32(in_size) / np.float32(out_size)
    rows = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(rows, in_size - 1)


def resample_nearest(array: np.ndarray, image_size: int) -> np.ndarray:
    """`(..., h, w)` -> `(..., image_size, image_size)` with ConfigILM's nearest rule."""
    height, width = array.shape[-2:]
    if (height, width) == (image_size, image_size):
        return array
    rows, columns = nearest_indices(height, image_size), nearest_indices(width, image_size)
    return np.take(np.take(array, rows, axis=-2), columns, axis=-1)


def decode_value(value: bytes, bands, image_size: int, out=None) -> np.ndarray:
    """safetensors bytes (dict band -> 2-D uint16) -> float32 reflectance (H, W, bands) at image_size.

    The readable one-record reference of `decode_records` (the batch decoder the pipeline uses).
    """
    from safetensors.numpy import load as load_safetensors

    arrays = load_safetensors(value)
    if out is None:
        out = np.empty((image_size, image_size, len(bands)), np.float32)
    for channel, band in enumerate(bands):
        if band not in arrays:
            raise KeyError(f"band {band} missing (has {', '.join(sorted(arrays))})")
        array = arrays[band]
        if array.ndim != 2:
            raise ValueError(f"band {band} has shape {array.shape}")
        out[..., channel] = resample_nearest(array, image_size)
    out *= np.float32(1e-4)
    return out


def _record_layout(header: bytes, bands):
    """{band: (dtype, (h, w), byte offset in the record)} from a safetensors header, or None if unusual."""
    try:
        entries = json.loads(header[8:])
        layout = {}
        for band in bands:
            entry = entries[band]
            dtype, shape = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"])
            start, end = entry["data_offsets"]
            if len(shape) != 2 or end - start != shape[0] * shape[1] * dtype.itemsize:
                return None
            layout[band] = (dtype, shape, len(header) + start)
    except (ValueError, KeyError, TypeError):
        return None
    return layout


class RecordError(ValueError):
    """Record `row` of a batch could not be decoded (`error` says why)."""

    def __init__(self, row: int, error: Exception):
        super().__init__(str(error))
        self.row = row


def _write_band(target: np.ndarray, array: np.ndarray) -> None:
    """`target[...] = ConfigILM-nearest(array)` over `(..., h, w)`; an integer factor f is the block repeat
    (floor(i / f)), one broadcast copy."""
    (height, width), (size_rows, size_columns) = array.shape[-2:], target.shape[-2:]
    if size_rows % height == 0 and size_columns % width == 0:
        shape = (*target.shape[:-2], height, size_rows // height, width, size_columns // width)
        np.copyto(target.reshape(shape), array[..., :, None, :, None], casting="unsafe")
    else:
        np.copyto(target, resample_nearest(array, size_rows), casting="unsafe")


# Records decoded together: their output (a few MB) stays in the CPU cache between the band copies.
RECORDS_PER_BLOCK = 16
_SCRATCH = threading.local()  # per reader thread: one block of each band's stored arrays, reused


def _scratch(dtype: np.dtype, shape: tuple) -> np.ndarray:
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (dtype.str, *shape)
    if key not in buffers:
        buffers[key] = np.empty((RECORDS_PER_BLOCK, *shape), dtype)
    return buffers[key]


def _decode_safetensors(value, bands, target: np.ndarray) -> None:
    """One record through the safetensors reader (any layout; names what is wrong with a broken one)."""
    from safetensors.numpy import load as load_safetensors

    arrays = load_safetensors(bytes(value))
    for channel, band in enumerate(bands):
        if band not in arrays:
            raise KeyError(f"band {band} missing (has {', '.join(sorted(arrays))})")
        if arrays[band].ndim != 2:
            raise ValueError(f"band {band} has shape {arrays[band].shape}")
        _write_band(target[..., channel], arrays[band])


def _decode_block(values, rows, layout, bands, out: np.ndarray) -> None:
    """Records `rows` (one header layout) -> `out[rows]`: each band read in place from the records' bytes,
    gathered into a reused block and written, resampled and converted, with one copy per band."""
    contiguous = rows[-1] - rows[0] == len(rows) - 1
    block = out[rows[0] : rows[-1] + 1] if contiguous else np.empty((len(rows), *out.shape[1:]), out.dtype)
    for channel, band in enumerate(bands):
        dtype, shape, offset = layout[band]
        views = [np.frombuffer(values[row], dtype, shape[0] * shape[1], offset) for row in rows]
        stored = np.stack(views, out=_scratch(dtype, shape)[: len(rows)].reshape(len(rows), -1))
        _write_band(block[..., channel], stored.reshape(len(rows), *shape))
    block *= np.float32(1e-4)
    if not contiguous:
        out[rows] = block


def aligned_empty(shape: tuple, dtype, alignment: int = 64) -> np.ndarray:
    """np.empty at a 64-byte aligned address: tf.numpy_function then hands the array to TensorFlow as it
    is, where an unaligned one is copied (a batch-sized copy per call)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + size].view(dtype).reshape(shape)


def decode_records(values, bands, image_size: int, buffers=None) -> np.ndarray:
    """A batch of safetensors records (bytes or zero-copy buffers) -> float32 reflectance `(N, H, W, bands)`.

    Equal to `decode_value` record by record. Records whose header bytes are identical (rico-hdl writes
    every patch alike) share one parsed layout and are decoded `RECORDS_PER_BLOCK` at a time: each band is
    read in place from the records' bytes, no copy of the records and no fresh batch-sized intermediate
    (those cost more in page faults than the decoding itself), and every NumPy copy runs outside the GIL.
    A record of an unusual layout takes the safetensors reader, which also names what is wrong with a
    broken one. A record that cannot be decoded raises RecordError with its row. `buffers`
    (an OutputBuffers) supplies the output array; by default a new one.
    """
    bands = list(bands)
    shape = (len(values), image_size, image_size, len(bands))
    out = buffers.take(shape) if buffers else aligned_empty(shape, np.float32)
    groups = {}
    for row, value in enumerate(values):
        header_end = 8 + int.from_bytes(value[:8], "little") if len(value) >= 8 else 0
        groups.setdefault(bytes(value[:header_end]) if header_end <= len(value) else b"", []).append(row)
    for header, rows in groups.items():
        layout = _record_layout(header, bands) if header else None
        record_end = (
            max(offset + d.itemsize * h * w for d, (h, w), offset in layout.values()) if layout else 0
        )
        usable = [row for row in rows if layout and len(values[row]) >= record_end]
        for row in sorted(set(rows) - set(usable)):
            try:
                _decode_safetensors(values[row], bands, out[row])
            except Exception as error:
                raise RecordError(row, error) from None
            out[row] *= np.float32(1e-4)
        for start in range(0, len(usable), RECORDS_PER_BLOCK):
            _decode_block(values, usable[start : start + RECORDS_PER_BLOCK], layout, bands, out)
    return out


class OutputBuffers:
    """Aligned float32 batch arrays, each reused once nothing outside the pool references it any more.

    TensorFlow keeps a reference to an array that `tf.numpy_function` shares with it until the last tensor
    on that memory is gone, and every view of the array references its base: an array whose reference
    counts (its own and its base's) are back to those it had when only the pool held it is free. Reuse
    saves the page faults of a fresh batch-sized allocation, which cost more than the decoding itself.
    At most `spare` free arrays are kept, so memory follows the batches in flight (over 8 passes of 24
    batches the bench's pipeline allocated 13 arrays with 4 spares, 25 with 2, 66 with none).
    """

    def __init__(self, spare: int = 4):
        self.spare, self.arrays, self.lock = spare, [], threading.Lock()

    def _references(self, position: int) -> tuple[int, int]:
        return sys.getrefcount(self.arrays[position][0]), sys.getrefcount(self.arrays[position][0].base)

    def take(self, shape: tuple) -> np.ndarray:
        with self.lock:
            free = [p for p in range(len(self.arrays)) if self._references(p) == self.arrays[p][1]]
            fitting = [p for p in free if self.arrays[p][0].shape == shape]
            if fitting:
                free.remove(fitting[0])
                chosen = self.arrays[fitting[0]][0]
            else:
                self.arrays.append([aligned_empty(shape, np.float32), None])
                self.arrays[-1][1] = self._references(-1)  # the counts when only the pool holds it
                chosen = self.arrays[-1][0]
            for position in sorted(free[self.spare :], reverse=True):
                del self.arrays[position]
            return chosen
