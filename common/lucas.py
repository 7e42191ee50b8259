"""LUCAS 2018 land-cover chips and results: labels CSV, chip reader, split, demo chips, metrics, tables.

The layout is the one of the TerraMind-on-LUCAS study: `<root>/<STR18>/<Point_ID>.tif` 6-band float
reflectance GeoTIFFs ([B4, B3, B2, B8, B11, B12]) plus `<root>/chips_LC_class.csv` with the columns
`Point_ID, STR18`. STR18 codes 1..10 map to class indices 0..9. Every user mistake (a missing chip, a
chip without 6 bands, a bad label, NaN reflectance) is an `InputError` naming the file. Precomputed
embeddings (one row per CSV row) stand in for the chips of a frozen-backbone probe. Keras backbones
take the 6 bands as input; 3-channel RGB weights are adapted to them (R, G, B -> B4, B3, B2). The
metrics are the study's (OA, macro accuracy = balanced accuracy, macro F1 / precision, per class),
with a streaming macro accuracy for checkpoint selection, and the trade-off tables and plots.
"""

import warnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import layers, ops

from common import atomic, fused_bn, pipelines, plots, reports
from common.errors import InputError, require, require_dir, require_file, require_finite
from common.metrics import ConfusionMatrix
from common.raster import open_geotiff, read_window, write_geotiff

LABELS_CSV_NAME = "chips_LC_class.csv"
BAND_NAMES = ["B4", "B3", "B2", "B8", "B11", "B12"]  # R, G, B, broad NIR, SWIR1, SWIR2
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
BACKBONES = ["resnet50", "resnet101", "efficientnetv2b0", "mobilenetv3small", "convnexttiny", "simplecnn"]
# Keras ResNets were trained on caffe-style BGR input: their first kernel's channels are B, G, R.
BGR_BACKBONES = {"resnet50", "resnet101"}


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


def stratified_split(labels, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/val(/test) index split (sklearn, random_state=seed), every class in every split.

    With test_fraction 0 this is exactly the study's train_test_split(test_size=0.2, stratify=y,
    random_state=42). sklearn can leave a small class out of a split by rounding; then one chip of
    it moves over from the split holding most of that class (never triggers at LUCAS counts).

    Returns:
        {"train", "val"[, "test"]: sorted indices}, a partition of `range(len(labels))`.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    indices = np.arange(len(labels))
    splits = {}
    rest = indices
    if test_fraction > 0:
        rest, splits["test"] = train_test_split(
            indices, test_size=test_fraction, stratify=labels, random_state=seed
        )
    splits["train"], splits["val"] = train_test_split(
        rest, test_size=val_fraction / (1.0 - test_fraction), stratify=labels[rest], random_state=seed
    )
    names = list(splits)
    for label in np.unique(labels):
        for name in names:
            if np.any(labels[splits[name]] == label):
                continue
            donor = max(names, key=lambda other: int(np.sum(labels[splits[other]] == label)))
            if np.sum(labels[splits[donor]] == label) < 2:
                continue
            moved = splits[donor][labels[splits[donor]] == label][-1]
            splits[donor] = splits[donor][splits[donor] != moved]
            splits[name] = np.append(splits[name], moved)
    return {name: np.sort(split) for name, split in splits.items()}


def chip_size(sizes: set, image_size: int | None, data_root) -> int:
    """`image_size` when given, else the one square size of all chips (`sizes` from `locate_chips`)."""
    if image_size:
        return image_size
    expected = "one chip size, or --image_size to resize all chips"
    require(len(sizes) == 1, data_root, f"has chips of sizes {sorted(sizes)}", expected)
    height, width = next(iter(sizes))
    require(height == width, data_root, "has non-square chips", "square chips, or --image_size")
    return height


def as_tokens(embeddings: np.ndarray) -> np.ndarray:
    """`(N, D)` -> `(N, 1, D)`; `(N, T, D)` stays; `(N, h, w, D)` -> `(N, h*w, D)`."""
    return embeddings.reshape(len(embeddings), -1, embeddings.shape[-1])


def read_embeddings(path, labels_csv, count: int) -> np.ndarray:
    """Precomputed embeddings, one row per labels-CSV row in CSV order, as float32 tokens `(N, T, D)`.

    Args:
        path: a `.npy` array shaped `(N, D)`, `(N, T, D)` or `(N, h, w, D)`.
        labels_csv: the labels CSV (named in errors).
        count: its number of rows.
    """
    path = require_file(path, "a .npy array of embeddings")
    try:
        embeddings = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise InputError(path, f"cannot be read ({error})", "a numeric .npy array") from None
    require(
        embeddings.ndim in (2, 3, 4) and np.issubdtype(embeddings.dtype, np.number),
        path,
        f"has shape {embeddings.shape} and dtype {embeddings.dtype}",
        "numeric (N, D), (N, T, D) or (N, h, w, D)",
    )
    problem = f"has {len(embeddings)} rows but {labels_csv} has {count}"
    require(len(embeddings) == count, path, problem, "one row per CSV row, in CSV order")
    require_finite(embeddings, path, "embeddings")
    return as_tokens(embeddings.astype(np.float32))


def write_demo_chips(root, scale: float, chip_size: int = 32, seed: int = 0) -> Path:
    """Write seeded synthetic LUCAS-like chips and their labels CSV under `root` (kept if present).

    Each class has a rough reflectance signature in [B4, B3, B2, B8, B11, B12]; every chip mixes in
    another class and gets texture and noise, in the study's class counts x `scale` (at least 5 chips
    per class; from scale 0.25 up the floor never binds, so the imbalance is LUCAS's, 704 : 20).
    """
    root = Path(root)
    chips_per_class = [max(5, round(count * scale)) for count in STUDY_CHIP_COUNTS]
    if (root / LABELS_CSV_NAME).is_file():
        # Kept only when written with this scale; other counts (another --demo_scale) are rewritten.
        written = np.bincount(read_labels(root / LABELS_CSV_NAME)[1], minlength=len(CLASS_NAMES))
        if written.tolist() == chips_per_class:
            return root
    # Neighbouring signatures overlap on purpose.
    spectra = np.array(
        [[.08, .09, .06, .30, .25, .15], [.07, .08, .05, .27, .22, .13], [.06, .08, .05, .32, .24, .12],
         [.03, .05, .03, .30, .15, .07], [.05, .07, .04, .24, .20, .11], [.15, .14, .12, .22, .30, .25],
         [.12, .11, .10, .18, .20, .18], [.03, .04, .05, .02, .01, .01], [.04, .06, .07, .04, .02, .01],
         [.30, .30, .32, .35, .28, .24]],
        np.float32,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    rows, point_id = [], 100000
    yy, xx = np.mgrid[0:chip_size, 0:chip_size] / chip_size
    for class_index, count in enumerate(chips_per_class):
        for _ in range(count):
            # Land-cover mixing: each chip is partly another class, which makes minorities hard.
            other = rng.integers(len(spectra))
            mixing = rng.uniform(0.0, 0.5)
            spectrum = (1 - mixing) * spectra[class_index] + mixing * spectra[other]
            phase, frequency = rng.uniform(0, 2 * np.pi), rng.uniform(2, 8)
            texture = 0.15 * np.sin(2 * np.pi * frequency * (xx + (class_index % 3) * yy) + phase)
            noise = rng.normal(0, 0.25, (len(BAND_NAMES), chip_size, chip_size))
            chip = spectrum[:, None, None] * (1 + texture[None] + noise)
            point_id += 1
            write_geotiff(root / str(class_index + 1) / f"{point_id}.tif", chip.astype(np.float32))
            rows.append({"Point_ID": point_id, "STR18": class_index + 1})
    atomic.write_csv(root / LABELS_CSV_NAME, rows, ["Point_ID", "STR18"])
    return root


# ---- metrics ----


def classification_metrics(truth, prediction):
    """OA, macro accuracy (balanced accuracy), macro F1 / precision, per-class values, confusion counts."""
    confusion = ConfusionMatrix(len(CLASS_NAMES)).update(truth, prediction)
    values = confusion.metrics(CLASS_NAMES)
    support = confusion.counts.sum(axis=1)
    rows = values["per_class"]
    recall = np.array([row["recall"] for row in rows])
    # Per class, the study's accuracy is the recall.
    kept = ("class", "support", "precision", "f1")
    per_class = [{key: row[key] for key in kept} | {"accuracy": row["recall"]} for row in rows]
    return {
        "overall_accuracy": values["accuracy"],
        # Balanced accuracy: a class absent from the truth has no recall and is not averaged.
        "macro_accuracy": float(np.mean(recall[support > 0])),
        "macro_f1": values["macro_f1"],
        "macro_precision": values["macro_precision"],
        "per_class": per_class,
        "confusion_matrix": confusion.counts.tolist(),
    }


@keras.saving.register_keras_serializable(package="rsrepro")
class MacroAccuracy(keras.metrics.Metric):
    """Streaming macro accuracy (= balanced accuracy = mean recall over classes present in the truth).

    The in-graph twin of `classification_metrics`' macro accuracy, for `--monitor val_macro_accuracy`;
    test_macro_accuracy_equals_sklearn_balanced_accuracy proves both equal to sklearn's.
    """

    def __init__(self, num_classes, name="macro_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        shape = (self.num_classes, self.num_classes)
        self.counts = self.add_variable(shape=shape, initializer="zeros", name="counts", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        prediction = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        pairs = ops.bincount(truth * self.num_classes + prediction, minlength=self.num_classes**2)
        self.counts.assign_add(ops.cast(ops.reshape(pairs, (self.num_classes, self.num_classes)), "float32"))

    def result(self):
        support = ops.sum(self.counts, axis=1)
        recall = ops.diagonal(self.counts) / ops.maximum(support, 1.0)
        present = ops.cast(support > 0, "float32")
        return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        self.counts.assign(ops.zeros_like(self.counts))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def write_tables(run_dir, summary: dict, split: str, headline_keys: list) -> None:
    """summary_<split>.csv / .md (the trade-off table over `headline_keys`) and per_class_<split>.csv."""
    columns = [f"{key}_{stat}" for key in headline_keys for stat in ("mean", "std")]
    header = [f"config ({split}, mean +- std over seeds)", "OA", "macro acc", "macro F1", "macro precision"]
    rows, cells, per_class = [], [], []
    for config, v in summary.items():
        rows.append({"config": config, "split": split, "seeds": v["seeds"]})
        rows[-1] |= {column: round(v[column], 4) for column in columns}
        means = [reports.format_mean_std(v[f"{k}_mean"], v[f"{k}_std"], 3) for k in headline_keys]
        cells.append([config, *means])
        accuracies = zip(CLASS_NAMES, v["per_class_accuracy_mean"], v["per_class_accuracy_std"], strict=True)
        for name, mean, std in accuracies:
            per_class.append({"config": config, "class": name, "accuracy_mean": round(mean, 4)})
            per_class[-1]["accuracy_std"] = round(std, 4)
    markdown = reports.markdown_table(header, cells)
    reports.write_table(run_dir / f"summary_{split}", rows, list(rows[0]), markdown)
    atomic.write_csv(run_dir / f"per_class_{split}.csv", per_class, list(per_class[0]))


def plot_results(run_dir, summary: dict, split: str) -> None:
    """Per-class accuracy bars of every configuration and one confusion matrix per configuration."""
    figure, axis = plots.pyplot().subplots(figsize=(11, 4))
    bars = {name: (v["per_class_accuracy_mean"], v["per_class_accuracy_std"]) for name, v in summary.items()}
    plots.grouped_bars(axis, CLASS_NAMES, bars)
    axis.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=30, ha="right")
    axis.set(ylabel=f"per-class accuracy ({split})", ylim=(0, 1))
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plots.save(figure, run_dir / f"per_class_accuracy_{split}.png")
    for config, v in summary.items():
        title = f"{config} ({split}, summed over {v['seeds']} seeds, row-normalised)"
        path = run_dir / f"confusion_{config.replace('/', '_')}_{split}.png"
        plots.confusion_matrix(v["confusion_matrix_sum"], CLASS_NAMES, path, title, "counts", fontsize=7)


# ---- Keras backbones for the 6-band chips ----


def simple_cnn(input_shape):
    """Three strided Conv-BN-ReLU blocks: a small CPU-friendly backbone for demos and tests."""
    inputs = keras.Input(input_shape)
    x = inputs
    for width in (32, 64, 128):
        x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    return keras.Model(inputs, x, name="simplecnn")


def backbone_constructor(name):
    """The Keras application for `--backbone` (ImageNet preprocessing layers off: inputs are 6 bands)."""
    applications = keras.applications
    return {
        "resnet50": applications.ResNet50,
        "resnet101": applications.ResNet101,
        "efficientnetv2b0": lambda **kw: applications.EfficientNetV2B0(include_preprocessing=False, **kw),
        "mobilenetv3small": lambda **kw: applications.MobileNetV3Small(include_preprocessing=False, **kw),
        "convnexttiny": lambda **kw: applications.ConvNeXtTiny(include_preprocessing=False, **kw),
        "simplecnn": lambda input_shape, **kw: simple_cnn(input_shape),
    }[name]


def adapt_first_kernel(kernel, bands, bgr):
    """RGB kernel `(kh, kw, 3, out)` -> `(kh, kw, bands, out)` (README, differences: RGB weights).

    B4, B3, B2 get the R, G, B filters, the extra bands their mean, and everything is scaled by
    3 / bands to keep the activation scale.
    """
    rgb = kernel[:, :, ::-1] if bgr else kernel
    extra = np.repeat(rgb.mean(axis=2, keepdims=True), bands - 3, axis=2)
    return np.concatenate([rgb, extra], axis=2) * (3.0 / bands)


def load_weights_strictly(model, path):
    """model.load_weights, where a partial load (Keras only warns and keeps fresh weights) also fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    skipped = [str(warning.message) for warning in caught if "Skipping" in str(warning.message)]
    if skipped:
        raise ValueError(skipped[0])


def build_backbone(name, image_size, weights=None):
    """Keras backbone with 6 input bands, optionally initialised from local 6- or 3-channel weights.

    Its batch-norm layers run through TensorFlow's fused kernel (`common.fused_bn`).
    """
    backbone = _backbone_with_weights(name, image_size, weights)
    fused_bn.fuse(backbone)
    return backbone


def _backbone_with_weights(name, image_size, weights):
    constructor = backbone_constructor(name)
    bands = len(BAND_NAMES)
    with warnings.catch_warnings():
        # Keras notes that ImageNet models expect 1 or 3 channels: 6 bands is the point here.
        warnings.filterwarnings("ignore", message="This model usually expects 1 or 3 input channels")
        backbone = constructor(include_top=False, weights=None, input_shape=(image_size, image_size, bands))
    if not weights:
        print(f"backbone {name}: random initialisation (no --weights given)")
        return backbone
    weights = require_file(weights, f"a Keras weights file for {name}")
    try:
        load_weights_strictly(backbone, weights)
        print(f"backbone {name}: loaded 6-band weights from {weights}")
        return backbone
    except (ValueError, OSError, KeyError):
        pass
    rgb_backbone = constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    try:
        load_weights_strictly(rgb_backbone, weights)
    except (ValueError, OSError, KeyError) as error:
        problem = f"does not fit {name} with 6 or 3 input channels ({str(error).splitlines()[0][:120]})"
        raise InputError(weights, problem, f"weights saved from Keras {name}") from None
    adapted = False
    for source, target in zip(rgb_backbone.layers, backbone.layers, strict=True):
        values = source.get_weights()
        if values and not adapted and values[0].ndim == 4 and values[0].shape[2] == 3:
            values[0] = adapt_first_kernel(values[0], bands, name in BGR_BACKBONES)
            adapted = True
        target.set_weights(values)
    print(f"backbone {name}: RGB weights from {weights} adapted to {bands} bands")
    return backbone
