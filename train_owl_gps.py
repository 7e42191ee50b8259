"""OWL-GPS: concept-weighted active learning with a Reptile meta-update, in Keras 3.

Paper: "Adapting Actively on the Fly: Relevance-Guided Online Meta-Learning with Latent Concepts for
Geospatial Discovery" (arXiv 2602.17605), as restated by the "OWL-GPS active learning" tutorial: a
small CNN classifies 4-band (R, G, B, NIR) patches as target / background; each round it trains on
the labelled set, reports test ROC-AUC, queries the patches with the highest
alpha * entropy + (1 - alpha) * concept relevance, and takes one Reptile step on the new labels.

What it reproduces: the tutorial's round table (labelled count, test AUC, train loss, Reptile query
loss) and the comparisons its "where to go next" list asks for: concept weighting vs pure
uncertainty vs pure relevance vs random (mean +- std over seeds), MC-dropout and deep-ensemble
uncertainty, a linear alpha schedule, and a human-in-the-loop CSV oracle.

Commands:
    python train_owl_gps.py --demo                                  # tutorial loop, ~1 min CPU
    python train_owl_gps.py --demo --strategy all --seeds 5         # four strategies, shaded bands
    python train_owl_gps.py --demo --uncertainty mc_dropout --alpha_schedule linear
    python train_owl_gps.py --data_dir DIR                          # DIR/images.npy (N,4,H,W),
                                                                    # labels.npy, concepts.csv
    python train_owl_gps.py --geotiff scene.tif --concepts_csv c.csv --labels_csv l.csv
    python train_owl_gps.py --data_dir DIR --oracle csv             # writes queue_round{t}.csv, stops
    python train_owl_gps.py --data_dir DIR --oracle csv --resume    # reads your labels, continues
    python train_owl_gps.py --demo --resume --n_rounds 15           # extend a finished run

Runtime: `--demo` takes about 20 seconds of CPU time (500 patches of 32x32, 10 rounds; under a
minute on a laptop). It prints one row per round and ends with
    final: test_auc concept=0.8355 n_labeled=110 rounds=10 uncertainty=entropy
(the numbers are in metrics.json). With `--signal 0` the pixels are pure noise, as in the tutorial,
and the test AUC stays near 0.5 by design. `--strategy all --seeds 5` takes about 20 times longer.
"""

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np

from common.raster import open_geotiff, patch_windows, read_window
from common import atomic, cli, runs
from common.errors import InputError, cli_entry, require, require_dir, require_file

SCRIPT_STEM = "train_owl_gps"
STRATEGIES = ("concept", "uncertainty", "relevance", "random")
CONCEPT_COLUMNS = ("id", "land_cover", "dist_industrial", "urban", "near_industrial")
LAND_COVER_NAMES = ("forest", "urban", "water", "agricultural")
ROUND_FIELDS = ("round", "n_labeled", "alpha", "test_auc", "train_loss", "meta_query_loss", "seconds")
# Arguments that define a run; a --resume with any of them changed would silently mix two experiments.
RUN_IDENTITY = ("strategy", "seeds", "alpha", "alpha_schedule", "uncertainty", "mc_passes", "mc_score",
                "ensemble_size", "initial_budget", "query_budget", "epochs", "batch_size",
                "learning_rate", "inner_lr", "meta_lr", "inner_steps", "inner_batch_size",
                "concept_weights", "keep_optimizer_state", "test_fraction", "oracle", "seed", "data_dir",
                "geotiff", "patch_size", "signal", "data_seed", "n_samples", "image_size")


def get_args_parser():
    parser = argparse.ArgumentParser(
        "train_owl_gps", description="Concept-weighted active learning with a Reptile update (OWL-GPS).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--demo", action="store_true",
                      help="Generate the seeded synthetic set under <results_dir>/demo_data/train_owl_gps/ "
                           "in the real format (images.npy, labels.npy, concepts.csv) and run on it.")
    data.add_argument("--data_dir", default=None,
                      help="Folder with images.npy (N,4,H,W) float, labels.npy (N,) 0/1 and concepts.csv "
                           f"with columns {', '.join(CONCEPT_COLUMNS)}.")
    data.add_argument("--geotiff", default=None, help="A 4-band (R,G,B,NIR) GeoTIFF tiled into patches.")
    data.add_argument("--concepts_csv", default=None,
                      help="With --geotiff: concepts per patch keyed by patch grid columns row, col.")
    data.add_argument("--land_cover_geotiff", default=None,
                      help="With --geotiff, instead of --concepts_csv: land cover raster (0 forest, 1 urban, "
                           "2 water, 3 agricultural) on the same grid; the patch majority is its land_cover.")
    data.add_argument("--distance_geotiff", default=None,
                      help="With --land_cover_geotiff: normalised distance to industry in [0,1]; the patch "
                           "mean is its dist_industrial.")
    data.add_argument("--labels_csv", default=None,
                      help="With --geotiff: known labels (row, col, label) for the test set and the "
                           "simulated oracle. Without it, use --oracle csv; the test AUC is then NaN.")
    data.add_argument("--patch_size", type=int, default=32, help="GeoTIFF patch size in pixels.")
    data.add_argument("--reflectance_scale", type=float, default=1.0,
                      help="GeoTIFF values are divided by this (10000 for Sentinel-2 L2A integers).")
    data.add_argument("--near_industrial_threshold", type=float, default=0.3,
                      help="near_industrial = dist_industrial < threshold (tutorial: 0.3).")
    data.add_argument("--test_fraction", type=float, default=0.2, help="Seeded 80/20 pool/test split.")
    data.add_argument("--data_seed", type=int, default=42, help="Seed of the synthetic generator (tutorial 42).")
    data.add_argument("--n_samples", type=int, default=500, help="Synthetic patches (tutorial 500).")
    data.add_argument("--image_size", type=int, default=32, help="Synthetic patch size (tutorial 32).")
    data.add_argument("--signal", type=float, default=0.1,
                      help="Strength of the planted NIR/red blob in target patches; 0 is the tutorial's "
                           "pure-noise pixels (AUC ~0.5 by design).")

    loop = parser.add_argument_group("active learning")
    loop.add_argument("--strategy", default="concept", choices=STRATEGIES + ("all",),
                      help="concept: alpha*u + (1-alpha)*r; uncertainty: alpha=1; relevance: alpha=0; "
                           "random; all: the four on identical splits and initial labels.")
    loop.add_argument("--seeds", type=int, default=1,
                      help="Repeat every strategy with seeds seed..seed+seeds-1 (mean +- std bands).")
    loop.add_argument("--n_rounds", type=int, default=10, help="Active-learning rounds (tutorial 10).")
    loop.add_argument("--initial_budget", type=int, default=20, help="Random initial labels (tutorial 20).")
    loop.add_argument("--query_budget", type=int, default=10, help="Labels queried per round (tutorial 10).")
    loop.add_argument("--alpha", type=float, default=0.5,
                      help="Weight of uncertainty against concept relevance (tutorial 0.5).")
    loop.add_argument("--alpha_schedule", default="constant", choices=("constant", "linear"),
                      help="linear: alpha_t = min(1, t / n_rounds + 0.3) with t = round - 1, moving from "
                           "relevance towards uncertainty as the model improves.")
    loop.add_argument("--concept_weights", default="urban=2,near_industrial=3",
                      help="Relevance = product of the weights of a patch's active (1) concepts; any 0/1 "
                           "column of the concepts table may be named.")
    loop.add_argument("--uncertainty", default="entropy", choices=("entropy", "mc_dropout", "ensemble"),
                      help="entropy of the softmax (tutorial), MC-dropout, or a deep ensemble.")
    loop.add_argument("--mc_passes", type=int, default=20, help="MC-dropout forward passes T.")
    loop.add_argument("--mc_score", default="entropy", choices=("entropy", "bald"),
                      help="MC-dropout score: predictive entropy or BALD mutual information.")
    loop.add_argument("--ensemble_size", type=int, default=5,
                      help="Deep-ensemble members K; disagreement = mutual information.")
    loop.add_argument("--oracle", default="simulated", choices=("simulated", "csv"),
                      help="simulated uses the known labels; csv writes queue_round{t}.csv and a contact "
                           "sheet, stops, and reads your labels on --resume.")
    loop.add_argument("--score_batch_size", type=int, default=1024,
                      help="Pool patches scored per batch (memory stays bounded by one batch).")

    train = parser.add_argument_group("training and Reptile")
    train.add_argument("--epochs", type=int, default=5, help="Epochs over the labelled set per round.")
    train.add_argument("--batch_size", type=int, default=16, help="Training batch size (tutorial 16).")
    train.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate.")
    train.add_argument("--inner_lr", type=float, default=0.01, help="Reptile inner SGD learning rate.")
    train.add_argument("--meta_lr", type=float, default=0.1,
                       help="Reptile step: theta <- theta + meta_lr * (theta_adapted - theta); 0 disables.")
    train.add_argument("--inner_steps", type=int, default=5,
                       help="At most this many inner batches over the support half (tutorial 5).")
    train.add_argument("--inner_batch_size", type=int, default=8, help="Reptile inner batch size.")
    train.add_argument("--keep_optimizer_state", action="store_true",
                       help="Keep Adam's moments across the Reptile step (the tutorial's stale-momentum "
                            "behaviour); by default they are reset after each Reptile step.")
    cli.add_run_arguments(parser)
    return parser


# ---- data ----

def generate_synthetic(n_samples=500, image_size=32, signal=0.1, seed=42):
    """The tutorial's synthetic set: noise patches, random concepts, label probability from concepts.

    P(target) = 0.1 + 0.3 * urban + 0.4 * near_industrial. With signal > 0 a target patch also carries
    a Gaussian blob of raised NIR and lowered red (a vegetation-index-like signature), so a CNN can
    learn it; with signal 0 the pixels are pure noise as in the tutorial.
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
        blob = np.exp(-((grid[:, None] - centre_y) ** 2 + (grid[None, :] - centre_x) ** 2)
                      / (2 * (image_size / 6) ** 2))
        images[index, 3] += signal * blob
        images[index, 0] -= signal * blob
    np.clip(images, 0.0, 1.0, out=images)
    concepts = {"id": np.arange(n_samples), "land_cover": land_cover, "dist_industrial": dist_industrial,
                "urban": urban, "near_industrial": near_industrial}
    return images, labels, concepts


def write_dataset(folder, images, labels, concepts):
    """Write the --data_dir format: images.npy, labels.npy, concepts.csv (never pickle)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("images.npy", images), ("labels.npy", labels)):
        with atomic.atomic_path(folder / name) as temporary:
            np.save(temporary, array, allow_pickle=False)
    rows = [{key: (f"{values[i]:.6f}" if key == "dist_industrial" else int(values[i]))
             for key, values in concepts.items()} for i in range(len(labels))]
    atomic.write_csv(folder / "concepts.csv", rows, list(concepts))


class ArrayPatches:
    """Patches held in memory as (N, H, W, 4) float32 (transposed once from channels-first)."""

    def __init__(self, images_channels_first):
        self.images = np.ascontiguousarray(np.transpose(images_channels_first, (0, 2, 3, 1)), np.float32)
        self.count, self.height, self.width = self.images.shape[:3]

    def read(self, ids):
        return self.images[np.asarray(ids, dtype=np.int64)]


class NpyPatches:
    """A large images.npy read by seek + read, batch by batch: memory is bounded by one batch.

    A memory map would leave every touched page resident (and counted) after a pass over the pool,
    so explicit reads are used instead.
    """

    def __init__(self, path, shape, dtype, offset):
        self.path, self.dtype, self.offset = Path(path), np.dtype(dtype), offset
        self.count, _, self.height, self.width = shape
        self.row_items = 4 * self.height * self.width

    def _read_rows(self, file, start, stop):
        file.seek(self.offset + start * self.row_items * self.dtype.itemsize)
        block = np.fromfile(file, dtype=self.dtype, count=(stop - start) * self.row_items)
        return block.reshape(stop - start, 4, self.height, self.width)

    def read(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        out = np.empty((len(ids), self.height, self.width, 4), np.float32)
        with open(self.path, "rb") as file:
            if len(ids) and sorted_ids[-1] - sorted_ids[0] < 4 * len(ids):
                # Dense ids (a pool batch): one contiguous read covering them all.
                block = self._read_rows(file, sorted_ids[0], sorted_ids[-1] + 1)
                out[order] = np.transpose(block[sorted_ids - sorted_ids[0]], (0, 2, 3, 1))
            else:
                for position, sample in zip(order, sorted_ids):
                    out[position] = np.transpose(self._read_rows(file, sample, sample + 1)[0], (1, 2, 0))
        return out


def open_images_npy(path, in_memory_bytes=1 << 29):
    """Validate images.npy (N,4,H,W) finite numbers; keep it in memory if small, else read lazily."""
    path = require_file(path, "images.npy of shape (N,4,H,W)")
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran_order, dtype = read_header(file)
            offset = file.tell()
    except ValueError as error:
        raise InputError(path, f"is not a .npy array ({error})", "images.npy of shape (N,4,H,W)") from None
    require(len(shape) == 4, path, f"has shape {shape} (rank {len(shape)})", "rank 4: (N,4,H,W)")
    require(shape[1] == 4, path, f"has {shape[1]} bands in axis 1 (shape {shape})",
            "4 bands (R,G,B,NIR), channels first: (N,4,H,W)")
    require(np.issubdtype(dtype, np.number) and not fortran_order and dtype.hasobject is False, path,
            f"has dtype {dtype}", "a numeric C-order array")
    source = NpyPatches(path, shape, dtype, offset)
    chunk = max(1, (64 << 20) // (source.row_items * dtype.itemsize))
    with open(path, "rb") as file:
        for start in range(0, shape[0], chunk):
            block = source._read_rows(file, start, min(shape[0], start + chunk))
            if not np.isfinite(block).all():
                first = start + int(np.argwhere(~np.isfinite(block))[0][0])
                raise InputError(path, f"patch {first} contains NaN or Inf", "finite values")
    if np.prod(shape) * 4 <= in_memory_bytes:
        return ArrayPatches(np.load(path, allow_pickle=False))
    return source


def read_binary_labels(values, path, what="label"):
    values = np.asarray(values)
    bad = np.flatnonzero(~np.isin(values, (0, 1)))
    if len(bad):
        raise InputError(path, f"{what} {values[bad[0]].item()!r} at index {bad[0]} is not 0/1",
                         "binary labels 0 or 1")
    return values.astype(np.int64)


def read_concepts_table(path, key_columns, concept_names, threshold):
    """Read a concepts CSV into {column: array} keyed by `key_columns`; derive urban/near_industrial."""
    import pandas as pd

    table = read_keyed_csv(path, ())
    if "urban" not in table and "land_cover" in table:
        table["urban"] = (table["land_cover"] == 1).astype(int)
    if "near_industrial" not in table and "dist_industrial" in table:
        table["near_industrial"] = (table["dist_industrial"] < threshold).astype(int)
    missing = [column for column in (*key_columns, *concept_names) if column not in table]
    require(not missing, path, f"missing column(s) {', '.join(missing)}",
            f"columns {', '.join((*key_columns, *concept_names))} (urban/near_industrial may be derived "
            "from land_cover/dist_industrial)")
    for column in concept_names:
        values = table[column].map(lambda value: {"true": 1, "false": 0}.get(str(value).strip().lower(), value))
        numeric = pd.to_numeric(values, errors="coerce")
        bad = np.flatnonzero(~numeric.isin((0, 1)).to_numpy())
        require(not len(bad), path, f"column {column} has {table[column].iloc[bad[0]] if len(bad) else ''!r} "
                f"on data row {bad[0] + 1 if len(bad) else 0}", "0/1 concept flags")
        table[column] = numeric.astype(int)
    duplicated = table.duplicated(list(key_columns))
    require(not duplicated.any(), path, f"duplicate key {tuple(table.loc[duplicated.idxmax(), list(key_columns)])}"
            if duplicated.any() else "", "one row per patch")
    return table


def load_npy_dataset(data_dir, concept_names, threshold):
    data_dir = require_dir(data_dir, "a folder with images.npy, labels.npy, concepts.csv")
    source = open_images_npy(data_dir / "images.npy")
    labels_path = require_file(data_dir / "labels.npy", "labels.npy with one 0/1 label per patch")
    labels = np.load(labels_path, allow_pickle=False)
    require(labels.shape == (source.count,), labels_path, f"has shape {labels.shape}",
            f"shape ({source.count},) matching images.npy")
    labels = read_binary_labels(labels, labels_path)
    table = read_concepts_table(data_dir / "concepts.csv", ("id",), concept_names, threshold)
    ids = pd_int(table["id"], data_dir / "concepts.csv", "id")
    missing = np.setdiff1d(np.arange(source.count), ids)
    require(not len(missing), data_dir / "concepts.csv",
            f"no row for id {missing[0] if len(missing) else 0} ({len(missing)} ids missing)",
            f"one row for every id 0..{source.count - 1}")
    table = table.set_index(ids).loc[np.arange(source.count)]
    return {"source": source, "labels": labels, "active": concept_matrix(table, concept_names),
            "locations": None, "name": str(data_dir)}


def pd_int(series, path, column):
    import pandas as pd

    numeric = pd.to_numeric(series, errors="coerce")
    bad = np.flatnonzero(~(numeric.notna() & (numeric == numeric.round())).to_numpy())
    require(not len(bad), path, f"column {column} has {series.iloc[bad[0]] if len(bad) else ''!r}",
            "integer ids")
    return numeric.to_numpy().astype(np.int64)


def concept_matrix(table, concept_names):
    return np.stack([table[name].to_numpy().astype(bool) for name in concept_names], axis=1)


def load_geotiff_dataset(args, concept_names):
    """Tile a 4-band GeoTIFF into non-overlapping patches (dropping nodata ones) and attach concepts."""
    import pandas as pd

    scene = open_geotiff(args.geotiff, expected_bands=4)
    lc_raster = open_geotiff(args.land_cover_geotiff, 1) if args.land_cover_geotiff else None
    dist_raster = open_geotiff(args.distance_geotiff, 1) if args.distance_geotiff else None
    for raster in (lc_raster, dist_raster):
        if raster is not None:
            require((raster.height, raster.width) == (scene.height, scene.width), raster.name,
                    f"is {raster.height}x{raster.width} pixels", f"the grid of {args.geotiff} "
                    f"({scene.height}x{scene.width})")
    patches, locations, concept_rows = [], [], []
    with scene:
        for row, col, window in patch_windows(scene.height, scene.width, args.patch_size):
            block = read_window(scene, window, path=args.geotiff).astype(np.float32)
            if scene.nodata is not None and (block == scene.nodata).all(axis=0).any():
                continue
            if not np.isfinite(block).all():
                continue
            patches.append(block / args.reflectance_scale)
            locations.append((row, col))
            if lc_raster is not None:
                land_cover = read_window(lc_raster, window, 1).astype(np.int64)
                distance = read_window(dist_raster, window, 1).astype(np.float64).mean()
                concept_rows.append({"row": row, "col": col,
                                     "land_cover": int(np.bincount(land_cover.ravel().clip(0)).argmax()),
                                     "dist_industrial": float(distance)})
    for raster in (lc_raster, dist_raster):
        if raster is not None:
            raster.close()
    require(patches, args.geotiff, f"has no complete {args.patch_size}px patch without nodata",
            "a 4-band scene at least one patch in size")
    locations = np.asarray(locations, dtype=np.int64)
    if lc_raster is not None:
        concepts_path = Path(args.land_cover_geotiff)
        table = pd.DataFrame(concept_rows)
        table["urban"] = (table["land_cover"] == 1).astype(int)
        table["near_industrial"] = (table["dist_industrial"] < args.near_industrial_threshold).astype(int)
        unknown = [name for name in concept_names if name not in table]
        require(not unknown, "--concept_weights", f"names {unknown} not computable from rasters",
                "urban and/or near_industrial")
    else:
        concepts_path = args.concepts_csv
        require(concepts_path is not None, "--concepts_csv", "missing",
                "a concepts CSV (row, col, ...) or --land_cover_geotiff + --distance_geotiff")
        table = read_concepts_table(concepts_path, ("row", "col"), concept_names,
                                    args.near_industrial_threshold)
    table = align_by_location(table, locations, concepts_path, "concepts")
    labels = None
    if args.labels_csv:
        label_table = align_by_location(read_keyed_csv(args.labels_csv, ("row", "col", "label")), locations,
                                        args.labels_csv, "label")
        labels = read_binary_labels(pd_int(label_table["label"], args.labels_csv, "label"), args.labels_csv)
    images = np.stack(patches)
    print(f"geotiff: {len(patches)} patches of {args.patch_size}px kept from {args.geotiff}")
    return {"source": ArrayPatches(images), "labels": labels, "active": concept_matrix(table, concept_names),
            "locations": locations, "name": str(args.geotiff)}


def read_keyed_csv(path, columns):
    """A CSV as a DataFrame with stripped column names; the listed columns must be present."""
    import pandas as pd

    path = require_file(path, "a CSV file")
    try:
        table = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as error:
        raise InputError(path, f"cannot be parsed as CSV ({str(error).splitlines()[0][:100]})", "a CSV") from None
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in columns if column not in table]
    require(not missing, path, f"missing column(s) {', '.join(missing)}", f"columns {', '.join(columns)}")
    return table


def align_by_location(table, locations, path, what):
    """Reorder a (row, col)-keyed table to the kept patches; every kept patch must have a row."""
    keyed = table.set_index([pd_int(table["row"], path, "row"), pd_int(table["col"], path, "col")])
    wanted = list(map(tuple, locations))
    missing = [key for key in wanted if key not in keyed.index]
    require(not missing, path, f"no {what} row for patch row={missing[0][0] if missing else 0}, "
            f"col={missing[0][1] if missing else 0} ({len(missing)} patches missing)",
            "one row per kept patch, keyed by row, col")
    return keyed.loc[wanted].reset_index(drop=True)


def split_pool_test(n_samples, test_fraction, initial_budget, seed):
    """Seeded permutation: the first test_fraction is the test set; initial labels drawn from the pool."""
    rng = np.random.default_rng([seed, 0])
    permutation = rng.permutation(n_samples)
    n_test = int(round(test_fraction * n_samples))
    test_ids, pool_ids = np.sort(permutation[:n_test]), np.sort(permutation[n_test:])
    initial_ids = rng.choice(pool_ids, min(initial_budget, len(pool_ids)), replace=False)
    return test_ids, pool_ids, initial_ids


# ---- concept relevance, uncertainty and the acquisition score ----

def parse_concept_weights(text):
    """'urban=2,near_industrial=3' -> {'urban': 2.0, 'near_industrial': 3.0}."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise InputError("--concept_weights", f"cannot read {item!r}", "name=number pairs, e.g. "
                             "urban=2,near_industrial=3") from None
    require(weights, "--concept_weights", "is empty", "at least one name=number pair")
    return weights


def concept_relevance(active, weights):
    """r_i = product of the weights of the concepts active in patch i (1 when none is active)."""
    return np.prod(np.where(active, np.asarray(weights, dtype=np.float64)[None, :], 1.0), axis=1)


def min_max(values):
    """Min-max normalise over the candidate pool; a constant vector maps to zeros."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min() if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def acquisition_score(uncertainty, relevance, alpha):
    """score = alpha * minmax(u) + (1 - alpha) * minmax(r) over the unlabelled pool."""
    return alpha * min_max(uncertainty) + (1.0 - alpha) * min_max(relevance)


def select_top_k(candidate_ids, scores, k, rng):
    """The k highest-scoring candidates (ties broken at random, seeded); never more than exist."""
    tie_break = rng.random(len(candidate_ids))
    order = np.lexsort((tie_break, -np.asarray(scores)))
    return np.asarray(candidate_ids)[order[:min(k, len(candidate_ids))]]


def alpha_for_round(alpha, schedule, round_index, n_rounds):
    """constant: alpha; linear: alpha_t = min(1, t / n_rounds + 0.3), t = round_index (0-based)."""
    return alpha if schedule == "constant" else min(1.0, round_index / n_rounds + 0.3)


def entropy(probabilities):
    probabilities = np.clip(probabilities, 1e-12, 1.0)
    return -(probabilities * np.log(probabilities)).sum(axis=-1)


def reptile_update(theta, theta_adapted, meta_lr):
    """Reptile: theta <- theta + meta_lr * (theta_adapted - theta), per weight array."""
    return [w + meta_lr * (w_adapted - w) for w, w_adapted in zip(theta, theta_adapted)]


# ---- model ----

def build_simple_cnn(image_size, name="simple_cnn"):
    """SimpleCNN: Conv32-ReLU-Pool, Conv64-ReLU-Pool, Dense128-ReLU, Dropout 0.5, Dense 2 (logits)."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 4), name="patch")
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return keras.Model(inputs, layers.Dense(2, name="logits")(x), name=name)


class Learner:
    """One SimpleCNN (or K for an ensemble) with Adam, compiled train/predict steps and Reptile.

    The models and their compiled functions are built once and re-initialised per seed, so comparing
    strategies over many seeds does not pay the tracing cost again.
    """

    def __init__(self, args, image_size):
        import keras
        import tensorflow as tf

        self.tf, self.keras, self.args, self.image_size = tf, keras, args, image_size
        # Fixed signatures (any batch size) so each compiled step is traced once, not once per shape.
        self.patch_spec = tf.TensorSpec([None, image_size, image_size, 4], tf.float32)
        self.label_spec = tf.TensorSpec([None], tf.int32)
        size = args.ensemble_size if args.uncertainty == "ensemble" else 1
        self.members = [build_simple_cnn(image_size, f"simple_cnn_{k}") for k in range(size)]
        self.optimizers = [keras.optimizers.Adam(args.learning_rate) for _ in self.members]
        for model, optimizer in zip(self.members, self.optimizers):
            optimizer.build(model.trainable_variables)
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.train_steps = [self._make_train_step(m, o) for m, o in zip(self.members, self.optimizers)]
        self.adapted = build_simple_cnn(image_size, "adapted_copy")
        self.inner_step = self._make_train_step(self.adapted, keras.optimizers.SGD(args.inner_lr))
        self.probabilities = [self._make_predict(m) for m in self.members]
        self.adapted_probabilities = self._make_predict(self.adapted)
        self.mc = self._make_mc_moments(self.members[0]) if args.uncertainty == "mc_dropout" else None

    def _make_mc_moments(self, model):
        """T stochastic passes for MC-dropout, sharing one deterministic pass through the trunk.

        Dropout is the only stochastic layer and sits after Dense(128), so running the convolutional
        trunk once and only the Dropout -> Dense(2) head T times gives exactly the distribution of T
        full passes at about 1/T of the cost. Moments are accumulated in place: only batch-sized
        tensors are ever held, never pool x T probabilities.
        """
        tf, passes = self.tf, self.args.mc_passes
        dropout, logits = model.layers[-2], model.layers[-1]
        trunk = self.keras.Model(model.inputs, dropout.input)

        @tf.function(input_signature=[self.patch_spec])
        def moments(x):
            features = trunk(x, training=False)
            mean = tf.zeros((tf.shape(x)[0], 2))
            mean_entropy = tf.zeros((tf.shape(x)[0],))
            for _ in range(passes):
                p = tf.nn.softmax(logits(dropout(features, training=True)))
                mean += p / passes
                mean_entropy += -tf.reduce_sum(p * tf.math.log(tf.maximum(p, 1e-12)), -1) / passes
            return mean, mean_entropy
        return moments

    def _make_train_step(self, model, optimizer):
        tf = self.tf

        @tf.function(input_signature=[self.patch_spec, self.label_spec])
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = self.loss(y, model(x, training=True))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return loss
        return train_step

    def _make_predict(self, model):
        tf = self.tf
        return tf.function(lambda x: tf.nn.softmax(model(x, training=False)), input_signature=[self.patch_spec])

    def reseed_dropout(self, *key):
        """Set every dropout stream from (seed, round, phase, member): resumed rounds draw identically."""
        for index, model in enumerate(self.members + [self.adapted]):
            state = int(np.random.SeedSequence([*key, index]).generate_state(1)[0])
            for layer in model.layers:
                if hasattr(layer, "seed_generator"):
                    layer.seed_generator.state.assign(np.array([state, 0], dtype=np.int64))

    def initialise(self, seed):
        """Fresh weights from each layer's own initialisers, seeded by (seed, member, layer)."""
        for index, model in enumerate(self.members):
            for position, layer in enumerate(model.layers):
                if not hasattr(layer, "kernel_initializer"):
                    continue
                layer_seed = int(np.random.SeedSequence([seed, 1, index, position]).generate_state(1)[0] >> 1)
                config = {**layer.kernel_initializer.get_config(), "seed": layer_seed}
                kernel_initializer = type(layer.kernel_initializer).from_config(config)
                layer.kernel.assign(kernel_initializer(layer.kernel.shape))
                layer.bias.assign(layer.bias_initializer(layer.bias.shape))
        self.reset_optimizers()

    def reset_optimizers(self):
        for optimizer in self.optimizers:
            for variable in optimizer.variables:
                if not variable.path.endswith("learning_rate"):
                    variable.assign(np.zeros(variable.shape, variable.dtype))

    def train_round(self, images, labels, rng):
        """args.epochs epochs of Adam over the labelled set (mini-batches, fresh shuffle each epoch)."""
        losses = []
        for model_index, train_step in enumerate(self.train_steps):
            for _ in range(self.args.epochs):
                order, total = rng.permutation(len(labels)), 0.0
                for start in range(0, len(labels), self.args.batch_size):
                    batch = order[start:start + self.args.batch_size]
                    total += float(train_step(images[batch], labels[batch].astype(np.int32))) * len(batch)
            losses.append(total / len(labels))
        return float(np.mean(losses))

    def iterate_batches(self, source, ids):
        for start in range(0, len(ids), self.args.score_batch_size):
            batch_ids = ids[start:start + self.args.score_batch_size]
            yield start, batch_ids, source.read(batch_ids)

    def predict_positive(self, source, ids):
        """P(class 1) averaged over members, batch by batch."""
        out = np.empty(len(ids), np.float64)
        for start, batch_ids, x in self.iterate_batches(source, ids):
            out[start:start + len(batch_ids)] = np.mean([p(x).numpy()[:, 1] for p in self.probabilities], 0)
        return out

    def pool_uncertainty(self, source, ids):
        """Entropy (tutorial), MC-dropout predictive entropy / BALD, or ensemble mutual information."""
        out = np.empty(len(ids), np.float64)
        for start, batch_ids, x in self.iterate_batches(source, ids):
            if self.args.uncertainty == "mc_dropout":
                mean, mean_entropy = (t.numpy() for t in self.mc(x))
                score = entropy(mean) - (mean_entropy if self.args.mc_score == "bald" else 0.0)
            else:
                member_probabilities = np.stack([p(x).numpy() for p in self.probabilities])
                mean = member_probabilities.mean(0)
                score = entropy(mean)
                if self.args.uncertainty == "ensemble":
                    score = score - entropy(member_probabilities).mean(0)
            out[start:start + len(batch_ids)] = score
        return out

    def reptile(self, images, labels, rng):
        """Adapt a copy on the support half with SGD, then move each member towards it.

        Returns the adapted copy's cross-entropy on the query half (mean over members).
        """
        n_support = len(labels) // 2
        query_losses = []
        for model in self.members:
            self.adapted.set_weights(model.get_weights())
            order = rng.permutation(n_support)
            for step, start in enumerate(range(0, n_support, self.args.inner_batch_size)):
                if step >= self.args.inner_steps:
                    break
                batch = order[start:start + self.args.inner_batch_size]
                self.inner_step(images[batch], labels[batch].astype(np.int32))
            query_probability = self.adapted_probabilities(images[n_support:]).numpy()
            query_losses.append(float(-np.log(np.clip(
                query_probability[np.arange(len(labels) - n_support), labels[n_support:]], 1e-12, 1)).mean()))
            model.set_weights(reptile_update(model.get_weights(), self.adapted.get_weights(), self.args.meta_lr))
        if not self.args.keep_optimizer_state:
            self.reset_optimizers()
        return float(np.mean(query_losses))

    def state_arrays(self):
        arrays = {}
        for k, (model, optimizer) in enumerate(zip(self.members, self.optimizers)):
            arrays.update({f"m{k}_w{i}": w for i, w in enumerate(model.get_weights())})
            arrays.update({f"m{k}_o{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
        return arrays

    def load_state_arrays(self, arrays, path):
        for k, (model, optimizer) in enumerate(zip(self.members, self.optimizers)):
            try:
                model.set_weights([arrays[f"m{k}_w{i}"] for i in range(len(model.weights))])
                for i, variable in enumerate(optimizer.variables):
                    variable.assign(arrays[f"m{k}_o{i}"])
            except (KeyError, ValueError) as error:
                raise InputError(path, f"does not match this model ({error})",
                                 "a checkpoint written with the same settings") from None


# ---- label store and CSV oracle ----

LABEL_FIELDS = ("id", "row", "col", "label", "round", "score", "strategy")


def read_label_store(path):
    """The run's labels.csv as a list of rows; a hand-edited, unreadable row is an InputError."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    try:
        return [{"id": int(r["id"]), "row": r["row"], "col": r["col"], "label": int(r["label"]),
                 "round": int(r["round"]), "score": r["score"], "strategy": r["strategy"]} for r in rows]
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"cannot be read ({error})", f"columns {', '.join(LABEL_FIELDS)} with integer "
                         "id, label and round, as this script writes them") from None


def label_rows(ids, labels, round_number, scores, strategy, locations):
    return [{"id": int(i), "row": int(locations[i][0]) if locations is not None else "",
             "col": int(locations[i][1]) if locations is not None else "", "label": int(label),
             "round": round_number, "score": "" if score is None else repr(float(score)), "strategy": strategy}
            for i, label, score in zip(ids, labels, scores)]


def write_queue(arm_dir, round_number, ids, scores, data):
    """queue_round{t}.csv with a blank label column, plus a contact sheet of the queued patches."""
    locations = data["locations"]
    rows = [{"id": int(i), "row": int(locations[i][0]) if locations is not None else "",
             "col": int(locations[i][1]) if locations is not None else "",
             "score": "" if s is None else f"{s:.6f}", "label": ""} for i, s in zip(ids, scores)]
    path = Path(arm_dir) / f"queue_round{round_number}.csv"
    atomic.write_csv(path, rows, ["id", "row", "col", "score", "label"])
    save_contact_sheet(data["source"].read(ids), ids, scores, Path(arm_dir) / f"queue_round{round_number}.png")
    return path


def read_queue(path, expected_ids):
    """Validated labels from a filled-in queue: every queued id once, each label 0 or 1."""
    path = require_file(path, "the queue CSV written by the previous round, with the label column filled")
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        require(reader.fieldnames and {"id", "label"} <= set(reader.fieldnames), path,
                f"has columns {reader.fieldnames}", "columns id and label")
        rows = list(reader)
    answers = {}
    for line, row in enumerate(rows, start=2):
        require((row["id"] or "").strip().isdigit(), path, f"line {line}: id {row['id']!r} is not an integer",
                "the queued ids unchanged")
        value = (row["label"] or "").strip()
        require(value != "", path, f"line {line}: blank label for id {row['id'].strip()}",
                "every queued patch labelled 0 or 1")
        require(value in ("0", "1", "0.0", "1.0"), path, f"line {line}: label {value!r} for id "
                f"{row['id'].strip()} is not 0/1", "every queued patch labelled 0 or 1")
        answers[int(row["id"])] = int(float(value))
    missing = [i for i in expected_ids if i not in answers]
    require(not missing, path, f"queued id {missing[0] if missing else 0} is missing", "all queued ids")
    extra = sorted(set(answers) - set(expected_ids))
    require(not extra, path, f"id {extra[0] if extra else 0} was not queued", "only the queued ids")
    return np.array([answers[i] for i in expected_ids], dtype=np.int64)


def save_contact_sheet(patches, ids, scores, path, columns=5):
    """Each queued patch twice: true colour (R,G,B) and false colour (NIR,R,G), 2-98 % stretched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(ids) / columns)
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.3, rows * 1.6), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for index, (patch, sample, score) in enumerate(zip(patches, ids, scores)):
        for offset, (bands, title) in enumerate((((0, 1, 2), "RGB"), ((3, 0, 1), "NIR-R-G"))):
            image = patch[..., list(bands)]
            low, high = np.percentile(image, (2, 98))
            axis = axes[index // columns, 2 * (index % columns) + offset]
            axis.imshow(np.clip((image - low) / max(high - low, 1e-6), 0, 1))
            axis.set_title(f"id {sample} {title}" + (f"\ns={score:.2f}" if score is not None else ""), fontsize=7)
    atomic.save_figure(figure, path)
    plt.close(figure)


# ---- one active-learning run (one strategy, one seed) ----

class ActiveLearningRun:
    """The tutorial loop for one (strategy, seed) with checkpoints after every round.

    Checkpoint steps: `done` (round t trained, queried, labelled, Reptile applied), `trained` (last
    round: trained and evaluated, no query yet) and `awaiting_labels` (CSV oracle: queue written).
    """

    def __init__(self, args, data, learner, arm_dir, strategy, seed):
        self.args, self.data, self.learner, self.strategy, self.seed = args, data, learner, strategy, seed
        self.arm_dir = Path(arm_dir)
        self.checkpoints = self.arm_dir / "checkpoints"
        self.store_path = self.arm_dir / "labels.csv"
        n = data["source"].count
        self.test_ids, self.pool_ids, self.initial_ids = split_pool_test(
            n, 0.0 if data["labels"] is None else args.test_fraction, args.initial_budget, seed)
        self.relevance = concept_relevance(data["active"], list(parse_concept_weights(args.concept_weights).values()))
        self.store, self.rows = [], []   # the label store (rows of labels.csv) and the round table

    # -- checkpoints --
    def save_checkpoint(self, round_number, step, queue=None):
        stem = self.checkpoints / f"round_{round_number:03d}"
        with atomic.atomic_path(stem.with_suffix(".npz")) as temporary:
            with open(temporary, "wb") as file:
                np.savez(file, **self.learner.state_arrays())
        atomic.write_json(stem.with_suffix(".json"), {
            "round": round_number, "step": step, "n_labeled": len(self.store), "rows": self.rows,
            "queue": queue, "strategy": self.strategy, "seed": self.seed, "n_samples": self.data["source"].count})
        atomic.write_json(self.checkpoints / "latest.json", {"round": round_number, "file": stem.name})

    def load_latest(self):
        pointer = self.checkpoints / "latest.json"
        if not pointer.exists():
            return None
        name = json.loads(pointer.read_text())["file"]
        state = json.loads((self.checkpoints / f"{name}.json").read_text())
        require(state["n_samples"] == self.data["source"].count, self.checkpoints / f"{name}.json",
                f"was written for {state['n_samples']} patches, the data has {self.data['source'].count}",
                "the same data as the interrupted run")
        with np.load(self.checkpoints / f"{name}.npz", allow_pickle=False) as arrays:
            self.learner.load_state_arrays(dict(arrays), self.checkpoints / f"{name}.npz")
        # The label store may hold rows of a round that was interrupted before its checkpoint; that
        # round is re-done identically, so those rows are dropped.
        rows = [row for row in read_label_store(require_file(self.store_path, "the run's label store"))
                if row["round"] <= state["round"]]
        if state["step"] == "awaiting_labels":
            rows = [row for row in rows if row["round"] < state["round"]]
        self.store, self.rows = rows, state["rows"]
        return state

    # -- label store --
    def add_labels(self, ids, labels, round_number, scores, strategy):
        self.store = self.store + label_rows(ids, labels, round_number, scores, strategy, self.data["locations"])
        atomic.write_csv(self.store_path, self.store, LABEL_FIELDS)

    def labelled(self):
        ids = np.array([row["id"] for row in self.store], dtype=np.int64)
        return ids, np.array([row["label"] for row in self.store], dtype=np.int64)

    def oracle(self, ids):
        return self.data["labels"][ids]

    # -- phases --
    def train_and_evaluate(self, round_number):
        from sklearn.metrics import roc_auc_score

        started = time.perf_counter()
        self.learner.reseed_dropout(self.seed, round_number, 0)
        ids, labels = self.labelled()
        rng = np.random.default_rng([self.seed, round_number, 1])
        train_loss = self.learner.train_round(self.data["source"].read(ids), labels, rng)
        test_auc = float("nan")
        if len(self.test_ids):
            truth = self.data["labels"][self.test_ids]
            if len(np.unique(truth)) == 2:
                test_auc = float(roc_auc_score(truth, self.learner.predict_positive(self.data["source"],
                                                                                     self.test_ids)))
        alpha = self.round_alpha(round_number)
        self.rows = [row for row in self.rows if row["round"] < round_number] + [{
            "round": round_number, "n_labeled": len(ids), "alpha": alpha, "test_auc": test_auc,
            "train_loss": train_loss, "meta_query_loss": float("nan"), "seconds": time.perf_counter() - started}]

    def round_alpha(self, round_number):
        return {"uncertainty": 1.0, "relevance": 0.0, "random": float("nan")}.get(self.strategy, alpha_for_round(
            self.args.alpha, self.args.alpha_schedule, round_number - 1, self.args.n_rounds))

    def query(self, round_number):
        """Score the unlabelled pool and return the top query_budget ids with their scores."""
        started = time.perf_counter()
        labelled_ids, _ = self.labelled()
        candidates = np.setdiff1d(self.pool_ids, labelled_ids)
        rng = np.random.default_rng([self.seed, round_number, 2])
        if self.strategy == "random":
            chosen = rng.choice(candidates, min(self.args.query_budget, len(candidates)), replace=False)
            scores = [None] * len(chosen)
        else:
            alpha = self.round_alpha(round_number)
            self.learner.reseed_dropout(self.seed, round_number, 2)
            uncertainty = (self.learner.pool_uncertainty(self.data["source"], candidates) if alpha > 0
                           else np.zeros(len(candidates)))
            score = acquisition_score(uncertainty, self.relevance[candidates], alpha)
            chosen = select_top_k(candidates, score, self.args.query_budget, rng)
            scores = list(score[np.searchsorted(candidates, chosen)])
        self.rows[-1]["seconds"] += time.perf_counter() - started
        return chosen, scores

    def adapt(self, round_number, ids, labels):
        """Reptile on the newly labelled batch (only when it holds at least 4 samples)."""
        started = time.perf_counter()
        if len(ids) >= 4 and self.args.meta_lr > 0:
            self.learner.reseed_dropout(self.seed, round_number, 3)
            rng = np.random.default_rng([self.seed, round_number, 3])
            loss = self.learner.reptile(self.data["source"].read(ids), labels, rng)
            self.rows[-1]["meta_query_loss"] = loss
        self.rows[-1]["seconds"] += time.perf_counter() - started

    def write_rounds(self):
        atomic.write_csv(self.arm_dir / "rounds.csv", [{k: fmt(row[k]) for k in ROUND_FIELDS} for row in self.rows],
                         ROUND_FIELDS)

    def print_row(self, row):
        print(f"{self.strategy:>11} seed {self.seed} | round {row['round']:>2} | labelled {row['n_labeled']:>4} | "
              f"alpha {row['alpha']:.2f} | test AUC {row['test_auc']:.4f} | train loss {row['train_loss']:.4f} | "
              f"meta query loss {row['meta_query_loss']:.4f} | {row['seconds']:.1f}s", flush=True)

    def run(self):
        """Run or continue to args.n_rounds; returns False when stopped to wait for queue labels."""
        state = self.load_latest() if self.args.resume else None
        if state is None:
            self.learner.initialise(self.seed)
            self.store, self.rows = [], []
            if self.args.oracle == "csv":
                return self.stop_for_labels(0, self.initial_ids, [None] * len(self.initial_ids))
            self.add_labels(self.initial_ids, self.oracle(self.initial_ids), 0, [None] * len(self.initial_ids),
                            "initial")
            next_round = 1
        else:
            next_round = state["round"] + 1
            if state["step"] == "awaiting_labels":
                queue = state["queue"]
                labels = read_queue(self.arm_dir / f"queue_round{state['round']}.csv", queue["ids"])
                self.finish_query(state["round"], np.array(queue["ids"]), labels, queue["scores"])
            elif state["step"] == "trained" and state["round"] < self.args.n_rounds:
                if not self.query_and_adapt(state["round"]):
                    return False
        for round_number in range(next_round, self.args.n_rounds + 1):
            self.train_and_evaluate(round_number)
            if round_number == self.args.n_rounds:
                self.save_checkpoint(round_number, "trained")
                self.write_rounds()
                self.print_row(self.rows[-1])
                break
            if not self.query_and_adapt(round_number):
                return False
        return True

    def query_and_adapt(self, round_number):
        ids, scores = self.query(round_number)
        if self.args.oracle == "csv":
            return self.stop_for_labels(round_number, ids, scores)
        self.finish_query(round_number, ids, self.oracle(ids), scores)
        return True

    def stop_for_labels(self, round_number, ids, scores):
        path = write_queue(self.arm_dir, round_number, ids, scores, self.data)
        self.save_checkpoint(round_number, "awaiting_labels",
                             {"ids": [int(i) for i in ids], "scores": [None if s is None else float(s) for s in scores]})
        if not (self.arm_dir / "labels.csv").exists():
            atomic.write_csv(self.store_path, [], LABEL_FIELDS)
        self.write_rounds()
        if self.rows:
            self.print_row(self.rows[-1])
        print(f"oracle: label the {len(ids)} patches in {path} (0/1 in the label column; contact sheet "
              f"{path.with_suffix('.png').name}), then re-run the same command with --resume")
        return False

    def finish_query(self, round_number, ids, labels, scores):
        self.add_labels(ids, labels, round_number, scores, "initial" if round_number == 0 else self.strategy)
        if round_number > 0:
            self.adapt(round_number, ids, labels)
        self.save_checkpoint(round_number, "done")
        self.write_rounds()
        if round_number > 0:
            self.print_row(self.rows[-1])


def finite_mean(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


def fmt(value):
    return repr(value) if isinstance(value, float) else value


# ---- outputs ----

def save_auc_plot(curves, path, title):
    """AUC vs labelled count per strategy; mean +- std over seeds as a shaded band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for strategy, rows in curves.items():
        counts = np.array([row["n_labeled"] for row in rows])
        mean = np.array([row["auc_mean"] for row in rows])
        std = np.array([row["auc_std"] for row in rows])
        axis.plot(counts, mean, marker="o", label=f"{strategy} (n={rows[0]['n_seeds']})")
        axis.fill_between(counts, mean - std, mean + std, alpha=0.2)
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("labelled patches")
    axis.set_ylabel("test ROC-AUC")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    atomic.save_figure(figure, path)
    plt.close(figure)


def summarise_curves(all_rows):
    """{strategy: [{round, n_labeled, auc_mean, auc_std, n_seeds}]} over seeds (NaN AUCs skipped)."""
    curves = {}
    for strategy in dict.fromkeys(row["strategy"] for row in all_rows):
        rounds = sorted({row["round"] for row in all_rows if row["strategy"] == strategy})
        curves[strategy] = []
        for round_number in rounds:
            rows = [row for row in all_rows if row["strategy"] == strategy and row["round"] == round_number]
            aucs = np.array([row["test_auc"] for row in rows], dtype=np.float64)
            finite = aucs[np.isfinite(aucs)]
            curves[strategy].append({
                "strategy": strategy, "round": round_number, "n_labeled": rows[0]["n_labeled"],
                "auc_mean": float(finite.mean()) if len(finite) else float("nan"),
                "auc_std": float(finite.std()) if len(finite) else float("nan"), "n_seeds": len(rows)})
    return curves


@cli_entry
def main(args):
    runs.seed_everything(args.seed, args.deterministic)
    import keras

    runs.print_args(args)
    weights = parse_concept_weights(args.concept_weights)
    for name, value, minimum in (("n_rounds", args.n_rounds, 1), ("initial_budget", args.initial_budget, 1),
                                 ("query_budget", args.query_budget, 1), ("seeds", args.seeds, 1),
                                 ("epochs", args.epochs, 1), ("mc_passes", args.mc_passes, 1),
                                 ("ensemble_size", args.ensemble_size, 1)):
        require(value >= minimum, f"--{name}", f"is {value}", f"at least {minimum}")
    require(0.0 <= args.alpha <= 1.0, "--alpha", f"is {args.alpha}", "a value in [0, 1]")
    strategies = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    seeds = list(range(args.seed, args.seed + args.seeds))
    arms = [(strategy, seed) for strategy in strategies for seed in seeds]
    require(args.oracle == "simulated" or len(arms) == 1, "--oracle", "csv with several strategies or seeds",
            "one --strategy and --seeds 1 when a person labels the queue")

    # ---- data ----
    sources = [flag for flag, value in (("--demo", args.demo), ("--data_dir", args.data_dir),
                                        ("--geotiff", args.geotiff)) if value]
    require(len(sources) == 1, "arguments", f"{' and '.join(sources) or 'no data source'} given",
            "exactly one of --demo, --data_dir, --geotiff")
    if args.demo:
        demo_dir = Path(args.results_dir) / "demo_data" / SCRIPT_STEM
        images, labels, concepts = generate_synthetic(args.n_samples, args.image_size, args.signal, args.data_seed)
        write_dataset(demo_dir, images, labels, concepts)
        args.data_dir = str(demo_dir)
        print(f"demo: wrote {len(labels)} synthetic patches ({labels.mean():.0%} targets, signal "
              f"{args.signal}) to {demo_dir}")
    if args.geotiff:
        data = load_geotiff_dataset(args, list(weights))
    else:
        data = load_npy_dataset(args.data_dir, list(weights), args.near_industrial_threshold)
    require(data["labels"] is not None or args.oracle == "csv", "--labels_csv", "missing",
            "known labels for the simulated oracle, or --oracle csv")
    n_samples = data["source"].count
    image_size = data["source"].height
    require(data["source"].height == data["source"].width, data["name"], "patches are not square",
            "square patches")
    n_test = int(round(args.test_fraction * n_samples)) if data["labels"] is not None else 0
    print(f"data: {n_samples} patches of {image_size}x{image_size}x4, pool {n_samples - n_test}, test {n_test}, "
          f"positives {data['labels'].mean():.1%}" if data["labels"] is not None else
          f"data: {n_samples} patches, no known labels (test AUC is NaN)")
    require(n_samples - n_test >= args.initial_budget, data["name"], f"pool of {n_samples - n_test} patches",
            f"at least --initial_budget ({args.initial_budget}) patches")

    run_name = args.run_name or ("demo" if args.demo else
                                 f"{args.strategy}_{args.uncertainty}_alpha{args.alpha:g}_{args.alpha_schedule}"
                                 f"_seed{args.seed}" + (f"x{args.seeds}" if args.seeds > 1 else ""))
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, run_name, args.overwrite, args.resume)
    config_path = run_dir / "config.json"
    require(args.resume or args.overwrite or not config_path.exists(), run_dir,
            "an unfinished run with this name exists", "--resume to continue it, --overwrite to replace it, "
            "or another --run_name")
    if args.resume and config_path.exists():
        previous = json.loads(config_path.read_text())["args"]
        changed = [f"--{key} {previous.get(key)} -> {getattr(args, key)}" for key in RUN_IDENTITY
                   if previous.get(key) != getattr(args, key)]
        require(not changed, config_path, f"--resume with changed settings ({'; '.join(changed)})",
                "the settings of the run being resumed (only --n_rounds may grow)")
    runs.write_config(run_dir, args, n_samples=n_samples, n_test=n_test, image_size=image_size, arms=arms,
                 concept_weights=weights)
    print(f"run: {run_dir} ({len(arms)} run(s): {', '.join(strategies)} x seeds {seeds})")

    # ---- model ----
    learner = Learner(args, image_size)
    print(f"model: SimpleCNN x{len(learner.members)}, {learner.members[0].count_params()} parameters each; "
          f"uncertainty {args.uncertainty}")

    # ---- train ----
    all_rows, finished = [], True
    for strategy, seed in arms:
        arm_dir = run_dir if len(arms) == 1 else run_dir / f"{strategy}_seed{seed}"
        arm = ActiveLearningRun(args, data, learner, arm_dir, strategy, seed)
        if not arm.run():
            finished = False
            break
        atomic.save_keras(learner.members[0], arm_dir / "model.keras")
        for index, member in enumerate(learner.members[1:], start=1):
            atomic.save_keras(member, arm_dir / f"model_member{index}.keras")
        all_rows += [{"strategy": strategy, "seed": seed, **row} for row in arm.rows]
    if not finished:
        return None

    # ---- evaluate ----
    curves = summarise_curves(all_rows)
    if len(arms) > 1:
        atomic.write_csv(run_dir / "rounds.csv", [{k: fmt(v) for k, v in row.items()} for row in all_rows],
                         ["strategy", "seed", *ROUND_FIELDS])
        atomic.write_csv(run_dir / "strategy_comparison.csv", [row for rows in curves.values() for row in rows],
                         ["strategy", "round", "n_labeled", "auc_mean", "auc_std", "n_seeds"])
    save_auc_plot(curves, run_dir / "auc_curve.png",
                  f"OWL-GPS: {args.uncertainty} uncertainty, alpha {args.alpha} ({args.alpha_schedule}), "
                  f"{len(seeds)} seed(s)")
    final = {strategy: rows[-1] for strategy, rows in curves.items()}
    metrics = {"n_rounds": args.n_rounds, "n_labeled": final[strategies[0]]["n_labeled"], "seeds": seeds,
               "uncertainty": args.uncertainty, "keras": keras.__version__,
               "final_test_auc": {s: row["auc_mean"] for s, row in final.items()},
               "final_test_auc_std": {s: row["auc_std"] for s, row in final.items()},
               "mean_test_auc_over_rounds": {s: finite_mean([r["auc_mean"] for r in rows])
                                             for s, rows in curves.items()}}
    atomic.write_json(run_dir / "metrics.json", metrics)
    summary = " ".join(f"{s}={row['auc_mean']:.4f}" + (f"+-{row['auc_std']:.4f}" if len(seeds) > 1 else "")
                       for s, row in final.items())
    print(f"final: test_auc {summary} n_labeled={metrics['n_labeled']} rounds={args.n_rounds} "
          f"uncertainty={args.uncertainty}")
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
