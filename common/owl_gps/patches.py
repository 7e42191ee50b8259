"""4-band patch readers: the tutorial's images.npy (in memory or streamed) and a GeoTIFF tiled into patches.

Every reader has `count`, `height`, `width` and `read(ids)`, which returns the patches `ids` as
`(len(ids), H, W, 4)` float32 in the band order R, G, B, NIR (channels last, transposed once from the
channels-first files). Every problem with a user's file is an InputError naming the file.
"""

from pathlib import Path

import numpy as np

from common.errors import InputError, require, require_file
from common.raster import open_geotiff, patch_windows, read_window


class ArrayPatches:
    """Patches held in memory as `(N, H, W, 4)` float32 (transposed once from channels-first)."""

    def __init__(self, images_channels_first: np.ndarray):
        self.images = np.ascontiguousarray(np.transpose(images_channels_first, (0, 2, 3, 1)), np.float32)
        self.count, self.height, self.width = self.images.shape[:3]

    def read(self, ids) -> np.ndarray:
        """The patches `ids` as `(len(ids), H, W, 4)`."""
        return self.images[np.asarray(ids, dtype=np.int64)]


class NpyPatches:
    """A large images.npy read by seek + read, batch by batch: memory is bounded by one batch.

    A memory map would leave every touched page resident (and counted) after a pass over the pool,
    so explicit reads are used instead.
    """

    def __init__(self, path, shape: tuple, dtype, offset: int):
        self.path, self.dtype, self.offset = Path(path), np.dtype(dtype), offset
        self.count, _, self.height, self.width = shape
        self.row_items = 4 * self.height * self.width

    def read_rows(self, file, start: int, stop: int) -> np.ndarray:
        """Patches `start:stop` channels-first, from an open file of this array."""
        file.seek(self.offset + start * self.row_items * self.dtype.itemsize)
        block = np.fromfile(file, dtype=self.dtype, count=(stop - start) * self.row_items)
        return block.reshape(stop - start, 4, self.height, self.width)

    def read(self, ids) -> np.ndarray:
        """The patches `ids` as `(len(ids), H, W, 4)` float32."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        out = np.empty((len(ids), self.height, self.width, 4), np.float32)
        with open(self.path, "rb") as file:
            if len(ids) and sorted_ids[-1] - sorted_ids[0] < 4 * len(ids):
                # Dense ids (a pool batch): one contiguous read covering them all.
                block = self.read_rows(file, sorted_ids[0], sorted_ids[-1] + 1)
                out[order] = np.transpose(block[sorted_ids - sorted_ids[0]], (0, 2, 3, 1))
            else:
                for position, sample in zip(order, sorted_ids, strict=True):
                    out[position] = np.transpose(self.read_rows(file, sample, sample + 1)[0], (1, 2, 0))
        return out


def _npy_header(path: Path) -> tuple[tuple, bool, np.dtype, int]:
    expected = "images.npy of shape (N,4,H,W)"
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran_order, dtype = read_header(file)
            return shape, fortran_order, dtype, file.tell()
    except ValueError as error:
        raise InputError(path, f"is not a .npy array ({error})", expected) from None


def open_images_npy(path, in_memory_bytes: int = 1 << 29) -> ArrayPatches | NpyPatches:
    """Validate images.npy `(N, 4, H, W)` of finite numbers; keep it in memory if small, else read lazily.

    Args:
        path: the images.npy file.
        in_memory_bytes: arrays up to this size (as float32) are loaded whole.

    Returns:
        An `ArrayPatches` or an `NpyPatches` reader.
    """
    path = require_file(path, "images.npy of shape (N,4,H,W)")
    shape, fortran_order, dtype, offset = _npy_header(path)
    require(len(shape) == 4, path, f"has shape {shape} (rank {len(shape)})", "rank 4: (N,4,H,W)")
    require(
        shape[1] == 4,
        path,
        f"has {shape[1]} bands in axis 1 (shape {shape})",
        "4 bands (R,G,B,NIR), channels first: (N,4,H,W)",
    )
    require(
        np.issubdtype(dtype, np.number) and not fortran_order and dtype.hasobject is False,
        path,
        f"has dtype {dtype}",
        "a numeric C-order array",
    )
    size = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    require(actual == size, path, f"has {actual} bytes, its header promises {size}", "a complete .npy file")
    source = NpyPatches(path, shape, dtype, offset)
    chunk = max(1, (64 << 20) // (source.row_items * dtype.itemsize))
    with open(path, "rb") as file:
        for start in range(0, shape[0], chunk):
            block = source.read_rows(file, start, min(shape[0], start + chunk))
            if not np.isfinite(block).all():
                first = start + int(np.argwhere(~np.isfinite(block))[0][0])
                raise InputError(path, f"patch {first} contains NaN or Inf", "finite values")
    if np.prod(shape) * 4 <= in_memory_bytes:
        return ArrayPatches(np.load(path, allow_pickle=False))
    return source


def tile_geotiff(geotiff, patch_size: int, reflectance_scale: float, concept_rasters) -> tuple:
    """Tile a 4-band scene into non-overlapping patches, dropping any patch that touches nodata.

    The scene is read window by window (`common.raster.patch_windows`), never whole. A patch is
    dropped when one of its pixels is nodata in every band or when it holds NaN or Inf.

    Args:
        geotiff: the 4-band (R, G, B, NIR) GeoTIFF.
        patch_size: the patch side in pixels; partial patches at the right and bottom edges are dropped.
        reflectance_scale: every value is divided by this (10000 for Sentinel-2 L2A digital numbers).
        concept_rasters: `(land_cover, distance)` open single-band rasters on the scene's grid, or
            `(None, None)`.

    Returns:
        patches `(N, 4, P, P)` float32, their grid locations `(N, 2)` (row, col) in patches, and per
        kept patch `{"land_cover": majority class, "dist_industrial": mean distance}` when
        `concept_rasters` are given (else an empty list).
    """
    scene = open_geotiff(geotiff, expected_bands=4)
    land_cover_raster, distance_raster = concept_rasters
    for raster in concept_rasters:
        if raster is not None and (raster.height, raster.width) != (scene.height, scene.width):
            raise InputError(
                raster.name,
                f"is {raster.height}x{raster.width} pixels",
                f"the grid of {geotiff} ({scene.height}x{scene.width})",
            )
    patches, locations, concept_rows = [], [], []
    with scene:
        for row, col, window in patch_windows(scene.height, scene.width, patch_size):
            block = read_window(scene, window, path=geotiff).astype(np.float32)
            touches_nodata = scene.nodata is not None and (block == scene.nodata).all(axis=0).any()
            if touches_nodata or not np.isfinite(block).all():
                continue
            patches.append(block / reflectance_scale)
            locations.append((row, col))
            if land_cover_raster is not None:
                land_cover = read_window(land_cover_raster, window, 1).astype(np.int64)
                distance = read_window(distance_raster, window, 1).astype(np.float64).mean()
                majority = int(np.bincount(land_cover.ravel().clip(0)).argmax())
                concept_rows.append({"land_cover": majority, "dist_industrial": float(distance)})
    require(
        patches,
        geotiff,
        f"has no complete {patch_size}px patch without nodata",
        "a 4-band scene at least one patch in size",
    )
    return np.stack(patches), np.asarray(locations, dtype=np.int64), concept_rows


def batches(source, ids, batch_size: int):
    """`(start, batch ids, patches)` over `ids`, `batch_size` at a time: memory is bounded by one batch."""
    for start in range(0, len(ids), batch_size):
        batch_ids = ids[start : start + batch_size]
        yield start, batch_ids, source.read(batch_ids)
