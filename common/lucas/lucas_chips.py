"""LUCAS 2018 land-cover chips as the TerraMind-on-LUCAS study laid them out: labels CSV, chips, reader.

The layout: `<root>/<STR18>/<Point_ID>.tif` 6-band float reflectance GeoTIFFs ([B4, B3, B2, B8, B11,
B12] = red, green, blue, broad NIR, SWIR 1, SWIR 2 of the Harmonized Landsat-Sentinel 2018 median)
plus `<root>/chips_LC_class.csv` with the columns `Point_ID, STR18`. STR18 codes 1..10 (the LUCAS
2018 land-cover stratum of each point) map to class indices 0..9. Every user mistake (a missing chip, a chip
without 6 bands, a bad label, NaN reflectance) is an `InputError` naming the file. The chips are
read in parallel inside tf.data (`ChipReader`); a read failure there comes back as its one-line error.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from common import pipelines
from common.errors import InputError, require, require_dir, require_file, require_finite
from common.raster import open_geotiff, read_window

LABELS_CSV_NAME = "chips_LC_class.csv"
BAND_NAMES = ["B4", "B3", "B2", "B8", "B11", "B12"]  # R, G, B, broad NIR, SWIR1, SWIR2
# STR18 codes 1..10 in order.
CLASS_NAMES = [
    "Arable lands",
    "Permanent crops",
    "Grass",
    "Wooded areas",
    "Shrubs",
    "Bare/low vegetation",
    "Artificial",
    "Inland water",
    "Transitional/coastal water",
    "Not interpretable",
]
# Chips per class in the study's 1,994 points in Italy.
STUDY_CHIP_COUNTS = [511, 178, 205, 704, 126, 57, 125, 43, 20, 25]


def read_labels(labels_csv) -> tuple[list[str], np.ndarray]:
    """Read the Point_ID, STR18 rows; return the point ids (str) and class indices 0..9.

    Args:
        labels_csv: the labels CSV (columns Point_ID, STR18; one row per chip, unique ids).

    Returns:
        The point ids in CSV order and their class indices as an int64 array.
    """
    labels_csv = require_file(labels_csv, "a labels CSV with columns Point_ID, STR18")
    try:
        table = pd.read_csv(labels_csv, dtype={"Point_ID": str})
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise InputError(
            labels_csv,
            f"cannot be read as CSV ({str(error).splitlines()[0][:100]})",
            "a CSV with columns Point_ID, STR18",
        ) from None
    missing = [column for column in ("Point_ID", "STR18") if column not in table.columns]
    require(not missing, labels_csv, f"has no column {', '.join(missing)}", "columns Point_ID, STR18")
    require(len(table) > 0, labels_csv, "has no rows", "one row per chip")
    codes = pd.to_numeric(table["STR18"], errors="coerce")
    bad = (~codes.isin(range(1, len(CLASS_NAMES) + 1))).to_numpy()
    first_bad = int(np.argmax(bad))
    require(
        not bad.any(),
        labels_csv,
        f"row {first_bad + 2} has STR18 {table['STR18'].iloc[first_bad]!r}",
        f"an integer 1..{len(CLASS_NAMES)}",
    )
    duplicated = table["Point_ID"].duplicated().to_numpy()
    require(
        not duplicated.any(),
        labels_csv,
        f"Point_ID {table['Point_ID'].iloc[int(np.argmax(duplicated))]} appears twice",
        "unique ids",
    )
    return table["Point_ID"].str.strip().tolist(), codes.to_numpy().astype(np.int64) - 1


def _missing_chip_error(root: Path, path: Path, labels_csv, point_id: str, label: int, labels) -> InputError:
    # Say whether the whole class folder is missing or the chip sits in another class's folder.
    if not path.parent.is_dir():
        return InputError(
            path.parent,
            f"no chip folder for class STR18 {label + 1} ({CLASS_NAMES[label]}) although {labels_csv} "
            f"lists {int(np.sum(labels == label))} chips of it",
            f"<data_root>/{label + 1}/<Point_ID>.tif for each row",
        )
    elsewhere = sorted(root.glob(f"*/{point_id}.tif"))
    hint = f" (found in {elsewhere[0].parent.name}/ instead)" if elsewhere else ""
    return InputError(
        path,
        f"chip of Point_ID {point_id} (STR18 {label + 1}) listed in {labels_csv} not found{hint}",
        "one chip per CSV row in its class folder",
    )


def locate_chips(data_root, labels_csv, point_ids, labels) -> tuple[list[Path], set]:
    """Map every CSV row to `<root>/<STR18>/<Point_ID>.tif` and check each chip's header (6 bands).

    Args:
        data_root: the chips folder.
        labels_csv: the labels CSV the rows came from (named in errors).
        point_ids: the point ids of `read_labels`.
        labels: their class indices.

    Returns:
        The chip paths in CSV order and the set of (height, width) chip sizes found.
    """
    root = require_dir(data_root, "a folder of <class_id>/<Point_ID>.tif chips")
    paths = []
    for point_id, label in zip(point_ids, labels, strict=True):
        path = root / str(label + 1) / f"{point_id}.tif"
        if not path.is_file():
            raise _missing_chip_error(root, path, labels_csv, point_id, label, labels)
        paths.append(path)
    sizes = set()
    for path in paths:
        with open_geotiff(path, expected_bands=len(BAND_NAMES)) as dataset:
            require(
                np.issubdtype(np.dtype(dataset.dtypes[0]), np.number),
                path,
                f"has dtype {dataset.dtypes[0]}",
                "numeric reflectance",
            )
            sizes.add((dataset.height, dataset.width))
    listed = {str(path) for path in paths}
    unlisted = sum(1 for path in root.glob("*/*.tif") if str(path) not in listed)
    if unlisted:
        print(f"note: {unlisted} chips under {root} are not in {labels_csv} and are ignored")
    return paths, sizes


class ChipReader:
    """Reads chip i as `(H, W, 6)` float32 inside tf.data.

    A chip that fails to read (or holds NaN) inside tf.data is recorded; `with reader.surface():`
    around the loop re-raises it as its one-line InputError (`pipelines.ReaderErrors`).
    """

    def __init__(self, paths):
        self.paths = [str(path) for path in paths]
        self.errors = pipelines.ReaderErrors()
        self.read = self.errors.wrap(self._read)

    def _read(self, index):
        from rasterio.windows import Window

        path = self.paths[int(index)]
        with open_geotiff(path, expected_bands=len(BAND_NAMES)) as dataset:
            chip = read_window(dataset, Window(0, 0, dataset.width, dataset.height), path=path)
        require_finite(chip, path, "chip values")
        return np.ascontiguousarray(np.transpose(chip, (1, 2, 0)), dtype=np.float32)

    def check_readable(self, indices, batch_size=32) -> None:
        """Read chips `indices` once (in parallel, results dropped): a bad one raises its InputError now."""
        if len(indices) == 0:
            return
        with self.surface():
            for _ in self.dataset(indices, None, batch_size).as_numpy_iterator():
                pass

    def surface(self):
        """Context manager: a chip read failure inside tf.data comes back as the reader's InputError."""
        return self.errors.surface()

    def dataset(self, indices, image_size, batch_size, labels=None, shuffle_seed=None) -> tf.data.Dataset:
        """Batched chips (and labels); parallel reads, resize only when a size is given, prefetch.

        Args:
            indices: the chips to read, in this order (shuffled each epoch with `shuffle_seed`).
            image_size: resize to this square size, or None to keep the chips' size.
            batch_size: chips per batch.
            labels: class index per chip (all chips); batches are (chips, labels) when given.
            shuffle_seed: tf.data's seeded shuffle, reshuffled each iteration; None keeps the order.
        """
        indices = np.asarray(indices, dtype=np.int64)
        data = tf.data.Dataset.from_tensor_slices(indices)
        if shuffle_seed is not None:
            data = data.shuffle(len(indices), seed=shuffle_seed, reshuffle_each_iteration=True)

        def load(index):
            chip = tf.numpy_function(self.read, [index], tf.float32, stateful=False)
            chip.set_shape([None, None, len(BAND_NAMES)])
            return tf.image.resize(chip, (image_size, image_size), antialias=True) if image_size else chip

        data = data.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if labels is not None:
            data = tf.data.Dataset.zip((data, tf.data.Dataset.from_tensor_slices(labels[indices])))
        return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def chip_size(sizes: set, image_size: int | None, data_root) -> int:
    """`image_size` when given, else the one square size of all chips (`sizes` from `locate_chips`)."""
    if image_size:
        return image_size
    expected = "one chip size, or --image_size to resize all chips"
    require(len(sizes) == 1, data_root, f"has chips of sizes {sorted(sizes)}", expected)
    height, width = next(iter(sizes))
    require(height == width, data_root, "has non-square chips", "square chips, or --image_size")
    return height
