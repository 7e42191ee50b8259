"""SPML evaluation of a finished run: the best model on the full-label test set, read as the run read it.

Used by train_multilabel_model.py (at the end of training and for --test_only), test_multilabel_model.py
and meta_parameters_tuning.py (the chosen configuration's test metrics). The data are re-read with the
settings saved in the run's config.json, so the same run gives the same metrics bit for bit on the same
machine; the result is compared with the run's metrics.json.
"""

import json
from pathlib import Path

from common import atomic, pipelines, spml
from common.errors import require_file

# The settings that decide which images a run reads and how: taken from config.json, never from the caller.
DATA_KEYS = ("dataset", "data_dir", "single_positive", "lmdb_path", "metadata", "bands", "drop_snow_cloud")
DATA_KEYS += ("image_size", "batch_size", "val_fraction", "seed", "class_fractions")
COMPARED_KEYS = ("mAP", "micro_AP", "macro_F1", "micro_F1", "per_class")
PER_CLASS_COLUMNS = ["class", "test_positives", "ap", "f1"]


def evaluate_and_write(run_dir, model, test_dataset, data: dict, prefix: str = "") -> dict:
    """`spml.evaluate` of `model` against the full test labels; writes `<prefix>per_class.csv`."""
    metrics = spml.evaluate(model, test_dataset, data["test"]["full"], data["class_names"])
    atomic.write_csv(Path(run_dir) / f"{prefix}per_class.csv", metrics["per_class"], PER_CLASS_COLUMNS)
    return metrics


def summary_line(metrics: dict) -> str:
    """The last line every SPML run prints (it matches metrics.json)."""
    line = f"test mAP {metrics['mAP']:.4f} | micro AP {metrics['micro_AP']:.4f} | macro F1 "
    line += f"{metrics['macro_F1']:.4f} | micro F1 {metrics['micro_F1']:.4f} | method {metrics['method']}"
    line += f" | trigger epoch {metrics.get('trigger_epoch')}" if metrics["method"] == "adagc" else ""
    if metrics.get("best_epoch") is not None:
        line += f" | epoch {metrics['best_epoch']} ({metrics['best_phase']})"
    if metrics.get("last_epoch"):
        line += f" | last epoch mAP {metrics['last_epoch']['mAP']:.4f}"
    return line


def saved_settings(run_dir) -> dict:
    """The `args` of a run's config.json (an InputError names the folder when it is not a finished run)."""
    config_path = require_file(Path(run_dir) / "config.json", "a finished run folder (train it first)")
    return json.loads(config_path.read_text())["args"]


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
    import keras

    run_dir = Path(run_dir)
    saved = saved_settings(run_dir)
    model_path = require_file(run_dir / "best_model.keras", "the run's best_model.keras")
    vars(args).update({key: saved.get(key, getattr(args, key)) for key in DATA_KEYS}, demo=False)
    data, reader_errors = load_data(args), pipelines.ReaderErrors()
    loader = make_loader(data, args.image_size, reader_errors)
    with reader_errors.surface():
        test_dataset = spml.make_dataset(data["test"]["sources"], loader, args.batch_size)
        model = keras.models.load_model(model_path)
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
