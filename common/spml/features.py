"""Precomputed-feature SPML sets: one `.npz` of feature vectors, full labels, a split and optional positives.

The linear-probe setting (a frozen foundation model's embeddings under a linear or MLP head) and a fast
regime for studying the SPML methods. Keys: `features` `(N, D)` float, `labels` `(N, C)` 0/1 (the full
labels: validation selection and test metrics, as for AID), `split` `(N,)` strings train / val / test,
optional `observed` `(N, C)` (one 1 per training row; other rows ignored) and optional `class_names`.
`memorisation_task` writes a seeded set on which a head trained with assume-negative first learns the
classes and then memorises the false negatives (its test mAP rises, then falls).
"""

from pathlib import Path

import numpy as np

from common import atomic
from common.errors import require, require_file, require_finite
from common.spml import single_positives

SPLITS = ("train", "val", "test")


def load(path, single_positive: str = "random", seed: int = 0) -> dict:
    """The three splits of a features `.npz`: `sources` are the feature rows (float32)."""
    path = require_file(path, "a .npz with features, labels and split")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as error:
        require(False, path, f"not a readable .npz ({type(error).__name__})", "numpy.savez output")
    for key in ("features", "labels", "split"):
        require(key in arrays, path, f"no '{key}' array", "keys features, labels, split")
    features, labels, split = arrays["features"], arrays["labels"], arrays["split"].astype(str)
    require(features.ndim == 2 and features.shape[0] > 0, path, f"features {features.shape}", "(N, D)")
    count = features.shape[0]
    require(
        labels.shape[:1] == (count,) and labels.ndim == 2, path, f"labels {labels.shape}", f"({count}, C)"
    )
    require(split.shape == (count,), path, f"split {split.shape}", f"({count},) strings")
    require(np.issubdtype(features.dtype, np.number), path, "features are not numbers", "floats")
    require_finite(features.astype(np.float64), path, "features")
    require(np.isin(labels, (0, 1)).all(), path, "labels out of range", "0/1 entries")
    unknown = sorted(set(split) - set(SPLITS))
    require(not unknown, path, f"split value {unknown[:1]}", "train, val or test")
    missing = [part for part in ("train", "test") if not (split == part).any()]
    require(not missing, path, f"no {missing[:1]} rows", "train and test rows (val optional)")
    labels = labels.astype(np.uint8)
    train = split == "train"
    require(labels[train].sum(axis=1).min() > 0, path, "a training row without a positive", ">= 1 label")
    if "observed" in arrays:
        observed = arrays["observed"]
        require(observed.shape == labels.shape, path, f"observed {observed.shape}", f"{labels.shape}")
        observed = observed.astype(np.float32)
        single_positives.check_single_positives(observed[train], labels[train], path)
    else:
        require(single_positive == "random", path, f"no observed array for {single_positive}", "'observed'")
        observed = np.zeros(labels.shape, np.float32)
        observed[train] = single_positives.single_positive_random(labels[train], seed)
    names = arrays.get("class_names")
    names = [str(n) for n in names] if names is not None else [f"class_{i}" for i in range(labels.shape[1])]
    require(len(names) == labels.shape[1], path, f"{len(names)} class_names", f"{labels.shape[1]}")

    def part(name):
        rows = split == name
        return {
            "sources": features[rows].astype(np.float32),
            "full": labels[rows],
            "observed": observed[rows],
        }

    return {"class_names": names, "reader": "features", **{name: part(name) for name in SPLITS}}


def memorisation_task(
    path, seed: int = 0, num_classes: int = 20, dim: int = 64, counts=(600, 300, 1200), signal: float = 0.6
):
    """A seeded features set where assume-negative training first learns the classes, then memorises.

    Each class has a direction in feature space (N(0, signal^2) entries); an image's vector is the sum of
    its classes' directions plus unit Gaussian noise, strong enough that a 2-layer head fits the training
    set's assumed negatives (the false negatives included) only by memorising rows. About 3 positives
    per image. Writes `path` (`.npz`) and returns it.
    """
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(num_classes, dim)) * signal
    total = sum(counts)
    labels = (rng.random((total, num_classes)) < 3.0 / num_classes).astype(np.uint8)
    empty = labels.sum(axis=1) == 0
    labels[empty, rng.integers(0, num_classes, empty.sum())] = 1
    features = labels @ directions + rng.normal(size=(total, dim))
    split = np.repeat(np.array(SPLITS), counts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"features": features.astype(np.float32), "labels": labels, "split": split}
    arrays["class_names"] = np.array([f"class_{i}" for i in range(num_classes)])
    atomic.save_npz(path, arrays)
    return path
