"""OWL-GPS inputs and run files: patch readers, concept CSVs, label store, queue, round tables, member state.

A dataset is a dict `{"source", "labels", "active", "locations", "name"}`: `source.read(ids)` returns
patches `(len(ids), H, W, 4)` float32 (R, G, B, NIR), `labels` is `(N,)` 0/1 or None, `active` is
the `(N, C)` boolean matrix of the named concepts, `locations` is `(N, 2)` patch grid (row, col) for
GeoTIFF tiles and None otherwise. Every problem with the user's files is an InputError naming the
file. The queue helpers are the CSV oracle's file protocol: the script writes `queue_round{t}.csv`
with a blank label column (and a contact sheet), a person fills it, and the script reads it back.
The input flags and `load_from_args` choose between the demo set, a --data_dir and a --geotiff.
The round tables are the per-round results (rounds.csv), their mean +- std over seeds and the run's
metrics.json and summary line. The tutorial's concepts.pkl is read by an unpickler that refuses
every class, so no code in it can run. The member-state helpers seed, reset and checkpoint Keras
models and optimizers by variable path, so a resumed round draws exactly as an uninterrupted one.
"""

import csv
import math
import pickle
import shlex
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common import atomic, checkpoints, plots, reports
from common.errors import InputError, require, require_dir, require_file
from common.raster import open_geotiff, patch_windows, read_window

LABEL_FIELDS = ("id", "row", "col", "label", "round", "score", "strategy")
QUEUE_FIELDS = ("id", "row", "col", "score", "label")
_FLAG_WORDS = {"true": 1, "false": 0}
# (flag, default, help) of the input flags (see `add_flag_groups`). Defaults are the tutorial's values.
DATA_FLAGS = (
    ("--data_dir", "", "Folder: images.npy (N,4,H,W), labels.npy (N,) 0/1 if known, concepts.csv or .pkl."),
    ("--geotiff", "", "A 4-band (R,G,B,NIR) GeoTIFF tiled into non-overlapping patches."),
    ("--concepts_csv", "", "With --geotiff: concepts per patch keyed by patch grid row, col."),
    ("--land_cover_geotiff", "", "Instead of --concepts_csv: land cover (1 = urban), patch majority."),
    ("--distance_geotiff", "", "With --land_cover_geotiff: distance to industry in [0,1], patch mean."),
    ("--labels_csv", "", "With --geotiff: known labels (row, col, label); without: --oracle csv."),
    ("--patch_size", 32, "GeoTIFF patch size in pixels."),
    ("--reflectance_scale", 1.0, "GeoTIFF values are divided by this (10000 for Sentinel-2 L2A)."),
    ("--near_industrial_threshold", 0.3, "near_industrial = dist_industrial < threshold."),
    ("--test_fraction", 0.2, "Seeded 80/20 pool/test split."),
    ("--data_seed", 42, "Seed of the synthetic generator."),
    ("--n_samples", 500, "Synthetic patches."),
    ("--image_size", 32, "Synthetic patch size."),
    ("--signal", 0.1, "Strength of the planted NIR/red blob; 0 is the tutorial's pure noise."),
)
GEOTIFF_OPTIONS = ("patch_size", "reflectance_scale", "concepts_csv", "land_cover_geotiff")
GEOTIFF_OPTIONS += ("distance_geotiff", "labels_csv")


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


def write_dataset(folder, images: np.ndarray, labels: np.ndarray, concepts: dict) -> None:
    """Write the --data_dir format: images.npy, labels.npy, concepts.csv (never pickle)."""
    folder = Path(folder)
    atomic.save_npy(folder / "images.npy", images)
    atomic.save_npy(folder / "labels.npy", labels)
    rows = [
        {
            key: (f"{values[i]:.6f}" if key == "dist_industrial" else int(values[i]))
            for key, values in concepts.items()
        }
        for i in range(len(labels))
    ]
    atomic.write_csv(folder / "concepts.csv", rows, list(concepts))


def synthetic_dataset(
    n_samples: int = 500, image_size: int = 32, signal: float = 0.1, seed: int = 42
) -> tuple:
    """The OWL-GPS tutorial's synthetic set: noise patches, random concepts, label probability from concepts.

    P(target) = 0.1 + 0.3 * urban + 0.4 * near_industrial. With signal > 0 a target patch also carries
    a Gaussian blob of raised NIR and lowered red (a vegetation-index-like signature), so a CNN can
    learn it; with signal 0 the pixels are pure noise as in the tutorial.

    Returns:
        images `(N, 4, H, W)` float32 in [0, 1], labels `(N,)` 0/1 and the concept columns by name.
    """
    rng = np.random.default_rng(seed)
    images = rng.random((n_samples, 4, image_size, image_size), dtype=np.float32)
    land_cover = rng.integers(0, 4, n_samples)
    dist_industrial = rng.random(n_samples)
    urban = (land_cover == 1).astype(np.int64)
    near_industrial = (dist_industrial < 0.3).astype(np.int64)
    probability = 0.1 + 0.3 * urban + 0.4 * near_industrial
    labels = (rng.random(n_samples) < probability).astype(np.int64)
    grid = np.arange(image_size, dtype=np.float32)
    for index in np.flatnonzero(labels):
        centre_y, centre_x = rng.uniform(0.25, 0.75, 2) * image_size
        squared = (grid[:, None] - centre_y) ** 2 + (grid[None, :] - centre_x) ** 2
        blob = np.exp(-squared / (2 * (image_size / 6) ** 2))
        images[index, 3] += signal * blob
        images[index, 0] -= signal * blob
    np.clip(images, 0.0, 1.0, out=images)
    concepts = {"id": np.arange(n_samples), "land_cover": land_cover, "dist_industrial": dist_industrial}
    return images, labels, {**concepts, "urban": urban, "near_industrial": near_industrial}


# ---- CSV tables ----


def read_binary_labels(values, path, what: str = "label") -> np.ndarray:
    """`values` as int64 0/1; any other value is an InputError naming its index."""
    values = np.asarray(values)
    bad = np.flatnonzero(~np.isin(values, (0, 1)))
    if len(bad):
        raise InputError(
            path, f"{what} {values[bad[0]].item()!r} at index {bad[0]} is not 0/1", "binary labels 0 or 1"
        )
    return values.astype(np.int64)


def read_keyed_csv(path, columns: Sequence[str]):
    """A CSV as a DataFrame with stripped column names; the listed columns must be present."""
    import pandas as pd

    path = require_file(path, "a CSV file")
    try:
        table = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as error:
        first_line = str(error).splitlines()[0][:100]
        raise InputError(path, f"cannot be parsed as CSV ({first_line})", "a CSV") from None
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in columns if column not in table]
    require(not missing, path, f"missing column(s) {', '.join(missing)}", f"columns {', '.join(columns)}")
    return table


def integer_column(series, path, column: str) -> np.ndarray:
    """A table column as int64; a non-integer cell is an InputError."""
    import pandas as pd

    numeric = pd.to_numeric(series, errors="coerce")
    bad = np.flatnonzero(~(numeric.notna() & (numeric == numeric.round())).to_numpy())
    if len(bad):
        raise InputError(path, f"column {column} has {series.iloc[bad[0]]!r}", "integer ids")
    return numeric.to_numpy().astype(np.int64)


def read_concepts_table(
    path, key_columns: Sequence[str], concept_names: Sequence[str], threshold: float, table=None
):
    """A concepts CSV with 0/1 concept columns, one row per key; urban / near_industrial may be derived.

    `urban` = land_cover == 1 and `near_industrial` = dist_industrial < threshold when the columns
    are absent but their sources are present. `table` is the already-read table of `path`, if any.
    """
    import pandas as pd

    table = read_keyed_csv(path, ()) if table is None else table
    if "urban" not in table and "land_cover" in table:
        table["urban"] = (table["land_cover"] == 1).astype(int)
    if "near_industrial" not in table and "dist_industrial" in table:
        table["near_industrial"] = (table["dist_industrial"] < threshold).astype(int)
    wanted = (*key_columns, *concept_names)
    missing = [column for column in wanted if column not in table]
    require(
        not missing,
        path,
        f"missing column(s) {', '.join(missing)}",
        f"columns {', '.join(wanted)} (urban/near_industrial may be derived from land_cover/dist_industrial)",
    )
    for column in concept_names:
        values = table[column].map(lambda value: _FLAG_WORDS.get(str(value).strip().lower(), value))
        numeric = pd.to_numeric(values, errors="coerce")
        bad = np.flatnonzero(~numeric.isin((0, 1)).to_numpy())
        if len(bad):
            raise InputError(
                path,
                f"column {column} has {table[column].iloc[bad[0]]!r} on data row {bad[0] + 1}",
                "0/1 concept flags",
            )
        table[column] = numeric.astype(int)
    duplicated = table.duplicated(list(key_columns))
    if duplicated.any():
        key = tuple(table.loc[duplicated.idxmax(), list(key_columns)])
        raise InputError(path, f"duplicate key {key}", "one row per patch")
    return table


def concept_matrix(table, concept_names: Sequence[str]) -> np.ndarray:
    """The `(N, C)` boolean matrix of the named concept columns."""
    return np.stack([table[name].to_numpy().astype(bool) for name in concept_names], axis=1)


def align_by_location(table, locations: np.ndarray, path, what: str):
    """Reorder a (row, col)-keyed table to the kept patches; every kept patch must have a row."""
    rows, cols = integer_column(table["row"], path, "row"), integer_column(table["col"], path, "col")
    keyed = table.set_index([rows, cols])
    wanted = list(map(tuple, locations))
    missing = [key for key in wanted if key not in keyed.index]
    if missing:
        raise InputError(
            path,
            f"no {what} row for patch row={missing[0][0]}, col={missing[0][1]} "
            f"({len(missing)} patches missing)",
            "one row per kept patch, keyed by row, col",
        )
    return keyed.loc[wanted].reset_index(drop=True)


# ---- the tutorial's concepts.pkl, read without running any code ----


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers, numbers and strings: any class reference is refused.

    Lists, tuples, dicts, ints, floats, bools, strings and None have pickle opcodes of their own;
    everything else (numpy arrays, objects, functions) needs `find_class`, which is where code could run.
    """

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_concepts_pickle(path):
    """The tutorial's concepts.pkl as a table with an `id` column, read by `_PlainDataUnpickler`.

    Accepted structures: a list of per-patch dicts (`[{"land_cover": 1, "dist_industrial": 0.2}, ...]`,
    patch i is list item i), a dict of equally long per-concept lists (`{"land_cover": [...], ...}`), or
    a dict from patch id to its concept dict. Any class in the file is refused with one line.
    """
    import pandas as pd

    expected = "a pickle of lists/dicts of plain numbers and strings (write numpy values with .tolist())"
    try:
        with open(path, "rb") as file:
            content = _PlainDataUnpickler(file).load()
    except pickle.UnpicklingError as error:
        raise InputError(
            path, f"holds a Python object of class {error}, refused (no code is run)", expected
        ) from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError) as error:
        raise InputError(
            path, f"is not a readable pickle ({type(error).__name__}: {error})", expected
        ) from None
    if isinstance(content, dict) and content and all(isinstance(v, dict) for v in content.values()):
        table = pd.DataFrame.from_dict(content, orient="index").rename_axis("id").reset_index()
    elif isinstance(content, dict) and all(isinstance(v, (list, tuple)) for v in content.values()):
        lengths = {len(values) for values in content.values()}
        require(
            len(lengths) == 1, path, f"has concept lists of lengths {sorted(lengths)}", "one value per patch"
        )
        table = pd.DataFrame(content)
    elif isinstance(content, (list, tuple)) and all(isinstance(row, dict) for row in content):
        table = pd.DataFrame(list(content))
    else:
        shape = "a list of per-patch dicts, a dict of per-concept lists, or a dict of id -> concept dict"
        raise InputError(path, f"holds a {type(content).__name__} of another layout", shape)
    if "id" not in table:
        table.insert(0, "id", np.arange(len(table)))
    table.columns = [str(column).strip() for column in table.columns]
    return table


# ---- datasets ----


def load_npy_dataset(data_dir, concept_names: Sequence[str], threshold: float) -> dict:
    """`data_dir/images.npy` (N,4,H,W), optional `labels.npy` (N,) 0/1, concepts keyed by id.

    Concepts come from `concepts.csv`, else from the tutorial's `concepts.pkl` (read without running
    code). Without labels.npy the pool is unlabelled (labels None): only a person can label it.
    """
    data_dir = require_dir(data_dir, "a folder with images.npy, concepts.csv (or .pkl), labels.npy if known")
    source = open_images_npy(data_dir / "images.npy")
    labels_path, labels = data_dir / "labels.npy", None
    if labels_path.exists():
        labels = np.load(
            require_file(labels_path, "labels.npy with one 0/1 label per patch"), allow_pickle=False
        )
        require(
            labels.shape == (source.count,),
            labels_path,
            f"has shape {labels.shape}",
            f"shape ({source.count},) matching images.npy",
        )
        labels = read_binary_labels(labels, labels_path)
    concepts_path, table = data_dir / "concepts.csv", None
    if not concepts_path.exists() and (data_dir / "concepts.pkl").exists():
        concepts_path = data_dir / "concepts.pkl"
        table = read_concepts_pickle(concepts_path)
    if table is None and not concepts_path.exists():
        expected = "concepts.csv (id, land_cover, dist_industrial, ...) or the tutorial's concepts.pkl"
        raise InputError(concepts_path, "file not found", expected)
    table = read_concepts_table(concepts_path, ("id",), concept_names, threshold, table)
    ids = integer_column(table["id"], concepts_path, "id")
    missing = np.setdiff1d(np.arange(source.count), ids)
    if len(missing):
        raise InputError(
            concepts_path,
            f"no row for id {missing[0]} ({len(missing)} ids missing)",
            f"one row for every id 0..{source.count - 1}",
        )
    table = table.set_index(ids).loc[np.arange(source.count)]
    active = concept_matrix(table, concept_names)
    return {"source": source, "labels": labels, "active": active, "locations": None, "name": str(data_dir)}


def _tile_scene(geotiff, patch_size: int, reflectance_scale: float, concept_rasters) -> tuple:
    """Non-overlapping patches without nodata, their grid locations and raster concepts per patch."""
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


def load_geotiff_dataset(
    geotiff,
    concept_names: Sequence[str],
    patch_size: int = 32,
    reflectance_scale: float = 1.0,
    threshold: float = 0.3,
    concepts_csv=None,
    land_cover_geotiff=None,
    distance_geotiff=None,
    labels_csv=None,
) -> dict:
    """Tile a 4-band GeoTIFF into patches (dropping those touching nodata) and attach concepts and labels.

    Concepts come from `concepts_csv` keyed by patch grid (row, col), or from a land-cover raster
    (patch majority; 1 = urban) and a distance-to-industry raster (patch mean) on the same grid.
    Known labels, when given, come from `labels_csv` (row, col, label).
    """
    import pandas as pd

    rasters = tuple(
        open_geotiff(path, 1) if path else None for path in (land_cover_geotiff, distance_geotiff)
    )
    try:
        images, locations, concept_rows = _tile_scene(geotiff, patch_size, reflectance_scale, rasters)
    finally:
        for raster in rasters:
            if raster is not None:
                raster.close()
    if land_cover_geotiff:
        concepts_path = land_cover_geotiff
        table = pd.DataFrame(concept_rows)
        table["urban"] = (table["land_cover"] == 1).astype(int)
        table["near_industrial"] = (table["dist_industrial"] < threshold).astype(int)
        unknown = [name for name in concept_names if name not in table]
        require(
            not unknown,
            "--concept_weights",
            f"names {unknown} not computable from rasters",
            "urban and/or near_industrial",
        )
    else:
        concepts_path = concepts_csv
        require(
            concepts_path,
            "--concepts_csv",
            "missing",
            "a concepts CSV (row, col, ...) or --land_cover_geotiff + --distance_geotiff",
        )
        table = read_concepts_table(concepts_path, ("row", "col"), concept_names, threshold)
        table = align_by_location(table, locations, concepts_path, "concepts")
    labels = None
    if labels_csv:
        label_table = read_keyed_csv(labels_csv, ("row", "col", "label"))
        label_table = align_by_location(label_table, locations, labels_csv, "label")
        labels = read_binary_labels(integer_column(label_table["label"], labels_csv, "label"), labels_csv)
    active = concept_matrix(table, concept_names)
    source = ArrayPatches(images)
    return {
        "source": source,
        "labels": labels,
        "active": active,
        "locations": locations,
        "name": str(geotiff),
    }


def add_flag_groups(parser, groups: dict) -> None:
    """Add `{title: ((flag, default, help), ...)}` as argument groups; the type is the default's.

    A tuple default lists the choices (the first is the default); False makes a switch.
    """
    for title, flags in groups.items():
        group = parser.add_argument_group(title)
        for flag, default, text in flags:
            if default is False:
                group.add_argument(flag, action="store_true", help=text)
            elif isinstance(default, tuple):
                group.add_argument(flag, default=default[0], choices=default, help=text)
            else:
                group.add_argument(flag, type=type(default), default=default, help=text)


def load_from_args(args, concept_names: Sequence[str], demo_dir) -> dict:
    """The demo set (written to `demo_dir` in the --data_dir format first), a --data_dir or a --geotiff."""
    if args.demo:
        sizes = (args.n_samples, args.image_size, args.signal, args.data_seed)
        write_dataset(demo_dir, *synthetic_dataset(*sizes))
        args.data_dir = str(demo_dir)
    threshold = args.near_industrial_threshold
    if not args.geotiff:
        return load_npy_dataset(args.data_dir, concept_names, threshold)
    options = {key: getattr(args, key) for key in GEOTIFF_OPTIONS}
    return load_geotiff_dataset(args.geotiff, concept_names, threshold=threshold, **options)


def describe_data(args, data: dict) -> int:
    """Check the split against the `args` budgets and print it; returns the test set size."""
    source, labels, name = data["source"], data["labels"], data["name"]
    if args.demo:
        share = f"{labels.mean():.0%} targets, signal {args.signal}"
        print(f"demo: wrote {source.count} synthetic patches ({share}) to {args.data_dir}")
    if args.geotiff:
        print(f"geotiff: {source.count} patches of {args.patch_size}px kept from {args.geotiff}")
    where = "--labels_csv" if args.geotiff else Path(args.data_dir) / "labels.npy"
    expected = "known labels for the simulated oracle, or --oracle csv to label the pool yourself"
    require(labels is not None or args.oracle == "csv", where, "missing", expected)
    require(source.height == source.width, name, "patches are not square", "square patches")
    n_test = round(args.test_fraction * source.count) if labels is not None else 0
    pool, budget = source.count - n_test, f"at least --initial_budget ({args.initial_budget}) patches"
    require(pool >= args.initial_budget, name, f"pool of {pool} patches", budget)
    if labels is None:
        print(f"data: {source.count} unlabelled patches, no test set (test AUC unknown)")
    else:
        split = f"pool {pool}, test {n_test}, positives {labels.mean():.1%}"
        print(f"data: {source.count} patches of {source.height}x{source.width}x4, {split}")
    return n_test


def batches(source, ids, batch_size: int):
    """`(start, batch ids, patches)` over `ids`, `batch_size` at a time: memory is bounded by one batch."""
    for start in range(0, len(ids), batch_size):
        batch_ids = ids[start : start + batch_size]
        yield start, batch_ids, source.read(batch_ids)


# ---- seeded model state: every draw is keyed, so a resumed round repeats an uninterrupted one ----


def reseed_dropout(models: Sequence, key: Sequence[int]) -> None:
    """Set every dropout stream of `models[i]` from the seed sequence `(*key, i)`."""
    for index, model in enumerate(models):
        state = int(np.random.SeedSequence([*key, index]).generate_state(1)[0])
        for layer in model.layers:
            if hasattr(layer, "seed_generator"):
                layer.seed_generator.state.assign(np.array([state, 0], dtype=np.int64))


def initialise_weights(models: Sequence, seed: int) -> None:
    """Fresh weights from each layer's own initialisers, seeded by (seed, model, layer)."""
    for index, model in enumerate(models):
        for position, layer in enumerate(model.layers):
            if not hasattr(layer, "kernel_initializer"):
                continue
            layer_seed = int(np.random.SeedSequence([seed, 1, index, position]).generate_state(1)[0] >> 1)
            config = {**layer.kernel_initializer.get_config(), "seed": layer_seed}
            layer.kernel.assign(type(layer.kernel_initializer).from_config(config)(layer.kernel.shape))
            layer.bias.assign(layer.bias_initializer(layer.bias.shape))


def reset_slots(optimizers: Sequence) -> None:
    """Zero every optimizer variable except the learning rate: moments and the iteration count."""
    for optimizer in optimizers:
        for variable in optimizer.variables:
            if not variable.path.endswith("learning_rate"):
                variable.assign(np.zeros(variable.shape, variable.dtype))


def _member_groups(models: Sequence, optimizers: Sequence):
    # Weights as `member{k}/...`, optimizer slots as `member{k}_optimizer/...` without the optimizer's name.
    for k, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
        yield f"member{k}", model.weights, ()
        yield f"member{k}_optimizer", optimizer.variables, (f"{optimizer.name}/",)


def member_arrays(models: Sequence, optimizers: Sequence) -> dict[str, np.ndarray]:
    """Every model's weights and optimizer slots, keyed by group and variable path."""
    groups = _member_groups(models, optimizers)
    return {key: array for group in groups for key, array in checkpoints.variable_arrays(*group).items()}


def restore_members(arrays, models: Sequence, optimizers: Sequence, source) -> None:
    """Inverse of `member_arrays`; a checkpoint of other settings is an InputError naming `source`."""
    for group, variables, strip in _member_groups(models, optimizers):
        checkpoints.assign_arrays(arrays, group, variables, source, strip)


# ---- the label store and the labelling queue ----


class LabelStore:
    """A run's labels.csv: every label so far with its grid cell, round, score and strategy.

    It is the record a person reads and the run's memory of what is labelled; each change rewrites it.
    """

    def __init__(self, path, rows: Sequence[dict] = ()):
        self.path, self.rows = Path(path), list(rows)

    @classmethod
    def read(cls, path, before_round: int) -> "LabelStore":
        """The labels of rounds before `before_round`; a hand-edited, unreadable row is an InputError."""
        path = require_file(path, "the run's label store")
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        try:
            integers = ("id", "label", "round")
            rows = [
                {key: int(row[key]) if key in integers else row[key] for key in LABEL_FIELDS} for row in rows
            ]
        except (KeyError, TypeError, ValueError) as error:
            expected = f"columns {', '.join(LABEL_FIELDS)} with integer id, label and round"
            expected += ", as this script writes them"
            raise InputError(path, f"cannot be read ({error})", expected) from None
        return cls(path, [row for row in rows if row["round"] < before_round])

    def ids(self) -> np.ndarray:
        return np.array([row["id"] for row in self.rows], dtype=np.int64)

    def labels(self) -> np.ndarray:
        return np.array([row["label"] for row in self.rows], dtype=np.int64)

    def add(self, ids, labels, round_number: int, scores, strategy: str, locations) -> None:
        """Append newly labelled patches (scores kept exactly, as repr) and rewrite the file."""
        new = []
        for sample, label, score in zip(ids, labels, scores, strict=True):
            row, col = _grid_cells(locations, sample)
            score_text = "" if score is None else repr(float(score))
            cells = (int(sample), row, col, int(label), round_number, score_text, strategy)
            new.append(dict(zip(LABEL_FIELDS, cells, strict=True)))
        self.rows = [*self.rows, *new]
        self.write()

    def write(self) -> None:
        atomic.write_csv(self.path, self.rows, list(LABEL_FIELDS))


class AwaitingLabels(Exception):
    """The CSV oracle wrote a queue for a person to label; the same command with --resume continues."""

    def __init__(self, queue_path, count: int):
        super().__init__(str(queue_path))
        self.queue_path, self.count = Path(queue_path), count

    def instruction(self, argv: Sequence[str]) -> str:
        """What the person does next: the file to fill, then the command `argv` with --resume."""
        rest = [argument for argument in argv[1:] if argument != "--resume"]
        command = shlex.join(["python", Path(argv[0]).name, *rest, "--resume"])
        what = f"0/1 in the label column; contact sheet {self.queue_path.with_suffix('.png').name}"
        return f"oracle: label the {self.count} patches in {self.queue_path} ({what}), then run: {command}"


def _grid_cells(locations, sample) -> tuple:
    return ("", "") if locations is None else (int(locations[sample][0]), int(locations[sample][1]))


def write_queue(path, ids, scores, data: dict) -> Path:
    """The queue CSV with a blank label column, plus a contact sheet (same name, .png) of the patches."""
    path = Path(path)
    rows = []
    for sample, score in zip(ids, scores, strict=True):
        row, col = _grid_cells(data["locations"], sample)
        score_text = "" if score is None else f"{score:.6f}"
        rows.append({"id": int(sample), "row": row, "col": col, "score": score_text, "label": ""})
    atomic.write_csv(path, rows, list(QUEUE_FIELDS))
    save_contact_sheet(data["source"].read(ids), ids, scores, path.with_suffix(".png"))
    return path


def read_queue(path, expected_ids: Sequence[int]) -> np.ndarray:
    """Validated labels from a filled-in queue: every queued id once, each label 0 or 1."""
    path = require_file(path, "the queue CSV written by the previous round, with the label column filled")
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        require(
            reader.fieldnames and {"id", "label"} <= set(reader.fieldnames),
            path,
            f"has columns {reader.fieldnames}",
            "columns id and label",
        )
        rows = list(reader)
    answers = {}
    for line, row in enumerate(rows, start=2):
        sample = (row["id"] or "").strip()
        require(
            sample.isdigit(),
            path,
            f"line {line}: id {row['id']!r} is not an integer",
            "the queued ids unchanged",
        )
        value = (row["label"] or "").strip()
        expected = "every queued patch labelled 0 or 1"
        require(value != "", path, f"line {line}: blank label for id {sample}", expected)
        require(
            value in ("0", "1", "0.0", "1.0"),
            path,
            f"line {line}: label {value!r} for id {sample} is not 0/1",
            expected,
        )
        answers[int(sample)] = int(float(value))
    missing = [i for i in expected_ids if i not in answers]
    if missing:
        raise InputError(path, f"queued id {missing[0]} is missing", "all queued ids")
    extra = sorted(set(answers) - set(expected_ids))
    if extra:
        raise InputError(path, f"id {extra[0]} was not queued", "only the queued ids")
    return np.array([answers[i] for i in expected_ids], dtype=np.int64)


def save_contact_sheet(patches: np.ndarray, ids, scores, path, columns: int = 5) -> None:
    """Each queued patch twice: true colour (R,G,B) and false colour (NIR,R,G), 2-98 % stretched."""
    plt = plots.pyplot()
    rows = math.ceil(len(ids) / columns)
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.3, rows * 1.6), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for index, (patch, sample, score) in enumerate(zip(patches, ids, scores, strict=True)):
        for offset, (bands, title) in enumerate((((0, 1, 2), "RGB"), ((3, 0, 1), "NIR-R-G"))):
            image = patch[..., list(bands)]
            low, high = np.percentile(image, (2, 98))
            axis = axes[index // columns, 2 * (index % columns) + offset]
            axis.imshow(np.clip((image - low) / max(high - low, 1e-6), 0, 1))
            subtitle = f"\ns={score:.2f}" if score is not None else ""
            axis.set_title(f"id {sample} {title}{subtitle}", fontsize=7)
    plots.save(figure, path)


# ---- the round tables ----


def write_round_table(path, rows: Sequence[dict], fields: Sequence[str]) -> None:
    """Round rows as CSV; floats as repr, so a resumed run's table can be compared digit for digit."""
    table = [
        {key: repr(row[key]) if isinstance(row[key], float) else row[key] for key in fields} for row in rows
    ]
    atomic.write_csv(path, table, list(fields))


def write_round_tables(run_dir, all_rows: Sequence[dict], fields: Sequence[str], title: str) -> dict:
    """rounds.csv and strategy_comparison.csv (several runs) and auc_curve.png; returns the curves.

    `all_rows` are round rows with their `strategy` and `seed`; one run's rounds.csv is its own.
    """
    run_dir, curves = Path(run_dir), summarise_curves(all_rows)
    if len({(row["strategy"], row["seed"]) for row in all_rows}) > 1:
        write_round_table(run_dir / "rounds.csv", all_rows, ("strategy", "seed", *fields))
        points = [point for rows in curves.values() for point in rows]
        atomic.write_csv(run_dir / "strategy_comparison.csv", points, list(points[0]))
    save_auc_plot(curves, run_dir / "auc_curve.png", title)
    return curves


def write_results(
    args, run_dir, all_rows: Sequence[dict], fields: Sequence[str], seeds: Sequence[int]
) -> dict:
    """The round tables, auc_curve.png and metrics.json (final and mean-over-rounds test AUC per strategy).

    `args` supplies n_rounds, uncertainty, alpha, alpha_schedule and ensemble_eval; returns the metrics.
    """
    import keras

    setting = f"{args.uncertainty} uncertainty, alpha {args.alpha} ({args.alpha_schedule})"
    title = f"OWL-GPS: {setting}, {len(seeds)} seed(s)"
    curves = write_round_tables(run_dir, all_rows, fields, title)
    final = {strategy: rows[-1] for strategy, rows in curves.items()}
    finite = {s: [r["auc_mean"] for r in rows if np.isfinite(r["auc_mean"])] for s, rows in curves.items()}
    metrics = {"n_rounds": args.n_rounds, "n_labeled": next(iter(final.values()))["n_labeled"]}
    metrics |= {"seeds": list(seeds), "uncertainty": args.uncertainty, "keras": keras.__version__}
    metrics["evaluated"] = (
        "ensemble mean" if args.ensemble_eval and args.uncertainty == "ensemble" else "member 0"
    )
    metrics["final_test_auc"] = {s: row["auc_mean"] for s, row in final.items()}
    metrics["final_test_auc_std"] = {s: row["auc_std"] for s, row in final.items()}
    metrics["mean_test_auc_over_rounds"] = {s: reports.mean_std(values)[0] for s, values in finite.items()}
    atomic.write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics


def summary_line(metrics: dict) -> str:
    """The last line a run prints; its figures are those of metrics.json (AUC "unknown" without labels)."""
    several = len(metrics["seeds"]) > 1
    spread = {s: f"+-{std:.4f}" if several else "" for s, std in metrics["final_test_auc_std"].items()}
    aucs = " ".join(f"{s}={mean:.4f}{spread[s]}" for s, mean in metrics["final_test_auc"].items())
    if not np.isfinite(list(metrics["final_test_auc"].values())).any():
        aucs = "unknown (no test labels)"
    counts = f"n_labeled={metrics['n_labeled']} rounds={metrics['n_rounds']}"
    return f"final: test_auc {aucs} {counts} uncertainty={metrics['uncertainty']}"


def summarise_curves(all_rows: Sequence[dict]) -> dict:
    """{strategy: [{round, n_labeled, auc_mean, auc_std, n_seeds}]} over seeds (NaN AUCs skipped)."""
    curves = {}
    for strategy in dict.fromkeys(row["strategy"] for row in all_rows):
        rows = [row for row in all_rows if row["strategy"] == strategy]
        curves[strategy] = []
        for round_number in sorted({row["round"] for row in rows}):
            same = [row for row in rows if row["round"] == round_number]
            aucs = np.array([row["test_auc"] for row in same], dtype=np.float64)
            mean, std = reports.mean_std(aucs[np.isfinite(aucs)])
            point = {"strategy": strategy, "round": round_number, "n_labeled": same[0]["n_labeled"]}
            curves[strategy].append({**point, "auc_mean": mean, "auc_std": std, "n_seeds": len(same)})
    return curves


def save_auc_plot(curves: dict, path, title: str) -> None:
    """AUC vs labelled count per strategy; mean +- std over seeds as a shaded band."""
    figure, axis = plots.pyplot().subplots(figsize=(6, 4))
    for strategy, rows in curves.items():
        counts, mean, std = (
            np.array([row[key] for row in rows]) for key in ("n_labeled", "auc_mean", "auc_std")
        )
        axis.plot(counts, mean, marker="o", label=f"{strategy} (n={rows[0]['n_seeds']})")
        axis.fill_between(counts, mean - std, mean + std, alpha=0.2)
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set(xlabel="labelled patches", ylabel="test ROC-AUC")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    plots.save(figure, path)
