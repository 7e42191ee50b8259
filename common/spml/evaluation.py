"""SPML evaluation on full labels: mAP / micro AP / F1, compiled predictions, and the re-evaluation of a run.

The metrics are the paper's test metrics: mAP (macro over the classes with a test positive; classes
without one are skipped and reported), micro AP, macro and micro F1 at 0.5, and per-class AP and F1.
`evaluate_run` re-scores a finished run: train_multilabel_model.py --test_only, test_multilabel_model.py
and meta_parameters_tuning.py (the chosen configuration's test metrics, through the trainer) use it. The
data are re-read with the settings saved in the run's config.json, so the same run gives the same metrics
bit for bit on the same machine; the result is compared with the run's metrics.json.
"""

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from common import atomic, pipelines
from common.errors import InputError, require_file
from common.spml import batches

# The settings that decide which images a run reads and how: taken from config.json, never from the caller.
DATA_KEYS = (
    "dataset",
    "data_dir",
    "single_positive",
    "lmdb_path",
    "metadata",
    "bands",
    "drop_snow_cloud",
    "image_size",
    "batch_size",
    "val_fraction",
    "seed",
    "class_fractions",
)
COMPARED_KEYS = ("mAP", "micro_AP", "macro_F1", "micro_F1", "per_class")
PER_CLASS_COLUMNS = ["class", "test_positives", "ap", "f1"]


# ---- the metrics ----


def average_precision(labels, scores) -> float:
    """AP = mean precision at each positive's rank (ties broken by a stable sort), as sklearn computes it."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


def multilabel_metrics(scores, labels, class_names, threshold: float = 0.5) -> dict:
    """mAP (macro over classes with a test positive; skipped classes reported), micro AP, F1 at threshold.

    Args:
        scores: `(N, C)` sigmoid outputs.
        labels: `(N, C)` full 0/1 labels.
        class_names: C names, in column order.
        threshold: the score at and above which a label counts as predicted (F1 only).

    Returns:
        `{"mAP", "micro_AP", "macro_F1", "micro_F1", "classes_skipped", "per_class"}`, per_class being
        one `{"class", "test_positives", "ap", "f1"}` row per class.
    """
    labels = np.asarray(labels).astype(np.int64)
    predicted = (np.asarray(scores) >= threshold).astype(np.int64)
    per_class, kept_ap, kept_f1 = [], [], []
    for c, name in enumerate(class_names):
        positives = int(labels[:, c].sum())
        true_positive = int((predicted[:, c] & labels[:, c]).sum())
        denominator = int(predicted[:, c].sum()) + positives
        f1 = 2 * true_positive / denominator if denominator else float("nan")
        ap = average_precision(labels[:, c], scores[:, c]) if positives else float("nan")
        if positives:
            kept_ap.append(ap)
            kept_f1.append(f1)
        per_class.append({"class": name, "test_positives": positives, "ap": ap, "f1": f1})
    tp = int((predicted & labels).sum())
    micro_denominator = int(predicted.sum() + labels.sum())
    flat_scores = np.asarray(scores).ravel()
    micro_ap = average_precision(labels.ravel(), flat_scores) if labels.any() else float("nan")
    return {
        "mAP": float(np.mean(kept_ap)) if kept_ap else float("nan"),
        "micro_AP": micro_ap,
        "macro_F1": float(np.mean(kept_f1)) if kept_f1 else float("nan"),
        "micro_F1": 2 * tp / micro_denominator if micro_denominator else float("nan"),
        "classes_skipped": [row["class"] for row in per_class if row["test_positives"] == 0],
        "per_class": per_class,
    }


# ---- predictions ----


def compiled_probabilities(model):
    """The model's compiled inference step, sigmoid(model(images)), traced once per model and kept.

    A plain eager call runs the network op by op; the compiled graph is 1.5-1.7x faster on a CPU
    (bench/peer_speed.py). The batch size is left open so full and partial batches share one graph.
    """
    step = getattr(model, "_rsrepro_probabilities", None)
    if step is None:
        step = tf.function(lambda images: tf.sigmoid(model(images, training=False)), reduce_retracing=True)
        model._rsrepro_probabilities = step
    return step


def predict_probabilities(model, dataset) -> np.ndarray:
    """sigmoid(model) over (images, indices) batches, as float64 `(N, C)`."""
    step = compiled_probabilities(model)
    outputs = [step(images).numpy() for images, _ in dataset]
    return np.concatenate(outputs, axis=0).astype(np.float64)


def evaluate(model, dataset, labels, class_names) -> dict:
    """`multilabel_metrics` of the model's sigmoid outputs over `dataset` against the full `labels`."""
    return multilabel_metrics(predict_probabilities(model, dataset), labels, class_names)


# ---- the test set of a run ----


def evaluate_and_write(run_dir, model, test_dataset, data: dict, prefix: str = "") -> dict:
    """`evaluate` of `model` against the full test labels; writes `<prefix>per_class.csv`."""
    metrics = evaluate(model, test_dataset, data["test"]["full"], data["class_names"])
    atomic.write_csv(Path(run_dir) / f"{prefix}per_class.csv", metrics["per_class"], PER_CLASS_COLUMNS)
    return metrics


def summary_line(metrics: dict) -> str:
    """The last line every SPML run prints (it matches metrics.json).

    `test mAP | micro AP | macro F1 | micro F1 | method`, then AdaGC's trigger epoch, the reported epoch
    and its phase, and the last epoch's test mAP where metrics.json has them.
    """
    parts = [
        f"test mAP {metrics['mAP']:.4f}",
        f"micro AP {metrics['micro_AP']:.4f}",
        f"macro F1 {metrics['macro_F1']:.4f}",
        f"micro F1 {metrics['micro_F1']:.4f}",
        f"method {metrics['method']}",
    ]
    if metrics["method"] == "adagc":
        parts.append(f"trigger epoch {metrics.get('trigger_epoch')}")
    if metrics.get("best_epoch") is not None:
        parts.append(f"epoch {metrics['best_epoch']} ({metrics['best_phase']})")
    if metrics.get("last_epoch"):
        parts.append(f"last epoch mAP {metrics['last_epoch']['mAP']:.4f}")
    return " | ".join(parts)


def saved_settings(run_dir) -> dict:
    """The `args` of a run's config.json (an InputError names the folder when it is not a finished run)."""
    config_path = require_file(Path(run_dir) / "config.json", "a finished run folder (train it first)")
    try:
        return json.loads(config_path.read_text())["args"]
    except (ValueError, KeyError, TypeError):
        raise InputError(config_path, "is not a run record", "the config.json a training run wrote") from None


def load_saved_model(model_path):
    """The run's Keras model; a file that Keras cannot read ends in one line naming it."""
    import keras

    try:
        return keras.models.load_model(model_path)
    except Exception as error:  # Keras raises ValueError, OSError or zipfile errors for a damaged file
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        # Keras reports a damaged .keras file that exists as "File not found": do not repeat that.
        reason = "damaged or incomplete file" if "not found" in reason.lower() else reason
        raise InputError(model_path, f"cannot be read as a Keras model ({reason})", "a .keras file") from None


def evaluate_run(args, run_dir, load_data, make_loader, prefix: str = "test_only_") -> dict:
    """Re-evaluate `run_dir/best_model.keras` with the data settings saved in the run's config.json.

    Args:
        args: the parsed training arguments; their data settings are replaced by the saved ones.
        run_dir: `results/train_multilabel_model/<run_name>`.
        load_data: `args -> data` (the trainer's reader of the three splits).
        make_loader: `(data, image_size, reader_errors) -> loader` (the trainer's image reader).
        prefix: name prefix of the written `per_class.csv` and `metrics.json`.

    Returns:
        The test metrics, with `matches_saved_metrics` when the run has a metrics.json.
    """
    run_dir = Path(run_dir)
    saved = saved_settings(run_dir)
    model_path = require_file(run_dir / "best_model.keras", "the run's best_model.keras")
    vars(args).update({key: saved.get(key, getattr(args, key)) for key in DATA_KEYS}, demo=False)
    data, reader_errors = load_data(args), pipelines.ReaderErrors()
    loader = make_loader(data, args.image_size, reader_errors)
    with reader_errors.surface():
        test_dataset = batches.make_dataset(data["test"]["sources"], loader, args.batch_size)
        model = load_saved_model(model_path)
        metrics = evaluate_and_write(run_dir, model, test_dataset, data, prefix)
    if (run_dir / "metrics.json").exists():
        saved_metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics.update({key: saved_metrics.get(key) for key in ("method", "trigger_epoch")})
        same = all(json.loads(atomic.to_json(metrics[k])) == saved_metrics.get(k) for k in COMPARED_KEYS)
        metrics["matches_saved_metrics"] = same
        print("test metrics " + ("match" if same else "DIFFER from") + f" {run_dir / 'metrics.json'}")
    metrics.setdefault("method", saved.get("method"))
    atomic.write_json(run_dir / f"{prefix}metrics.json", metrics)
    print(summary_line(metrics))
    return metrics
