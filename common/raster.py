"""Windowed GeoTIFF access with clear errors: open, iterate a patch grid, read one window.

Scenes are never read whole: callers iterate `patch_windows` and read each window on its own, so
memory stays bounded by the window size whatever the scene size.
"""

from pathlib import Path

import numpy as np

from common.errors import InputError, require_file


def open_geotiff(path, expected_bands=None):
    """Open a GeoTIFF with rasterio; a missing, corrupt or non-GeoTIFF file is an InputError."""
    import rasterio
    from rasterio.errors import RasterioIOError

    path = require_file(path, "a GeoTIFF file")
    try:
        dataset = rasterio.open(path)
    except RasterioIOError as error:
        raise InputError(
            path, f"cannot be read as a raster ({str(error).splitlines()[0][:120]})", "a readable GeoTIFF"
        ) from None
    if dataset.driver != "GTiff":
        dataset.close()
        raise InputError(path, f"is a {dataset.driver} raster, not a GeoTIFF", "a GeoTIFF file")
    if expected_bands is not None and dataset.count != expected_bands:
        count = dataset.count
        dataset.close()
        raise InputError(path, f"has {count} bands", f"{expected_bands} bands")
    return dataset


def patch_windows(height, width, size, stride=None):
    """Yield (row, col, Window) for a grid of size x size patches from the top-left corner.

    Partial patches at the right and bottom edges are dropped. `row`/`col` count patches.
    """
    from rasterio.windows import Window

    stride = stride or size
    for row, top in enumerate(range(0, height - size + 1, stride)):
        for col, left in enumerate(range(0, width - size + 1, stride)):
            yield row, col, Window(left, top, size, size)


def read_window(dataset, window, indexes=None, path=None):
    """Read one window as (bands, rows, cols); a read failure (corrupt block) is an InputError."""
    from rasterio.errors import RasterioIOError

    try:
        return dataset.read(indexes, window=window)
    except (RasterioIOError, ValueError) as error:
        raise InputError(
            path or dataset.name,
            f"window at row {int(window.row_off)}, col {int(window.col_off)} cannot be read "
            f"({str(error).splitlines()[0][:120]})",
            "an intact GeoTIFF",
        ) from None


def write_geotiff(path, array, transform=None, crs="EPSG:4326", nodata=None, tile_size=None):
    """Write (bands, rows, cols) as a GeoTIFF (used by tests and demo generators), atomically."""
    import rasterio
    from rasterio.transform import from_origin

    from common import atomic

    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    transform = transform or from_origin(0.0, float(array.shape[1]), 1.0, 1.0)
    profile = {
        "driver": "GTiff",
        "height": array.shape[1],
        "width": array.shape[2],
        "count": array.shape[0],
        "dtype": array.dtype.name,
        "crs": crs,
        "transform": transform,
    }
    if nodata is not None:
        profile["nodata"] = nodata
    if tile_size:
        profile.update(tiled=True, blockxsize=tile_size, blockysize=tile_size)
    with atomic.atomic_path(Path(path)) as temporary, rasterio.open(temporary, "w", **profile) as destination:
        destination.write(array)
