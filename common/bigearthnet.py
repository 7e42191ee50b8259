"""BigEarthNet v2 (reBEN) reader: LMDB of safetensors band dicts, metadata.parquet, single positives, demo.

Layout (Clasen et al., "reBEN: Refined BigEarthNet Dataset for Remote Sensing Image Analysis"): an LMDB
whose key is the patch id and whose value is a safetensors dict of band name -> 2-D uint16 array (120 /
60 / 20 px for the 10 / 20 / 60 m bands), and `metadata.parquet` with `patch_id, labels, split, ...,
contains_seasonal_snow, contains_cloud_or_shadow`. Values become reflectance (/ 10000); bands below
10 m are resampled bilinearly to the model size. Single positives live in
`train_{random,dominant}_single_labels.npy` ((training patches x 19), +1 observed, 0 unobserved).
"""

import os
from pathlib import Path

import numpy as np

from common import atomic, spml
from common.errors import InputError, require, require_dir, require_file

# The 19-class nomenclature in its usual order; column j of every label matrix is class j.
CLASSES = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
BAND_SIZES = {
    "B02": 120,
    "B03": 120,
    "B04": 120,
    "B08": 120,
    "B05": 60,
    "B06": 60,
    "B07": 60,
    "B8A": 60,
    "B11": 60,
    "B12": 60,
    "B01": 20,
    "B09": 20,
}
_ENVIRONMENTS = {}


def open_lmdb(path):
    """One read-only LMDB environment per process and path, shared by tf.data's reader threads.

    LMDB environments are thread-safe for readers, and LMDB forbids opening the same environment twice
    in one process, so the parallel map's threads share it; each read uses its own short transaction.
    """
    import lmdb

    key = (os.getpid(), str(path))
    if key not in _ENVIRONMENTS:
        _ENVIRONMENTS[key] = lmdb.open(
            str(path),
            readonly=True,
            lock=False,
            readahead=False,
            max_readers=2048,
            subdir=Path(path).is_dir(),
        )
    return _ENVIRONMENTS[key]


def decode_value(value: bytes, bands, image_size: int, out=None) -> np.ndarray:
    """safetensors bytes (dict band -> 2-D uint16) -> float32 reflectance (H, W, bands) at image_size.

    Writes into `out` when given (one preallocated batch array, no per-image stacking copies).
    """
    import cv2
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
        if array.shape != (image_size, image_size):
            array = cv2.resize(
                array.astype(np.float32), (image_size, image_size), interpolation=cv2.INTER_LINEAR
            )
        out[..., channel] = array
    out *= np.float32(1e-4)
    return out


def read_patches(lmdb_path, patch_ids, bands, image_size: int) -> np.ndarray:
    """Read and decode a batch of patches in one read transaction -> float32 `(N, H, W, bands)`."""
    out = np.empty((len(patch_ids), image_size, image_size, len(bands)), np.float32)
    with open_lmdb(lmdb_path).begin(buffers=False) as transaction:
        for row, patch_id in enumerate(patch_ids):
            value = transaction.get(patch_id.encode("utf-8"))
            require(value is not None, lmdb_path, f"key {patch_id} missing", "an LMDB record per patch")
            try:
                decode_value(value, bands, image_size, out[row])
            except Exception as error:  # any decoding failure of user data is reported as one line
                raise InputError(
                    lmdb_path,
                    f"value of key {patch_id} is undecodable ({error})",
                    "a safetensors dict of 2-D Sentinel-2 band arrays",
                ) from None
    return out


def batch_reader(lmdb_path, bands, image_size: int, wrap=None):
    """A tf.data map function: a batch of patch ids -> float32 images, one Python call per batch.

    `wrap` (e.g. `pipelines.ReaderErrors().wrap`) decorates the Python reader so that its InputErrors
    can be surfaced after tf.data wrapped them. The function is marked `.batched`.
    """
    import tensorflow as tf

    def read_numpy(patch_ids):
        # One call per batch: the per-call cost of py_function would otherwise dominate small patches.
        return read_patches(lmdb_path, [p.decode("utf-8") for p in patch_ids.numpy()], bands, image_size)

    read_numpy = wrap(read_numpy) if wrap else read_numpy

    def read(patch_ids):
        images = tf.py_function(read_numpy, [patch_ids], tf.float32)
        return tf.ensure_shape(images, (None, image_size, image_size, len(bands)))

    read.batched = True
    return read


def parse_bands(text: str) -> list[str]:
    """`"B04,B03"` -> `["B04", "B03"]`; unknown bands are an InputError naming --bands."""
    bands = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in bands if b not in BAND_SIZES]
    require(
        bands and not unknown,
        "--bands",
        f"unknown band(s) {', '.join(unknown)}",
        f"a comma list of {', '.join(BAND_SIZES)}",
    )
    return bands


def read_metadata(metadata_path, drop_snow_cloud: bool):
    """metadata.parquet as a DataFrame (snow / cloud patches dropped) and its (patches x 19) label matrix."""
    import pandas as pd

    try:
        metadata = pd.read_parquet(metadata_path)
    except Exception as error:
        raise InputError(
            metadata_path, f"unreadable parquet ({type(error).__name__})", "the reBEN metadata.parquet"
        ) from None
    for column in ("patch_id", "labels", "split"):
        require(
            column in metadata.columns,
            metadata_path,
            f"column {column!r} missing",
            "columns patch_id, labels, split",
        )
    if drop_snow_cloud:
        for flag in ("contains_seasonal_snow", "contains_cloud_or_shadow"):
            if flag in metadata.columns:
                metadata = metadata[~metadata[flag].astype(bool)]
    class_index = {name: i for i, name in enumerate(CLASSES)}
    full = np.zeros((len(metadata), len(CLASSES)), np.uint8)
    for row, labels in enumerate(metadata["labels"]):
        for label in labels:
            require(
                label in class_index,
                metadata_path,
                f"patch {metadata['patch_id'].iloc[row]} has unknown label {label!r}",
                "one of the 19 BigEarthNet classes",
            )
            full[row, class_index[label]] = 1
    return metadata, full


def check_lmdb(lmdb_path, patch_ids, parts, bands, image_size: int) -> None:
    """Every key must exist before training starts, and the first 16 values of each split must decode."""
    with open_lmdb(lmdb_path).begin() as transaction:
        keys = {bytes(k).decode("utf-8", "replace") for k in transaction.cursor().iternext(values=False)}
    absent = [p for p in patch_ids if p not in keys]
    require(
        not absent,
        lmdb_path,
        f"{len(absent)} patch id(s) missing as keys (first: {absent[0] if absent else ''})",
        "one record per metadata.parquet patch_id",
    )
    for rows in parts.values():
        read_patches(lmdb_path, list(patch_ids[rows[:16]]), bands, image_size)


def read_class_fractions(path, train_ids) -> np.ndarray:
    """Per-patch class area fractions (CSV or parquet: patch_id + 19 class columns) of `train_ids`."""
    import pandas as pd

    path = require_file(
        path, "a class-fraction table (patch_id + one column per class) for dominant single positives"
    )
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = [c for c in ("patch_id", *CLASSES) if c not in table.columns]
    require(
        not missing, path, f"column(s) missing: {', '.join(missing[:3])}", "patch_id + the 19 class names"
    )
    table = table.set_index(table["patch_id"].astype(str))
    absent = [p for p in train_ids if p not in table.index]
    require(
        not absent,
        path,
        f"no row for training patch {absent[0] if absent else ''}",
        "a row per training patch",
    )
    return table.loc[list(train_ids), list(CLASSES)].to_numpy(np.float64)


def read_single_positives(path, train_full: np.ndarray) -> np.ndarray:
    """A saved `.npy` of single positives: (patches x 19) 0/1, or one class index per patch."""
    try:
        observed = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise InputError(path, f"unreadable .npy ({error})", "a numeric array") from None
    if observed.ndim == 1 and np.issubdtype(observed.dtype, np.integer) and observed.size == len(train_full):
        require(
            observed.min() >= 0 and observed.max() < len(CLASSES),
            path,
            "class index out of range",
            "indices 0..18",
        )
        observed = np.eye(len(CLASSES), dtype=np.uint8)[observed]
    require(
        observed.shape == train_full.shape,
        path,
        f"shape {observed.shape}",
        f"shape {train_full.shape} (training patches x 19 classes, +1 observed / 0 unobserved)",
    )
    require(np.isin(observed, (0, 1)).all(), path, "values outside 0/1", "+1 observed positive, 0 unobserved")
    observed = observed.astype(np.uint8)
    spml.check_single_positives(observed, train_full, path)
    return observed


def train_single_positives(
    root: Path, train_full, train_ids, mode: str, seed: int, class_fractions
) -> np.ndarray:
    """The saved single positives of the train split, or random / dominant ones generated and saved."""
    path = root / f"train_{mode}_single_labels.npy"
    if path.exists():
        return read_single_positives(path, train_full)
    if mode == "random":
        observed = spml.single_positive_random(train_full, seed)
    elif mode == "dominant":
        fractions = read_class_fractions(class_fractions or root / "class_fractions.csv", train_ids)
        observed = spml.single_positive_dominant(train_full, fractions)
    else:
        raise InputError(
            "--single_positive",
            "manual single positives exist only for AID",
            "random or dominant for BigEarthNet v2",
        )
    atomic.save_npy(path, observed.astype(np.uint8))
    return observed


def load(
    data_dir,
    single_positive: str,
    seed: int,
    image_size: int,
    bands: str = "B04,B03,B02,B08",
    lmdb_path="",
    metadata="",
    class_fractions="",
    drop_snow_cloud: bool = True,
) -> dict:
    """The three splits: `{"class_names", "train", "val", "test", "reader": "benv2", "lmdb_path", "bands"}`.

    Sources are patch ids; empty paths default to `<data_dir>/lmdb`, `<data_dir>/metadata.parquet` and
    `<data_dir>/class_fractions.csv`. Validation single positives are drawn at random (seeded).
    """
    root = require_dir(data_dir, "the BigEarthNet v2 folder with metadata.parquet and the LMDB")
    metadata_path = require_file(metadata or root / "metadata.parquet", "the reBEN metadata.parquet")
    lmdb_path = Path(lmdb_path or root / "lmdb")
    require(lmdb_path.exists(), lmdb_path, "LMDB not found", "the reBEN LMDB (folder with data.mdb)")
    table, full = read_metadata(metadata_path, drop_snow_cloud)
    bands = parse_bands(bands)
    split = table["split"].astype(str).to_numpy()
    patch_ids = table["patch_id"].astype(str).to_numpy()
    parts = {name: np.flatnonzero(split == name) for name in ("train", "validation", "test")}
    for name, rows in parts.items():
        require(rows.size, metadata_path, f"no {name!r} rows", "train, validation and test splits")
    check_lmdb(lmdb_path, patch_ids, parts, bands, image_size)
    train_full, train_ids = full[parts["train"]], patch_ids[parts["train"]]
    observed = train_single_positives(root, train_full, train_ids, single_positive, seed, class_fractions)
    val_full = full[parts["validation"]]
    return {
        "class_names": CLASSES,
        "train": {"sources": list(train_ids), "full": train_full, "observed": observed},
        "val": {
            "sources": list(patch_ids[parts["validation"]]),
            "full": val_full,
            "observed": spml.single_positive_random(val_full, seed),
        },
        "test": {"sources": list(patch_ids[parts["test"]]), "full": full[parts["test"]]},
        "reader": "benv2",
        "lmdb_path": str(lmdb_path),
        "bands": bands,
    }


def write_demo(root, num_patches: int, seed: int) -> Path:
    """A tiny reBEN-layout copy: LMDB of safetensors band dicts + metadata.parquet + class_fractions.csv."""
    import lmdb
    import pandas as pd
    from safetensors.numpy import save as save_safetensors

    root = Path(root)
    if (root / "metadata.parquet").exists():
        return root
    rng = np.random.default_rng(seed)
    rows, fractions = [], []
    (root / "lmdb").mkdir(parents=True, exist_ok=True)
    environment = lmdb.open(str(root / "lmdb"), map_size=1 << 30)
    with environment.begin(write=True) as transaction:
        for i in range(num_patches):
            present = rng.choice(len(CLASSES), size=int(rng.integers(1, 4)), replace=False)
            fraction = np.zeros(len(CLASSES))
            fraction[present] = rng.dirichlet(np.ones(len(present)))
            bands = {}
            for band, size in BAND_SIZES.items():
                level = 300 + 400 * np.sin(np.arange(len(CLASSES)) + len(band)) @ fraction + 500
                bands[band] = (rng.normal(level, 50, size=(size, size))).clip(0, 65535).astype(np.uint16)
            patch_id = f"S2A_MSIL2A_DEMO_{i:05d}"
            transaction.put(patch_id.encode(), save_safetensors(bands))
            rows.append(
                {
                    "patch_id": patch_id,
                    "labels": [CLASSES[c] for c in sorted(present)],
                    "split": ("train", "train", "train", "validation", "test")[i % 5],
                    "country": "Demo",
                    "contains_seasonal_snow": False,
                    "contains_cloud_or_shadow": False,
                }
            )
            fractions.append([patch_id, *fraction])
    environment.close()
    atomic.write_text(
        root / "class_fractions.csv",
        pd.DataFrame(fractions, columns=["patch_id", *CLASSES]).to_csv(index=False),
    )
    with atomic.atomic_path(root / "metadata.parquet") as temporary:
        pd.DataFrame(rows).to_parquet(temporary)
    return root
