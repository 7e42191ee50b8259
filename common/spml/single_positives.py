"""Single positives: one observed positive per image drawn from its full labels, and the check of a saved set.

The SPML protocol (Cole et al., "Multi-Label Learning from Single Positive Labels", CVPR 2021) keeps one
true positive per training image and leaves every other label unobserved. The encoding is the one every
SPML reader and loss here uses: 1 = observed positive, 0 = unobserved (full labels are 1 / 0). Random
single positives are drawn with a seed; dominant ones take the true positive with the largest area
(BigEarthNet v2's reference maps); manual ones come from an annotator (annotation_tool.py).
"""

import numpy as np

from common.errors import require


def single_positive_random(full_labels: np.ndarray, seed: int) -> np.ndarray:
    """One uniformly drawn true positive per row (seeded). Rows without positives stay all-unobserved."""
    rng = np.random.default_rng(seed)
    observed = np.zeros_like(full_labels, dtype=np.uint8)
    for row, labels in enumerate(full_labels):
        positives = np.flatnonzero(labels)
        if positives.size:
            observed[row, rng.choice(positives)] = 1
    return observed


def single_positive_dominant(full_labels: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """The true positive with the largest area fraction (`fractions` has the shape of `full_labels`)."""
    masked = np.where(full_labels > 0, fractions, -np.inf)
    observed = np.zeros_like(full_labels, dtype=np.uint8)
    has_positive = full_labels.sum(1) > 0
    observed[np.flatnonzero(has_positive), np.argmax(masked, axis=1)[has_positive]] = 1
    return observed


def check_single_positives(observed: np.ndarray, full_labels: np.ndarray, path) -> None:
    """InputError unless `observed` has the shape of `full_labels` and marks only true positives."""
    require(
        observed.shape == full_labels.shape, path, f"shape {observed.shape}", f"shape {full_labels.shape}"
    )
    wrong = np.flatnonzero(((observed > 0) & (full_labels == 0)).any(1))
    require(
        wrong.size == 0,
        path,
        f"row {wrong[0] if wrong.size else 0} marks a label that is not a true positive",
        "one true positive per row (delete the file to regenerate it)",
    )
