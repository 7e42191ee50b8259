"""BigEarthNet v2 (reBEN) reader: LMDBs of safetensors band dicts, metadata.parquet, single positives, demo.

Layout as released (Clasen et al., "reBEN: Refined BigEarthNet Dataset for Remote Sensing Image Analysis";
the LMDB is written by rico-hdl or make_benv2_lmdb.py): an LMDB whose key is the Sentinel-2 patch name and
whose value is a safetensors dict of band name -> 2-D uint16 array (120 / 60 / 20 px for the 10 / 20 / 60
m bands); the key `<patch name>_reference_map` holds `{"Data": (120, 120) uint16 CORINE codes}`.
`metadata.parquet` has `patch_id, labels, split, ..., contains_seasonal_snow, contains_cloud_or_shadow`.
One LMDB (`<data_dir>/lmdb`) or one per split (`<data_dir>/BigEarthNetV2_LMDB/{train,val,test}_BENv2.lmdb`).
Values become reflectance (/ 10000); every band not at the model size is resampled with ConfigILM's rule
(BENv2DataSet: `F.interpolate(mode="nearest")`, source index floor(i * in / out)), batch by batch.
Label matrices use the BigEarthNet-19 order of `CLASSES` (the paper's); ConfigILM's alphabetical order
(`CONFIGILM_CLASS_ORDER`) is refused. Single positives live in `train_{random,dominant}_single_labels.npy`
((training patches x 19), +1 observed, 0 unobserved); dominant ones come from the reference maps.
"""

import json
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
# safetensors dtype names -> NumPy (little-endian, as the format stores them).
SAFETENSORS_DTYPES = {"U8": "u1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4", "F16": "<f2"}
SAFETENSORS_DTYPES.update({"F32": "<f4", "F64": "<f8"})
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

    The readable one-record reference of `decode_values` (the batch decoder the pipeline uses).
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


def _record_layout(value: bytes, bands):
    """(header length, {band: (dtype, shape, start, end)}) of a safetensors record, or None if unusual."""
    if len(value) < 8:
        return None
    header_size = int.from_bytes(value[:8], "little")
    try:
        header = json.loads(value[8 : 8 + header_size])
        layout = {}
        for band in bands:
            entry = header[band]
            start, end = entry["data_offsets"]
            layout[band] = (np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"]), start, end)
    except (ValueError, KeyError, TypeError):
        return None
    if any(len(shape) != 2 for _, shape, _, _ in layout.values()):
        return None
    return 8 + header_size, layout


class RecordError(ValueError):
    """Record `row` of a batch could not be decoded (`error` says why)."""

    def __init__(self, row: int, error: Exception):
        super().__init__(str(error))
        self.row = row


def decode_band_arrays(values, bands) -> list[np.ndarray]:
    """A batch of safetensors records -> one `(N, h, w)` array per band at its stored size (no copies of
    floats: the stored integers), whole groups of records at a time.

    Records whose header bytes are identical (rico-hdl writes every patch alike) share one layout: their
    bytes become one `(n, record length)` array and each band a slice of it. A record of another layout
    takes the per-record safetensors reader, which also names what is wrong with a broken one.
    """
    from safetensors.numpy import load as load_safetensors

    groups = {}
    for row, value in enumerate(values):
        header_size = int.from_bytes(value[:8], "little") + 8 if len(value) >= 8 else 0
        groups.setdefault((len(value), value[:header_size]), []).append(row)
    parts = {band: [None] * len(values) for band in bands}
    for (length, header), rows in groups.items():
        layout = _record_layout(header, bands) if header else None
        if layout is None or any(end > length - layout[0] for *_, end in layout[1].values()):
            for row in rows:
                try:
                    arrays = load_safetensors(values[row])
                    for band in bands:
                        if band not in arrays:
                            raise KeyError(f"band {band} missing (has {', '.join(sorted(arrays))})")
                        if arrays[band].ndim != 2:
                            raise ValueError(f"band {band} has shape {arrays[band].shape}")
                        parts[band][row] = arrays[band][None]
                except Exception as error:
                    raise RecordError(row, error) from None
            continue
        raw = np.frombuffer(b"".join(values[row] for row in rows), np.uint8).reshape(len(rows), length)
        for band in bands:
            dtype, shape, start, end = layout[1][band]
            array = np.ascontiguousarray(raw[:, layout[0] + start : layout[0] + end]).view(dtype)
            array = array.reshape(len(rows), *shape)
            if len(groups) == 1:
                parts[band] = [array]
            else:
                for position, row in enumerate(rows):
                    parts[band][row] = array[position : position + 1]
    stacked = []
    for band in bands:
        shapes = {part.shape[1:] for part in parts[band]}
        if len(shapes) > 1:
            raise ValueError(f"band {band} comes in several sizes in one batch ({sorted(shapes)})")
        stacked.append(parts[band][0] if len(parts[band]) == 1 else np.concatenate(parts[band]))
    return stacked


def read_values(lmdb_paths, keys, what: str = "an LMDB record per patch") -> list[bytes]:
    """The values of `keys`, looked up in each LMDB in turn (one read transaction each)."""
    paths = [lmdb_paths] if isinstance(lmdb_paths, (str, Path)) else list(lmdb_paths)
    values = [None] * len(keys)
    for path in paths:
        with open_lmdb(path).begin(buffers=False) as transaction:
            for row, key in enumerate(keys):
                if values[row] is None:
                    values[row] = transaction.get(key.encode("utf-8"))
    absent = [key for key, value in zip(keys, values, strict=True) if value is None]
    require(not absent, paths[0], f"key {absent[0] if absent else ''} missing", what)
    return values


def read_band_arrays(lmdb_paths, patch_ids, bands) -> list[np.ndarray]:
    """`decode_band_arrays` of the patches' records; a broken record is an InputError naming the LMDB."""
    values = read_values(lmdb_paths, patch_ids)
    try:
        return decode_band_arrays(values, bands)
    except Exception as error:  # any decoding failure of user data is reported as one line
        path = lmdb_paths if isinstance(lmdb_paths, (str, Path)) else lmdb_paths[0]
        where = f"value of key {patch_ids[error.row]}" if isinstance(error, RecordError) else "a value"
        raise InputError(
            path,
            f"{where} is undecodable ({error})",
            "a safetensors dict of 2-D Sentinel-2 band arrays",
        ) from None


def read_stored_patches(lmdb_paths, patch_ids, bands, image_size: int) -> np.ndarray:
    """The stored integers of a batch, resampled (ConfigILM nearest) and stacked: `(N, H, W, bands)`."""
    arrays = read_band_arrays(lmdb_paths, patch_ids, bands)
    out = np.empty((len(patch_ids), image_size, image_size, len(bands)), arrays[0].dtype)
    # A few records at a time, so that the interleaved (channel-last) writes stay in the CPU cache.
    for start in range(0, len(patch_ids), 4):
        for channel, array in enumerate(arrays):
            block, target = array[start : start + 4], out[start : start + 4, ..., channel]
            height, width = block.shape[1:]
            if image_size % height == 0 and image_size % width == 0:
                # An integer factor f: nearest is the block repeat (floor(i / f)), one broadcast copy.
                f_rows, f_columns = image_size // height, image_size // width
                np.copyto(
                    target.reshape(len(block), height, f_rows, width, f_columns), block[:, :, None, :, None]
                )
            else:
                target[...] = resample_nearest(block, image_size)
    return out


def read_patches(lmdb_paths, patch_ids, bands, image_size: int) -> np.ndarray:
    """Read and decode a batch of patches -> float32 reflectance `(N, H, W, bands)` (one LMDB or a list)."""
    return read_stored_patches(lmdb_paths, patch_ids, bands, image_size).astype(np.float32) * np.float32(1e-4)


def batch_reader(lmdb_path, bands, image_size: int, wrap=None):
    """A tf.data map function: a batch of patch ids -> float32 images, one Python call per batch.

    Python reads the records and resamples the stored uint16 values (`read_stored_patches`, half the bytes
    of floats); the cast to float32 reflectance runs as one TensorFlow op outside the GIL.
    `wrap` (e.g. `pipelines.ReaderErrors().wrap`) decorates the Python reader so that its InputErrors
    can be surfaced after tf.data wrapped them. The function is marked `.batched`.
    """
    import tensorflow as tf

    def read_numpy(patch_ids):
        names = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in patch_ids]
        return read_stored_patches(lmdb_path, names, bands, image_size).astype(np.uint16, copy=False)

    read_numpy = wrap(read_numpy) if wrap else read_numpy

    def read(patch_ids):
        stored = tf.numpy_function(read_numpy, [patch_ids], tf.uint16, stateful=False)
        images = tf.cast(stored, tf.float32) * tf.constant(1e-4, tf.float32)
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
        "the BigEarthNet-19 order of common/bigearthnet.CLASSES (Urban fabric first, Marine waters last)",
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
    spml.check_single_positives(observed, train_full, path)
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
        observed = spml.single_positive_random(train_full, seed)
    elif mode == "dominant":
        if class_fractions:
            fractions = read_class_fractions(class_fractions, train_ids)
        else:
            fractions = reference_map_fractions(lmdb_paths, train_ids)
        observed = spml.single_positive_dominant(train_full, fractions)
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
            "observed": spml.single_positive_random(val_full, seed),
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
