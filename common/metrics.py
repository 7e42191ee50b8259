"""Streaming confusion-matrix metrics for classification and segmentation.

`ConfusionMatrix.update` adds one batch of (truth, prediction) label arrays of any shape, so a test
set of millions of pixels is scored without holding them in memory. Derived metrics follow one
policy, stated here and in the README: a class absent from both truth and prediction has NaN
precision, recall, F1 and IoU and is left out of the macro means; a class present in only one of
them scores 0.
"""

import numpy as np


class ConfusionMatrix:
    """Accumulates counts[true, predicted] over batches; labels equal to `ignore_index` are skipped."""

    def __init__(self, num_classes, ignore_index=None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.counts = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, truth, prediction):
        truth = np.asarray(truth).reshape(-1).astype(np.int64)
        prediction = np.asarray(prediction).reshape(-1).astype(np.int64)
        if truth.shape != prediction.shape:
            raise ValueError(f"truth has {truth.size} labels but prediction has {prediction.size}")
        keep = np.ones(truth.shape, dtype=bool)
        if self.ignore_index is not None:
            keep &= truth != self.ignore_index
        truth, prediction = truth[keep], prediction[keep]
        if truth.size and (
            truth.min() < 0
            or truth.max() >= self.num_classes
            or prediction.min() < 0
            or prediction.max() >= self.num_classes
        ):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        self.counts += np.bincount(
            truth * self.num_classes + prediction, minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)
        return self

    def merge(self, other):
        self.counts += other.counts
        return self

    def metrics(self, class_names=None):
        return metrics_from_confusion(self.counts, class_names)


def _ratio(numerator, denominator):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def metrics_from_confusion(counts, class_names=None):
    """Accuracy, macro/weighted precision, recall, F1, IoU and per-class values from a count matrix."""
    counts = np.asarray(counts, dtype=np.float64)
    num_classes = counts.shape[0]
    true_positive = np.diag(counts)
    support = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    present = (support + predicted) > 0

    precision = _ratio(true_positive, predicted)
    recall = _ratio(true_positive, support)
    f1 = _ratio(2 * true_positive, support + predicted)
    iou = _ratio(true_positive, support + predicted - true_positive)
    # A class seen in only one of truth/prediction is a real error: it scores 0, not NaN.
    for values in (precision, recall):
        values[present & np.isnan(values)] = 0.0

    def macro(values):
        kept = values[present]
        return float(np.nanmean(kept)) if kept.size and not np.all(np.isnan(kept)) else float("nan")

    total = counts.sum()
    weights = support / total if total else np.zeros(num_classes)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    return {
        "accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "macro_iou": macro(iou),
        "weighted_f1": float(np.nansum(np.nan_to_num(f1) * weights)),
        "per_class": [
            {
                "class": names[i],
                "support": int(support[i]),
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "iou": float(iou[i]),
            }
            for i in range(num_classes)
        ],
    }


def finite_or_none(value):
    """`value` as a float, or None when it is missing or not finite (JSON has no NaN)."""
    return None if value is None or not np.isfinite(value) else float(value)


def json_safe(metrics):
    """`metrics_from_confusion` output with NaN (class absent from truth and prediction) as None."""
    result = {key: finite_or_none(value) for key, value in metrics.items() if key != "per_class"}
    result["per_class"] = [
        {key: (finite_or_none(value) if isinstance(value, float) else value) for key, value in row.items()}
        for row in metrics["per_class"]
    ]
    return result
