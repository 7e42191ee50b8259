"""The AWIR data protocol of the TG-MATL scripts: labels, box features, box clusters, the one fold split.

As in the paper's reference code (docs/tgmatl.md): `data.npz` holds `class_label` (N,) in {0,1,2}
and `box_label` (N,4) pixel boxes `[xmin, xmax, ymin, ymax]` in 300x300 images; the
foundation-model embeddings are `embeddings/awir_{clip,dinov2,mae}_emb.npy`. One fold protocol (a
fixed stratified test set and 8 stratified folds of the remaining pool, stratified by class x box
cluster) is computed once, saved to `results/splits/folds_test{test_size}.json`, and reused by
every script. Also here: the flags the four igarss scripts share, the results-tree paths one script
writes and another reads, and the seeded synthetic AWIR-like data of `--demo`.
"""

import hashlib
import json
import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from common import atomic, cli, runs
from common.errors import InputError, require, require_file, require_finite, require_in_range

IMAGE_SIZE = 300
NUM_CLASSES = 3
NUM_FOLDS = 8
SPLIT_RANDOM_STATE = 42
EMBEDDING_NAMES = ("clip", "dinov2", "mae")
PAPER_EMBEDDING_WIDTHS = {"clip": 512, "dinov2": 768, "mae": 768}
BOX_FEATURE_NAMES = (
    "width",
    "height",
    "area",
    "ssd",
    "perimeter",
    "diagonal",
    "aspect",
    "log_aspect",
    "thinness",
    "log_inertia_ratio",
    "gyration_radius_sq",
    "log_area",
    "angle",
)
EPS = 1e-12


# ---- loading and validation ----

# What reading a damaged archive raises: an empty file (EOFError), a cut zip (BadZipFile), a cut or
# corrupt member (zlib.error, EOFError, ValueError), a file that is not one (OSError, ValueError).
UNREADABLE_ARCHIVE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)
NPZ_EXPECTED = "a NumPy .npz archive with numeric arrays 'class_label' (N,) and 'box_label' (N,4)"
# Upper bounds of the numeric flags: far above the paper's values (5000 epochs, batch 32), low enough
# that a typing slip is refused instead of running for ever.
MAX_EPOCHS = 1_000_000
MAX_WORKERS = 256
MAX_SEED = 2**32 - 1
# The --results_dir / --embeddings_dir check of every TG-MATL script (extract_embeddings.py calls it here).
require_writable_dir = runs.require_writable_folder


def first_line(error) -> str:
    """An exception's message on one line (for the one-line error)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_protocol_arguments(args) -> None:
    """The flags of add_protocol_arguments (and --calibration_epochs where present) are in range and
    --results_dir can be written: checked before anything is read or written, so a slip ends in one line."""
    require_in_range(args, "epochs", 1, MAX_EPOCHS)
    require_in_range(args, "batch_size", 1)
    inside = math.isfinite(args.test_size) and 0 < args.test_size < 1
    require(inside, "--test_size", f"is {args.test_size}", "a fraction in (0, 1)")
    require_in_range(args, "learning_rate", 0, 10, low_open=True)
    require_in_range(args, "workers", 1, MAX_WORKERS)
    require_in_range(args, "seed", 0, MAX_SEED)
    if hasattr(args, "calibration_epochs"):
        require_in_range(args, "calibration_epochs", 0, MAX_EPOCHS)
    require_writable_dir(args.results_dir)


def check_batch_size(batch_size, num_samples, data_path) -> None:
    """A batch holds at most every sample (a bigger one would only pad every step with empty rows)."""
    require(
        batch_size <= num_samples,
        "--batch_size",
        f"is {batch_size} but {data_path} has {num_samples} samples",
        f"a batch size of at most {num_samples}",
    )


def load_labels(data_path):
    """Read and validate `class_label` and `box_label` only (images stay on disk: npz is lazy per key)."""
    data_path = require_file(data_path, "the TG-MATL data.npz (class_label, box_label)")
    try:
        archive = np.load(data_path, allow_pickle=False)
    except UNREADABLE_ARCHIVE as error:
        raise InputError(data_path, f"cannot be read as .npz ({first_line(error)})", NPZ_EXPECTED) from None
    require(isinstance(archive, np.lib.npyio.NpzFile), data_path, "is a single .npy array", NPZ_EXPECTED)
    with archive:
        for key in ("class_label", "box_label"):
            require(
                key in archive.files,
                data_path,
                f"has no '{key}' array (found {archive.files})",
                "arrays 'class_label' (N,) and 'box_label' (N,4)",
            )
        try:
            class_label = archive["class_label"]
            box_label = archive["box_label"]
        except ValueError as error:
            raise InputError(
                data_path, f"holds unreadable arrays ({first_line(error)})", NPZ_EXPECTED
            ) from None
        except UNREADABLE_ARCHIVE as error:
            raise InputError(data_path, f"is damaged ({first_line(error)})", NPZ_EXPECTED) from None
    where = f"{data_path}[class_label]"
    require(class_label.ndim == 1, where, f"has shape {class_label.shape}", "shape (N,)")
    require(
        np.issubdtype(class_label.dtype, np.number),
        where,
        f"has dtype {class_label.dtype}",
        "integer class ids",
    )
    require_finite(class_label, where, "class labels")
    require(
        np.all(class_label == np.round(class_label)),
        where,
        "holds non-integer values",
        "integer class ids 0..2",
    )
    class_label = class_label.astype(np.int64)
    bad = np.flatnonzero((class_label < 0) | (class_label >= NUM_CLASSES))
    require(
        bad.size == 0,
        where,
        f"sample {bad[0] if bad.size else ''} has class {class_label[bad[0]] if bad.size else ''}",
        f"class ids in 0..{NUM_CLASSES - 1}",
    )
    where = f"{data_path}[box_label]"
    require(
        box_label.ndim == 2 and box_label.shape[1] == 4,
        where,
        f"has shape {box_label.shape}",
        "shape (N, 4) as [xmin, xmax, ymin, ymax]",
    )
    require(
        len(box_label) == len(class_label),
        where,
        f"has {len(box_label)} rows but class_label has {len(class_label)}",
        "one box per sample",
    )
    require(np.issubdtype(box_label.dtype, np.number), where, f"has dtype {box_label.dtype}", "numbers")
    require_finite(box_label, where, "box coordinates")
    box_label = box_label.astype(np.float64)
    for low, high, axis in ((0, 1, "x"), (2, 3, "y")):
        bad = np.flatnonzero(box_label[:, low] > box_label[:, high])
        require(
            bad.size == 0,
            where,
            f"sample {bad[0] if bad.size else ''} has {axis}min > {axis}max "
            f"({box_label[bad[0], low] if bad.size else ''} > {box_label[bad[0], high] if bad.size else ''})",
            f"[xmin, xmax, ymin, ymax] with {axis}min <= {axis}max",
        )
    require(
        len(class_label) >= 2 * NUM_FOLDS,
        data_path,
        f"has only {len(class_label)} samples",
        f"at least {2 * NUM_FOLDS} samples for the 8-fold protocol",
    )
    return class_label, box_label


def add_protocol_arguments(parser, demo_help: str) -> None:
    """The flags of the four igarss scripts: inputs, the fold protocol, training, run control, --demo."""
    parser.add_argument(
        "--data",
        default="data.npz",
        help="data.npz with class_label (N,) and box_label (N,4) [xmin,xmax,ymin,ymax].",
    )
    parser.add_argument(
        "--embeddings_dir",
        default="embeddings",
        help="Folder of awir_{clip,dinov2,mae}_emb.npy, (N, D).",
    )
    parser.add_argument(
        "--embeddings",
        nargs="+",
        default=list(EMBEDDING_NAMES),
        choices=EMBEDDING_NAMES,
        help="Which foundation embeddings to use.",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Mini-batch size (paper: 32).")
    parser.add_argument(
        "--test_size",
        type=float,
        default=0.7,
        help="Fraction held out as the fixed test set (paper: 0.7, i.e. 168 of 240).",
    )
    parser.add_argument(
        "--epochs", type=int, default=5000, help="Training epochs (paper: 5000, no early stop)."
    )
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4).")
    cli.add_workers_argument(
        parser, default=min(os.cpu_count() or 1, 8), what="stacks of heads trained side by side, one per core"
    )
    # Finished heads live at the reference's fixed paths, so there is no run folder: a re-run reuses
    # them when the training arguments agree and --overwrite retrains them.
    cli.add_run_arguments(parser, run_name=False, resume=False)
    cli.add_demo_argument(parser, demo_help)


def add_calibration_argument(parser) -> None:
    """--calibration_epochs of igarss_exp1.py and igarss_exp2.py (stacked_training.calibrate_costs)."""
    parser.add_argument(
        "--calibration_epochs",
        type=int,
        default=20,
        help="Epochs of each per-method timing run that splits a stack's wall time by each method's own "
        "cost (0: split evenly).",
    )


def checked_folds(folds):
    """--folds as sorted unique fold numbers; a number outside 1..8 is an InputError."""
    bad_folds = [fold for fold in folds if not 1 <= fold <= NUM_FOLDS]
    if bad_folds:
        raise InputError("--folds", f"has {bad_folds}", f"fold numbers in 1..{NUM_FOLDS}")
    return sorted(set(folds))


def demo_inputs(args, script: str) -> tuple[Path, Path]:
    """--demo: the synthetic AWIR-like data and embeddings, written once from `args.seed`.

    Every igarss script regenerates the same data from the same seed, so the folds file and the heads
    of an earlier stage apply.
    """
    return make_demo_data(cli.demo_data_dir(args, script), seed=args.seed)


# The hint of `runs.check_same_settings` when earlier TG-MATL outputs were made with other arguments
# (the four igarss scripts reuse finished heads in a fixed results tree rather than run folders).
RESUME_HINT = "the same arguments to resume, --overwrite to retrain, or another --results_dir"


def embedding_path(embeddings_dir, name):
    return Path(embeddings_dir) / f"awir_{name}_emb.npy"


def load_embedding(embeddings_dir, name, num_samples):
    """Load one (N, D) embedding matrix as float32 and check it agrees with data.npz."""
    path = require_file(
        embedding_path(embeddings_dir, name), f"the {name} embeddings (N, D) as awir_{name}_emb.npy"
    )
    try:
        embedding = np.load(path, allow_pickle=False, mmap_mode="r")
    except UNREADABLE_ARCHIVE as error:
        raise InputError(
            path, f"cannot be read as .npy ({first_line(error)})", "a numeric (N, D) .npy array"
        ) from None
    require(isinstance(embedding, np.ndarray), path, "is an .npz archive", "a numeric (N, D) .npy array")
    require(embedding.ndim == 2, path, f"has shape {embedding.shape}", "shape (N, D)")
    require(
        np.issubdtype(embedding.dtype, np.floating) or np.issubdtype(embedding.dtype, np.integer),
        path,
        f"has dtype {embedding.dtype}",
        "float embeddings",
    )
    require(
        len(embedding) == num_samples,
        path,
        f"has {len(embedding)} rows but data.npz has {num_samples} samples",
        "one row per sample",
    )
    embedding = np.asarray(embedding, dtype=np.float32)
    require_finite(embedding, path, "embeddings")
    return embedding


# ---- box targets (the MATL and TG-MATL papers' box annotations; docs/tgmatl.md) ----


def box_width_height(box_label):
    """Clip boxes to the 300 px image; width and height are never negative."""
    box = np.clip(np.asarray(box_label, dtype=np.float64), 0, IMAGE_SIZE)
    width = np.maximum(box[:, 1] - box[:, 0], 0.0)
    height = np.maximum(box[:, 3] - box[:, 2], 0.0)
    return box, width, height


def box_location(box_label):
    """Box centre (x_c, y_c) / 300: the 2-d location target."""
    box, _, _ = box_width_height(box_label)
    return np.stack([(box[:, 0] + box[:, 1]) / 2, (box[:, 2] + box[:, 3]) / 2], axis=1) / IMAGE_SIZE


def raw_box_features(box_label):
    """The 13 box-geometry features in the reference code's order, before any normalisation."""
    _, width, height = box_width_height(box_label)
    area = width * height
    ssd = 1.0 - np.minimum(width / (height + EPS), height / (width + EPS))
    perimeter = 2 * (width + height)
    diagonal = np.sqrt(width**2 + height**2)
    aspect = width / (height + EPS)
    log_aspect = np.log(aspect + EPS)
    thinness = 4 * np.pi * area / (perimeter**2 + EPS)
    inertia_xx = width * height**3 / 12
    inertia_yy = height * width**3 / 12
    log_inertia_ratio = np.log((inertia_xx + EPS) / (inertia_yy + EPS))
    gyration_radius_sq = (inertia_xx + inertia_yy) / (area + EPS)
    log_area = np.log(area + EPS)
    angle = np.arctan2(height, width)
    return np.stack(
        [
            width,
            height,
            area,
            ssd,
            perimeter,
            diagonal,
            aspect,
            log_aspect,
            thinness,
            log_inertia_ratio,
            gyration_radius_sq,
            log_area,
            angle,
        ],
        axis=1,
    )


def min_max_scale(values, reference=None):
    """Scale each column to [0, 1] with the min/max of `reference` (default: `values` itself)."""
    reference = values if reference is None else reference
    low, high = reference.min(axis=0), reference.max(axis=0)
    return (values - low) / np.maximum(high - low, EPS)


def box_features(box_label):
    """13-d box features, min-max normalised over the whole dataset, as the reference code does."""
    return min_max_scale(raw_box_features(box_label))


def box_cluster_labels(box_label):
    """The MATL box annotation: KMeans(k=3) on min-max scaled (w, h, area, SSD). Ids are arbitrary."""
    from sklearn.cluster import KMeans

    features = raw_box_features(box_label)[:, [0, 1, 2, 3]]
    kmeans = KMeans(n_clusters=3, n_init=10, random_state=SPLIT_RANDOM_STATE)
    return kmeans.fit_predict(min_max_scale(features)).astype(np.int64)


# ---- the fold protocol ----


def labels_fingerprint(class_label, box_label):
    digest = hashlib.sha256()
    digest.update(np.asarray(class_label, dtype=np.int64).tobytes())
    digest.update(np.asarray(box_label, dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def folds_path(results_dir, test_size):
    return Path(results_dir) / "splits" / f"folds_test{test_size}.json"


def make_folds(class_label, box_cluster, test_size):
    """Fixed stratified test set + StratifiedKFold(8) of the pool, both by class x box cluster."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    composite = class_label * 3 + box_cluster
    indices = np.arange(len(class_label))
    try:
        pool, test = train_test_split(
            indices, test_size=test_size, stratify=composite, random_state=SPLIT_RANDOM_STATE
        )
        splitter = StratifiedKFold(n_splits=NUM_FOLDS, shuffle=True, random_state=SPLIT_RANDOM_STATE)
        import warnings

        with warnings.catch_warnings():
            # Small strata are legal (sklearn warns when a stratum has fewer members than folds).
            warnings.filterwarnings("ignore", message="The least populated class")
            folds = [(pool[train], pool[val]) for train, val in splitter.split(pool, composite[pool])]
    except ValueError as error:
        counts = np.bincount(composite, minlength=9)
        raise InputError(
            "data.npz",
            f"cannot be split by class x box cluster ({error}); stratum sizes {counts.tolist()}",
            "each class x box-cluster stratum large enough for a "
            f"stratified test split and {NUM_FOLDS} folds",
        ) from None
    return np.sort(test), [(np.sort(train), np.sort(val)) for train, val in folds]


def load_or_make_folds(results_dir, test_size, class_label, box_label, box_cluster):
    """Reuse `results/splits/folds_test{test_size}.json`, or compute and save it once."""
    path = folds_path(results_dir, test_size)
    fingerprint = labels_fingerprint(class_label, box_label)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            test = np.asarray(saved["test"], dtype=np.int64)
            folds = [
                (np.asarray(f["train"], dtype=np.int64), np.asarray(f["val"], dtype=np.int64))
                for f in saved["folds"]
            ]
            num_samples, saved_fingerprint = saved["num_samples"], saved["labels_fingerprint"]
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(
                path,
                f"is not a valid folds file ({error})",
                "the JSON written by igarss_exp1.py; delete it to recompute",
            ) from None
        require(
            num_samples == len(class_label) and saved_fingerprint == fingerprint,
            path,
            f"was made for other data (N={num_samples}, labels {saved_fingerprint}; now "
            f"N={len(class_label)}, labels {fingerprint})",
            "the same data.npz; delete the folds file (and results trained on it) or use another "
            "--results_dir",
        )
        require(len(folds) == NUM_FOLDS, path, f"has {len(folds)} folds", f"{NUM_FOLDS} folds")
        return test, folds
    test, folds = make_folds(class_label, box_cluster, test_size)
    atomic.write_json(
        path,
        {
            "test_size": test_size,
            "num_samples": len(class_label),
            "labels_fingerprint": fingerprint,
            "protocol": "train_test_split(stratify=class*3+box_cluster, random_state=42) then "
            "StratifiedKFold(8, shuffle=True, random_state=42) on the pool",
            "box_cluster": box_cluster.tolist(),
            "test": test.tolist(),
            "folds": [{"train": train.tolist(), "val": val.tolist()} for train, val in folds],
        },
    )
    return test, folds


def load_awir(data_path, embeddings_dir, embedding_names, results_dir, test_size, batch_size=None):
    """Everything an igarss script needs: labels, box targets, clusters, folds and the embeddings.

    Every input is read and checked (and `batch_size` against the number of samples) before the
    folds file, the first output, is written.
    """
    class_label, box_label = load_labels(data_path)
    if batch_size is not None:
        check_batch_size(batch_size, len(class_label), data_path)
    embeddings = {name: load_embedding(embeddings_dir, name, len(class_label)) for name in embedding_names}
    box_cluster = box_cluster_labels(box_label)
    test, folds = load_or_make_folds(results_dir, test_size, class_label, box_label, box_cluster)
    return {
        "class_label": class_label,
        "box_label": box_label,
        "box_cluster": box_cluster,
        "box_features": box_features(box_label),
        "box_location": box_location(box_label),
        "test": test,
        "folds": folds,
        "embeddings": embeddings,
    }


# ---- the built-in synthetic dataset ----


def make_demo_data(directory, num_samples=240, seed=0, widths=None):
    """Write a seeded AWIR-like `data.npz` + embeddings where class and box geometry are learnable.

    Each embedding is a random linear image of (class one-hot, box geometry) plus nuisance noise,
    so projection heads can separate classes and MATL can separate box clusters.
    """
    widths = widths or PAPER_EMBEDDING_WIDTHS
    rng = np.random.default_rng(seed)
    class_label = np.repeat(np.arange(NUM_CLASSES), int(np.ceil(num_samples / NUM_CLASSES)))[:num_samples]
    rng.shuffle(class_label)
    # Box size depends weakly on the class, so task guidance (box geometry vs class) carries signal.
    size_mode = rng.integers(0, 3, num_samples)
    width = np.clip(rng.normal(30 + 40 * size_mode + 10 * class_label, 8), 4, 200)
    height = np.clip(width * rng.choice([0.5, 1.0, 2.0], num_samples) + rng.normal(0, 4, num_samples), 4, 250)
    x_min = rng.uniform(0, IMAGE_SIZE - width)
    y_min = rng.uniform(0, IMAGE_SIZE - height)
    box_label = np.round(np.stack([x_min, x_min + width, y_min, y_min + height], axis=1)).astype(np.int64)
    geometry = box_features(box_label)
    signal = np.concatenate([np.eye(NUM_CLASSES)[class_label] * 1.0, geometry * 1.0], axis=1)
    directory = Path(directory)
    (directory / "embeddings").mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(directory / "data.npz") as temporary, open(temporary, "wb") as file:
        np.savez(file, class_label=class_label, box_label=box_label)
    for name in EMBEDDING_NAMES:
        mixing = rng.normal(0, 1, (signal.shape[1], widths[name]))
        embedding = signal @ mixing + rng.normal(0, 2.0, (num_samples, widths[name]))
        atomic.save_npy(embedding_path(directory / "embeddings", name), embedding.astype(np.float32))
    return directory / "data.npz", directory / "embeddings"


# ---- results-tree paths that one script writes and another reads ----


def method_tag(method, top_percent, random_percent):
    """File tag of an exp1 method; TG-MATL carries its selection percentages (tg_matl_30_10)."""
    if method != "tg_matl":
        return method
    return f"tg_matl_{round(top_percent * 100)}_{round(random_percent * 100)}"


def grid_tag(top_percent, random_percent):
    """The folder of one exp1-sweep grid point, tp{T}_rp{R} with T, R in integer percent."""
    return f"tp{round(top_percent * 100)}_rp{round(random_percent * 100)}"


def exp1_head_path(results_dir, embedding, tag, fold, model_subdir=""):
    """Where igarss_exp1.py (model_subdir "") and its sweep (tp{T}_rp{R}) save a projection head."""
    folder = Path(results_dir) / "trained_models" / "exp1_emb_proj" / embedding / model_subdir
    return folder / f"{tag}_best_fold{fold}.h5"
