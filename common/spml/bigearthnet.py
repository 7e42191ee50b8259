"""BigEarthNet v2 (reBEN) reader: LMDBs of safetensors band dicts, metadata.parquet, single positives, demo.

Layout as released (Clasen et al., "reBEN: Refined BigEarthNet Dataset for Remote Sensing Image Analysis";
the LMDB is written by rico-hdl or make_benv2_lmdb.py): an LMDB whose key is the Sentinel-2 patch name and
whose value is a safetensors dict of band name -> 2-D uint16 array (120 / 60 / 20 px for the 10 / 20 / 60
m bands); the key `<patch name>_reference_map` holds `{"Data": (120, 120) uint16 CORINE codes}`.
`metadata.parquet` has `patch_id, labels, split, ..., contains_seasonal_snow, contains_cloud_or_shadow`.
One LMDB (`<data_dir>/lmdb`) or one per split (`<data_dir>/BigEarthNetV2_LMDB/{train,val,test}_BENv2.lmdb`).
Values become reflectance (/ 10000); every band not at the model size is resampled with ConfigILM's rule
(BENv2DataSet: `F.interpolate(mode="nearest")`), batch by batch (`common.spml.band_records`).
Label matrices use the BigEarthNet-19 order of `CLASSES` (the paper's); ConfigILM's alphabetical order
(`CONFIGILM_CLASS_ORDER`) is refused. Single positives live in `train_{random,dominant}_single_labels.npy`
((training patches x 19), +1 observed, 0 unobserved); dominant ones come from the reference maps.
"""

import contextlib
import os
from pathlib import Path

import numpy as np

from common import atomic
from common.errors import InputError, require, require_dir, require_file
from common.spml import band_records, single_positives

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
# ConfigILM's BENv2 utilities sort the class names (lex_sorted=True); a file in that order is refused.
CONFIGILM_CLASS_ORDER = tuple(sorted(CLASSES))
# BigEarthNet-19 nomenclature: the CORINE Land Cover level-3 codes of each class (Sumbul et al. 2021);
# codes of the removed classes (122-142, 332, 334, 335, 423) and unlabelled pixels belong to none.
CLC_CODES = (
    (111, 112),
    (121,),
    (211, 212, 213),
    (221, 222, 223, 241),
    (231,),
    (242,),
    (243,),
    (244,),
    (311,),
    (312,),
    (313,),
    (321, 333),
    (322, 323),
    (324,),
    (331,),
    (411, 412),
    (421, 422),
    (511, 512),
    (521, 522, 523),
)
REFERENCE_MAP_SUFFIX = "_reference_map"
SPLIT_LMDBS = {"train": "train_BENv2.lmdb", "validation": "val_BENv2.lmdb", "test": "test_BENv2.lmdb"}
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


def _lookup(transactions, keys) -> list:
    """The value of each key in the first transaction (LMDB) that holds it, None where none does."""
    values = []
    for key in keys:
        encoded, value = key.encode("utf-8"), None
        for transaction in transactions:
            value = transaction.get(encoded)
            if value is not None:
                break
        values.append(value)
    return values


def _with_values(lmdb_paths, keys, use, what: str, buffers: bool):
    """`use(values)` of `keys`, looked up in each LMDB in turn, inside the read transactions (so that
    `buffers=True` values, zero-copy views of the memory-mapped file, stay valid while `use` runs)."""
    paths = [lmdb_paths] if isinstance(lmdb_paths, (str, Path)) else list(lmdb_paths)
    with contextlib.ExitStack() as stack:
        transactions = [stack.enter_context(open_lmdb(p).begin(buffers=buffers)) for p in paths]
        values = _lookup(transactions, keys)
        absent = [key for key, value in zip(keys, values, strict=True) if value is None]
        require(not absent, paths[0], f"key {absent[0] if absent else ''} missing", what)
        return use(values)


def read_values(lmdb_paths, keys, what: str = "an LMDB record per patch") -> list[bytes]:
    """The values (bytes) of `keys`, looked up in each LMDB in turn (one read transaction each)."""
    return _with_values(lmdb_paths, keys, list, what, buffers=False)


def read_patches(lmdb_paths, patch_ids, bands, image_size: int, buffers=None) -> np.ndarray:
    """Read and decode a batch of patches -> float32 reflectance `(N, H, W, bands)` (one LMDB or a list)
    with `band_records.decode_records` on zero-copy views of the LMDB (`buffers`: its output pool); a
    broken record is an InputError naming the LMDB and the patch."""
    try:
        decode = lambda values: band_records.decode_records(values, bands, image_size, buffers)  # noqa: E731
        return _with_values(lmdb_paths, patch_ids, decode, "an LMDB record per patch", buffers=True)
    except band_records.RecordError as error:
        path = lmdb_paths if isinstance(lmdb_paths, (str, Path)) else lmdb_paths[0]
        raise InputError(
            path,
            f"value of key {patch_ids[error.row]} is undecodable ({error})",
            "a safetensors dict of 2-D Sentinel-2 band arrays",
        ) from None


def batch_reader(lmdb_path, bands, image_size: int, wrap=None):
    """A tf.data map function: a batch of patch ids -> float32 images, one Python call per batch
    (`read_patches`; its NumPy copies run outside the GIL, so a few map threads overlap). The batches come
    from one `band_records.OutputBuffers` pool per reader and reach TensorFlow uncopied.

    `wrap` (e.g. `pipelines.ReaderErrors().wrap`) decorates the Python reader so that its InputErrors
    can be surfaced after tf.data wrapped them. The function is marked `.batched`.
    """
    import tensorflow as tf

    buffers = band_records.OutputBuffers()

    def read_numpy(patch_ids):
        names = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in patch_ids]
        return read_patches(lmdb_path, names, bands, image_size, buffers)

    read_numpy = wrap(read_numpy) if wrap else read_numpy

    def read(patch_ids):
        images = tf.numpy_function(read_numpy, [patch_ids], tf.float32, stateful=False)
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


def check_lmdb(lmdb_paths, patch_ids, parts, bands, image_size: int) -> None:
    """Every key must exist before training starts, and the first 16 values of each split must decode."""
    keys = set()
    for path in [lmdb_paths] if isinstance(lmdb_paths, (str, Path)) else lmdb_paths:
        with open_lmdb(path).begin() as transaction:
            keys |= {bytes(k).decode("utf-8", "replace") for k in transaction.cursor().iternext(values=False)}
    absent = [p for p in patch_ids if p not in keys]
    require(
        not absent,
        lmdb_paths if isinstance(lmdb_paths, (str, Path)) else ", ".join(map(str, lmdb_paths)),
        f"{len(absent)} patch id(s) missing as keys (first: {absent[0] if absent else ''})",
        "one record per metadata.parquet patch_id",
    )
    for rows in parts.values():
        read_patches(lmdb_paths, list(patch_ids[rows[:16]]), bands, image_size)


def clc_class_lookup() -> np.ndarray:
    """`lookup[code]` = BigEarthNet-19 class index of a CORINE level-3 code, -1 for codes of no class."""
    lookup = np.full(1000, -1, np.int64)
    for class_index, codes in enumerate(CLC_CODES):
        lookup[list(codes)] = class_index
    return lookup


def reference_map_fractions(lmdb_paths, patch_ids) -> np.ndarray:
    """Class area fractions `(patches, 19)` from the `<patch>_reference_map` records (CORINE codes)."""
    from safetensors.numpy import load as load_safetensors

    keys = [f"{patch_id}{REFERENCE_MAP_SUFFIX}" for patch_id in patch_ids]
    expected = "reference maps as `<patch>_reference_map` keys (rico-hdl --bigearthnet-reference-maps)"
    values = read_values(lmdb_paths, keys, expected + ", or --class_fractions")
    lookup, fractions = clc_class_lookup(), np.zeros((len(keys), len(CLASSES)))
    for row, value in enumerate(values):
        codes = load_safetensors(value)["Data"].astype(np.int64).ravel()
        classes = lookup[np.clip(codes, 0, lookup.size - 1)]
        fractions[row] = np.bincount(classes[classes >= 0], minlength=len(CLASSES)) / codes.size
    return fractions


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


def check_class_order(observed: np.ndarray, train_full: np.ndarray, path) -> None:
    """Refuse a label matrix in ConfigILM's alphabetical class order (it would silently mislabel)."""
    to_ours = [CONFIGILM_CLASS_ORDER.index(name) for name in CLASSES]
    wrong_here = ((observed > 0) & (train_full == 0)).any()
    fits_configilm = not ((observed[:, to_ours] > 0) & (train_full == 0)).any()
    require(
        not (wrong_here and fits_configilm),
        path,
        "columns are in ConfigILM's alphabetical class order",
        "the BigEarthNet-19 order of common/spml/bigearthnet.py (Urban fabric first, Marine waters last)",
    )


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
    check_class_order(observed, train_full, path)
    single_positives.check_single_positives(observed, train_full, path)
    return observed


def train_single_positives(
    root: Path, train_full, train_ids, mode: str, seed: int, class_fractions, lmdb_paths
) -> np.ndarray:
    """The saved single positives of the train split, or random / dominant ones generated and saved.

    Dominant: the positive with the largest area in the patch's reference map (or in --class_fractions).
    """
    path = root / f"train_{mode}_single_labels.npy"
    if path.exists():
        return read_single_positives(path, train_full)
    if mode == "random":
        observed = single_positives.single_positive_random(train_full, seed)
    elif mode == "dominant":
        if class_fractions:
            fractions = read_class_fractions(class_fractions, train_ids)
        else:
            fractions = reference_map_fractions(lmdb_paths, train_ids)
        observed = single_positives.single_positive_dominant(train_full, fractions)
    else:
        raise InputError(
            "--single_positive",
            "manual single positives exist only for AID",
            "random or dominant for BigEarthNet v2",
        )
    atomic.save_npy(path, observed.astype(np.uint8))
    return observed


def find_lmdbs(root: Path, lmdb_path) -> str | list[str]:
    """--lmdb_path, else `<root>/lmdb`, else the per-split `BigEarthNetV2_LMDB/<split>_BENv2.lmdb`."""
    if lmdb_path:
        require(
            Path(lmdb_path).exists(), lmdb_path, "LMDB not found", "the reBEN LMDB (folder with data.mdb)"
        )
        return str(lmdb_path)
    if (root / "lmdb").exists():
        return str(root / "lmdb")
    for folder in (root / "BigEarthNetV2_LMDB", root):
        split_paths = [folder / name for name in SPLIT_LMDBS.values()]
        if all(path.exists() for path in split_paths):
            return [str(path) for path in split_paths]
    names = "/".join(SPLIT_LMDBS.values())
    raise InputError(root, "no LMDB found", f"<data_dir>/lmdb or <data_dir>/BigEarthNetV2_LMDB/{{{names}}}")


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

    Sources are patch ids; `lmdb_path` is one LMDB or the list of per-split ones (`find_lmdbs`); the
    metadata is `<data_dir>/metadata.parquet` (or next to the per-split LMDBs) unless given. Validation
    single positives are drawn at random (seeded).
    """
    root = require_dir(data_dir, "the BigEarthNet v2 folder with metadata.parquet and the LMDB")
    if not metadata and not (root / "metadata.parquet").exists():
        metadata = root / "BigEarthNetV2_LMDB" / "metadata.parquet"
    metadata_path = require_file(metadata or root / "metadata.parquet", "the reBEN metadata.parquet")
    lmdb_paths = find_lmdbs(root, lmdb_path)
    table, full = read_metadata(metadata_path, drop_snow_cloud)
    bands = parse_bands(bands)
    split = table["split"].astype(str).to_numpy()
    patch_ids = table["patch_id"].astype(str).to_numpy()
    parts = {name: np.flatnonzero(split == name) for name in ("train", "validation", "test")}
    for name, rows in parts.items():
        require(rows.size, metadata_path, f"no {name!r} rows", "train, validation and test splits")
    check_lmdb(lmdb_paths, patch_ids, parts, bands, image_size)
    train_full, train_ids = full[parts["train"]], patch_ids[parts["train"]]
    observed = train_single_positives(
        root, train_full, train_ids, single_positive, seed, class_fractions, lmdb_paths
    )
    val_full = full[parts["validation"]]
    return {
        "class_names": CLASSES,
        "train": {"sources": list(train_ids), "full": train_full, "observed": observed},
        "val": {
            "sources": list(patch_ids[parts["validation"]]),
            "full": val_full,
            "observed": single_positives.single_positive_random(val_full, seed),
        },
        "test": {"sources": list(patch_ids[parts["test"]]), "full": full[parts["test"]]},
        "reader": "benv2",
        "lmdb_path": lmdb_paths,
        "bands": bands,
    }


def demo_patch(rng):
    """One generated patch: (present classes, {band: uint16}, (120, 120) CORINE reference map, fractions).

    The reference map paints each present class's first CORINE code over a share of the patch drawn
    from a Dirichlet; band levels depend on the class fractions, so that the classes are learnable.
    """
    present = rng.choice(len(CLASSES), size=int(rng.integers(1, 4)), replace=False)
    fraction = np.zeros(len(CLASSES))
    fraction[present] = rng.dirichlet(np.ones(len(present)))
    present = np.sort(present)
    cuts = np.round(np.cumsum(fraction[present]) * 120 * 120).astype(int)
    reference = np.zeros(120 * 120, np.uint16)
    for code_index, (start, end) in enumerate(zip([0, *cuts[:-1]], cuts, strict=True)):
        reference[start:end] = CLC_CODES[present[code_index]][0]
    bands = {}
    for band, size in BAND_SIZES.items():
        level = 300 + 400 * np.sin(np.arange(len(CLASSES)) + len(band)) @ fraction + 500
        bands[band] = (rng.normal(level, 50, size=(size, size))).clip(0, 65535).astype(np.uint16)
    return present, bands, reference.reshape(120, 120), fraction


def write_demo(root, num_patches: int, seed: int) -> Path:
    """A tiny reBEN-layout copy: one LMDB (bands + reference maps), metadata.parquet, class_fractions.csv."""
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
            present, bands, reference, fraction = demo_patch(rng)
            patch_id = f"S2A_MSIL2A_DEMO_{i:05d}"
            transaction.put(patch_id.encode(), save_safetensors(bands))
            reference_key = f"{patch_id}{REFERENCE_MAP_SUFFIX}".encode()
            transaction.put(reference_key, save_safetensors({"Data": reference}))
            rows.append(
                {
                    "patch_id": patch_id,
                    "labels": [CLASSES[c] for c in present],
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
