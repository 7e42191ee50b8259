"""TG-MATL experiment 2: task heads on base embeddings and on the exp1 projections (the paper's table).

Paper: M. Zhou, A. Zare, "Task-Guided Multi-Annotation Triplet Learning for Remote Sensing
Representations", IGARSS 2026, arXiv 2604.03837 (predecessor: MATL, IGARSS 2025, arXiv 2504.08054).

For each embedding (CLIP, DINOv2, MAE), each input (the raw embedding, `base`, and the projections
of every exp1 method: DTL, DTL-Hard, MATL, TG-MATL) and each of the 8 folds, three task heads are
trained for 5000 epochs with Adam(1e-4), batch 32, keeping the best-validation weights: a 3-way
classifier, a 13-d box-feature regressor and a 2-d box-location regressor (360 heads). Each is
evaluated on the fixed test set and, as val_*, on its fold's validation split. Writes, at the paper
repo's paths,

    results/trained_models/exp2_task_heads/{emb}/{method}/{head}_run{k}.h5
        ({head} = class_head, reg_boxfeat_head, reg_boxloc_head)
    results/exp2_results/{emb}/{method}_fold{k}_taskhead_metrics.npy   (+ .json twin, safe to load)
    results/exp2_results/summary.csv, summary.md, summary.png          (mean +- std over folds)
    results/exp2_results/method_costs.csv        (each method's calibrated cost, which splits the times)

Commands:
    python igarss_exp1.py --margin 0.1 --batch_size 32 --test_size 0.7    # exp1 heads first
    python igarss_exp2.py --margin 0.1 --batch_size 32 --test_size 0.7    # the paper's protocol
    python igarss_exp1.py --demo && python igarss_exp2.py --demo          # synthetic data

The heads of one (embedding, input width) train together in compiled graphs
(common/tgmatl/stacked_training.py), which equals training them one by one (own parameters, Adam
moments, BatchNorm statistics, batches and best weights). The full protocol (360 heads x 5000
epochs, 12 stacks in 2 worker processes) took 8 min 32 s end to end on a 2-core CPU, against about
100+ hours for one model.fit per head (python -m bench.tgmatl_exp2_speed compares the two); --demo
takes a few minutes. It ends with one line per method, each closing with "(mean over 3 embeddings x 8
folds)"; the demo printed on a 2-core CPU (the third decimal depends on the CPU):
    summary: base acc 1.000 prec 1.000 rec 1.000 f1 1.000 r2_feat 0.846 r2_loc -0.308
    summary: dtl acc 0.994 prec 0.994 rec 0.994 f1 0.994 r2_feat 0.297 r2_loc -0.443
    summary: dtl_hard acc 0.990 prec 0.991 rec 0.990 f1 0.990 r2_feat 0.368 r2_loc -0.410
    summary: matl acc 0.962 prec 0.964 rec 0.962 f1 0.961 r2_feat 0.500 r2_loc -0.434
    summary: tg_matl_30_10 acc 0.919 prec 0.922 rec 0.919 f1 0.919 r2_feat 0.598 r2_loc -0.449
"""

import argparse
import functools
import json
import time
from pathlib import Path

from common import cli
from common.tgmatl import awir, flags

EXP1_METHODS = ("dtl", "dtl_hard", "matl", "tg_matl")
METHODS = ("base", *EXP1_METHODS)


def get_args_parser():
    parser = cli.Parser("TG-MATL experiment 2: task heads")
    flags.add_task_head_arguments(parser, "(the data of `igarss_exp1.py --demo`, same seed; run that first).")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="Inputs of the task heads: 'base' (raw embedding) and the exp1 methods' projections.",
    )
    awir.add_calibration_argument(parser)
    parser.add_argument(
        "--margin",
        type=float,
        default=0.1,
        help="Triplet margin of the exp1 heads (paper: 0.1; taken as the reference exp2 does, unused here).",
    )
    parser.add_argument(
        "--top_percent",
        type=float,
        default=0.3,
        help="TG-MATL top_percent of the exp1 heads (tag tg_matl_30_10).",
    )
    parser.add_argument(
        "--random_percent", type=float, default=0.1, help="TG-MATL random_percent of the exp1 heads to read."
    )
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np
import tensorflow as tf

from common import atomic, plots, reports, runs
from common.errors import InputError, cli_entry, require_in_range
from common.tgmatl import stacked_training

TRUNK_UNITS = (128, 64, 32, 16)
# The three task heads: output width, the file stem the reference uses and its timing column.
HEAD_KINDS = {
    "class": {"units": awir.NUM_CLASSES, "file": "class_head", "time": "class_time"},
    "boxfeat": {"units": len(awir.BOX_FEATURE_NAMES), "file": "reg_boxfeat_head", "time": "reg_boxfeat_time"},
    "boxloc": {"units": 2, "file": "reg_boxloc_head", "time": "reg_boxloc_time"},
}
OUTPUT_UNITS = max(kind["units"] for kind in HEAD_KINDS.values())
BN_MOMENTUM, BN_EPSILON = 0.99, 1e-3  # Keras BatchNormalization defaults.
METRICS = ("acc", "precision", "recall", "f1", "mse_feat", "r2_feat", "mse_loc", "r2_loc")
# The same metrics of each fold's validation split (9 samples held out for model selection).
VAL_METRICS = tuple(f"val_{metric}" for metric in METRICS)
LOWER_IS_BETTER = ("mse_feat", "mse_loc")
TIME_METRICS = ("class_time", "reg_boxfeat_time", "reg_boxloc_time")
# The settings a resume must match: finished heads are reused only if these arguments agree.
RESUME_SETTINGS = ("batch_size", "test_size", "epochs", "learning_rate", "seed")


def task_head_path(results_dir, embedding, method, kind, fold):
    folder = Path(results_dir) / "trained_models" / "exp2_task_heads" / embedding / method
    return folder / f"{HEAD_KINDS[kind]['file']}_run{fold}.h5"


def metrics_path(results_dir, embedding, method, fold):
    return Path(results_dir) / "exp2_results" / embedding / f"{method}_fold{fold}_taskhead_metrics.npy"


# ---- the task heads (the MATL paper's heads, arXiv 2504.08054; docs/tgmatl.md) ----


def build_task_head(input_dim, kind, learning_rate=1e-4):
    """The MATL task head: Dense 128-64-32-16, each ReLU then BatchNorm, then the task's output layer."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(input_dim,), name="embedding")
    hidden = inputs
    for layer, width in enumerate(TRUNK_UNITS, start=1):
        hidden = layers.Dense(
            width, activation="relu", kernel_initializer="glorot_normal", name=f"dense{layer}"
        )(hidden)
        hidden = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"bn{layer}")(
            hidden
        )
    # The classifier ends in softmax with categorical cross-entropy, the regressors in sigmoid with MSE.
    activation = "softmax" if kind == "class" else "sigmoid"
    loss = keras.losses.CategoricalCrossentropy() if kind == "class" else keras.losses.MeanSquaredError()
    outputs = layers.Dense(
        HEAD_KINDS[kind]["units"], activation=activation, kernel_initializer="glorot_normal", name="output"
    )(hidden)
    model = keras.Model(inputs, outputs, name=f"{HEAD_KINDS[kind]['file']}")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    return model


def task_head_loss(kind, outputs, target, valid):
    """Per-model mean loss over valid samples: categorical cross-entropy (from logits, the same value
    as softmax + CE) for the classifier, MSE of the sigmoid outputs for the regressors."""
    units = HEAD_KINDS[kind]["units"]
    outputs, target = outputs[..., :units], target[..., :units]
    if kind == "class":
        per_sample = -tf.reduce_sum(target * tf.nn.log_softmax(outputs, axis=-1), axis=-1)
    else:
        per_sample = tf.reduce_mean(tf.square(tf.sigmoid(outputs) - target), axis=-1)
    weight = tf.cast(valid, tf.float32)
    return tf.reduce_sum(per_sample * weight, axis=1) / tf.maximum(tf.reduce_sum(weight, axis=1), 1.0)


def task_metrics(kind, predictions, target):
    """The paper repository's test metrics of one head: accuracy and weighted precision / recall / F1,
    or MSE / R^2 (uniform average)."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        mean_squared_error,
        precision_score,
        r2_score,
        recall_score,
    )

    if kind == "class":
        truth, predicted = target.argmax(axis=1), predictions.argmax(axis=1)
        return {
            "acc": float(accuracy_score(truth, predicted)),
            "precision": float(precision_score(truth, predicted, average="weighted", zero_division=0)),
            "recall": float(recall_score(truth, predicted, average="weighted", zero_division=0)),
            "f1": float(f1_score(truth, predicted, average="weighted", zero_division=0)),
        }
    suffix = "feat" if kind == "boxfeat" else "loc"
    return {
        f"mse_{suffix}": float(mean_squared_error(target, predictions)),
        f"r2_{suffix}": float(r2_score(target, predictions)),
    }


# ---- the fast twin: many task heads in one graph ----


def initial_task_head_params(input_dim, kinds, generators):
    """Per model: GlorotNormal kernels, zero biases, BN gamma 1 / beta 0 / moving mean 0 / variance 1.

    All kinds share one output width (13); a narrower head's extra output columns stay zero (they get
    no gradient, so Adam leaves them at zero) and are dropped on export.
    """
    widths = (input_dim, *TRUNK_UNITS)
    params, state = {}, {}
    for layer in range(1, len(TRUNK_UNITS) + 1):
        fan_in, fan_out = widths[layer - 1], widths[layer]
        params[f"kernel{layer}"] = np.stack(
            [stacked_training.glorot_normal(g, fan_in, fan_out) for g in generators]
        )
        params[f"bias{layer}"] = np.zeros((len(generators), fan_out))
        bn_params, bn_state = stacked_training.batch_norm_initial(len(generators), fan_out)
        params.update({f"{name}{layer}": value for name, value in bn_params.items()})
        state.update({f"{name}{layer}": value for name, value in bn_state.items()})
    output_kernel = np.zeros((len(generators), TRUNK_UNITS[-1], OUTPUT_UNITS))
    for model, (generator, kind) in enumerate(zip(generators, kinds, strict=True)):
        units = HEAD_KINDS[kind]["units"]
        output_kernel[model, :, :units] = stacked_training.glorot_normal(generator, TRUNK_UNITS[-1], units)
    params["kernel_out"] = output_kernel
    params["bias_out"] = np.zeros((len(generators), OUTPUT_UNITS))
    params = {name: value.astype(np.float32) for name, value in params.items()}
    state = {name: value.astype(np.float32) for name, value in state.items()}
    return params, state


def task_head_forward(params, state, x, valid, training):
    """Stacked `build_task_head`: x `(M, B, D)` -> output pre-activations `(M, B, 13)` and BN statistics.

    The fast twin of `build_task_head` trained by Keras: tests/test_igarss_exp2.py
    (test_stacked_training_equals_keras_one_by_one_and_exports_exactly) proves them equal.
    """
    weight = tf.cast(valid, tf.float32)[:, :, None]
    count = tf.maximum(tf.reduce_sum(weight, axis=1, keepdims=True), 1.0)
    new_state = dict(state)
    hidden = x
    for layer in range(1, len(TRUNK_UNITS) + 1):
        hidden = tf.nn.relu(
            tf.einsum("mbd,mde->mbe", hidden, params[f"kernel{layer}"]) + params[f"bias{layer}"][:, None, :]
        )
        moving = (state[f"moving_mean{layer}"], state[f"moving_variance{layer}"])
        hidden, moving = stacked_training.masked_batch_norm(
            hidden,
            weight,
            count,
            moving,
            params[f"gamma{layer}"],
            params[f"beta{layer}"],
            training,
            BN_MOMENTUM,
            BN_EPSILON,
        )
        new_state[f"moving_mean{layer}"], new_state[f"moving_variance{layer}"] = moving
    outputs = tf.einsum("mbd,mde->mbe", hidden, params["kernel_out"]) + params["bias_out"][:, None, :]
    return outputs, new_state


def head_predictions(kind, outputs):
    """Turn pre-activations (N, 13) of one head into its Keras outputs (softmax or sigmoid)."""
    outputs = outputs[:, : HEAD_KINDS[kind]["units"]].astype(np.float64)
    if kind == "class":
        exponent = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        return exponent / exponent.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-outputs))


def export_task_head(params, state, index, kind, input_dim, path, learning_rate, models=None):
    """Save head `index` of a stack as a normal Keras .h5 (BN moving statistics included).

    `models` caches one built Keras model per (kind, input width): only the weights change per head.
    """
    models = {} if models is None else models
    if (kind, input_dim) not in models:
        models[(kind, input_dim)] = build_task_head(input_dim, kind, learning_rate)
    model = models[(kind, input_dim)]
    units = HEAD_KINDS[kind]["units"]
    for layer in range(1, len(TRUNK_UNITS) + 1):
        dense = [params[f"kernel{layer}"][index], params[f"bias{layer}"][index]]
        model.get_layer(f"dense{layer}").set_weights(dense)
        norm = [params[f"gamma{layer}"][index], params[f"beta{layer}"][index]]
        norm += [state[f"moving_mean{layer}"][index], state[f"moving_variance{layer}"][index]]
        model.get_layer(f"bn{layer}").set_weights(norm)
    output = [params["kernel_out"][index][:, :units], params["bias_out"][index][:units]]
    model.get_layer("output").set_weights(output)
    atomic.save_keras(model, path)
    return model


# ---- the inputs of the task heads: raw embeddings or exp1 projections ----


def project_with_exp1_head(path, embedding, command):
    """Apply one saved igarss_exp1 ProjectionHead to every sample; one-line errors for bad files."""
    import keras

    if not Path(path).is_file():
        raise InputError(path, "exp1 projection head not found", f"the head of `{command}`; run it first")
    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:  # h5py/Keras
        detail = str(error).splitlines()[0][:120] if str(error) else ""
        raise InputError(
            path,
            f"cannot be loaded as a Keras model ({type(error).__name__}: {detail})",
            f"a .h5 written by `{command}`; delete it and re-run that command",
        ) from None
    input_width = model.input_shape[-1]
    if input_width != embedding.shape[1]:
        raise InputError(
            path,
            f"takes {input_width}-d inputs but the embedding is {embedding.shape[1]}-d",
            f"a head trained on this embedding by `{command}`",
        )
    projection = np.asarray(model(embedding, training=False), np.float32)
    if projection.ndim != 2 or not np.isfinite(projection).all():
        problem = f"gives outputs of shape {projection.shape}"
        problem += " with non-finite values" if projection.ndim == 2 else ""
        raise InputError(path, problem, "a ProjectionHead with finite (N, 64) outputs")
    return projection


def exp1_command(script: str, args) -> str:
    """The command that writes the exp1 heads an exp2 run reads (named in errors about missing heads)."""
    command = f"python {script}" + (" --demo" if args.demo else "")
    return command + (f" --results_dir {args.results_dir}" if args.results_dir != "results" else "")


def load_task_head_inputs(data, sources, embedding_names, folds, results_dir) -> dict:
    """{(embedding, method, fold): (N, D) input} of the exp2 task heads, for every source.

    A source with `exp1_tag` None is the raw embedding; otherwise each fold's exp1 head (in
    `exp1_subdir`) projects every sample.
    """
    inputs = {}
    for name in embedding_names:
        embedding = data["embeddings"][name]
        for source in sources:
            for fold in folds:
                if source["exp1_tag"] is None:
                    inputs[(name, source["method"], fold)] = embedding
                else:
                    path = awir.exp1_head_path(
                        results_dir, name, source["exp1_tag"], fold, source["exp1_subdir"]
                    )
                    inputs[(name, source["method"], fold)] = project_with_exp1_head(
                        path, embedding, source["command"]
                    )
    return inputs


def sources_for(args, command):
    """The task-head inputs of this run: (method tag, exp1 model subdir, exp1 file tag) per method."""
    sources = []
    for method in args.methods:
        tag = awir.method_tag(method, args.top_percent, args.random_percent)
        exp1_tag = None if method == "base" else tag
        sources.append({"method": tag, "exp1_tag": exp1_tag, "exp1_subdir": "", "command": command})
    return sources


def box_feature_targets(dataset_features, train_indices):
    """Re-normalise with the training fold's min/max and clip to [0, 1] (train, val, test alike)."""
    return np.clip(awir.min_max_scale(dataset_features, dataset_features[train_indices]), 0.0, 1.0)


def head_targets(data, fold, kind):
    """(N, 13) targets of one head, zero-padded: class one-hot, fold-normalised box features, location."""
    if kind == "class":
        target = np.eye(awir.NUM_CLASSES)[data["class_label"]]
    elif kind == "boxfeat":
        target = box_feature_targets(data["box_features"], data["folds"][fold - 1][0])
    else:
        target = data["box_location"]
    padded = np.zeros((len(target), OUTPUT_UNITS), np.float32)
    padded[:, : target.shape[1]] = target
    return padded


def train_task_heads(heads, inputs, data, args, progress_label="", chunk_epochs=None, progress=None):
    """Train a list of heads (dicts with embedding, method, fold, kind, key) of one input width together.

    Heads are grouped by kind into contiguous slices so each slice gets its own loss in the same
    compiled step. Returns best-validation params/state, outputs `(M, N, 13)` on every sample (test
    and validation metrics are taken from them) and wall seconds. `progress` replaces the printer.
    """
    heads = sorted(heads, key=lambda head: list(HEAD_KINDS).index(head["kind"]))
    generators = [stacked_training.model_generator(args.seed, head["key"]) for head in heads]
    input_dim = inputs[heads[0]["input"]].shape[1]
    params, state = initial_task_head_params(input_dim, [h["kind"] for h in heads], generators)
    groups = []
    for kind in HEAD_KINDS:
        members = [i for i, head in enumerate(heads) if head["kind"] == kind]
        if members:
            groups.append((kind, members[0], members[-1] + 1))

    def stacked_loss(outputs, batch, valid):
        return tf.concat(
            [task_head_loss(kind, outputs[a:b], batch["target"][a:b], valid[a:b]) for kind, a, b in groups],
            axis=0,
        )

    per_model = {
        "x": np.stack([inputs[head["input"]] for head in heads]).astype(np.float32),
        "target": np.stack([head_targets(data, head["fold"], head["kind"]) for head in heads]),
    }
    stack = stacked_training.OnePassValidationStack(
        params,
        task_head_forward,
        stacked_loss,
        {},
        per_model,
        state=state,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        model_keys=[head["key"] for head in heads],
    )
    train_lists, val_lists = stacked_training.fold_index_lists(data["folds"], heads)
    started = time.perf_counter()
    # One compiled chunk of up to 500 epochs is reused for every later chunk of the same length.
    chunk_epochs = chunk_epochs or max(1, min(500, args.epochs))
    progress = progress or stacked_training.progress_printer(progress_label)
    train_history, val_history = stack.fit(
        train_lists, val_lists, args.epochs, generators, chunk_epochs=chunk_epochs, progress=progress
    )
    seconds = time.perf_counter() - started
    best_params, best_state = stack.best()
    return {
        "heads": heads,
        "params": best_params,
        "state": best_state,
        "outputs": stack.predict(per_model["x"]),
        "input_dim": input_dim,
        "best_val_loss": stack.best_val_loss.numpy(),
        "train_history": train_history,
        "val_history": val_history,
        "seconds": seconds,
    }


def train_task_job(job, data, args):
    """Train one stack of task heads (a module-level function, so worker processes can run it)."""
    return train_task_heads(job["heads"], job["inputs"], data, args, progress_label=job["label"])


def heads_by_width(units, inputs):
    """{(embedding, input width): [task head]}, three heads (one per kind) per unit."""
    stacks = {}
    for unit in units:
        width = inputs[unit["input"]].shape[1]
        for kind in HEAD_KINDS:
            # Each head's random stream (initialisation, batch order) depends only on its identity.
            key = unit["key"] * 10 + list(HEAD_KINDS).index(kind)
            stacks.setdefault((unit["embedding"], width), []).append(dict(unit, kind=kind, key=key))
    return stacks


def plan_jobs(units, inputs, workers):
    """Split the heads of each (embedding, input width) into `workers` stacks, largest work first."""
    return stacked_training.split_into_stacks(
        heads_by_width(units, inputs),
        workers,
        cost=lambda group: group[1] + 40,
        label=lambda group: f"{group[0]}/{group[1]}d",
    )


def cost_group(head):
    """The calibration group of a task head: its (embedding, method)."""
    return head["embedding"], head["method"]


def calibrate_method_costs(units, inputs, data, args, epochs):
    """{(embedding, method): seconds per head-epoch of that method's task heads trained alone}.

    The methods of one input width (the four exp1 projections) share stacks; each method's time is
    its stacks' wall time split by these costs, measured on a short run of its own heads (three
    kinds x its folds) in a stack of their own (stacked_training.calibrate_costs).
    """
    groups = {}
    for heads in heads_by_width(units, inputs).values():
        for head in heads:
            groups.setdefault(cost_group(head), []).append(head)
    settings = argparse.Namespace(**dict(vars(args), epochs=3 * epochs))

    def train(key, heads, chunk_epochs, progress):
        train_task_heads(heads, inputs, data, settings, chunk_epochs=chunk_epochs, progress=progress)

    return stacked_training.calibrate_costs(groups, train, epochs)


# ---- running the protocol ----


def units_to_train(args, sources, results_dir):
    """(embedding, source, fold) units without finished metrics; each becomes three task heads."""
    units = []
    for embedding_index, name in enumerate(args.embeddings):
        for source_index, source in enumerate(sources):
            for fold in args.folds:
                finished = metrics_path(results_dir, name, source["method"], fold).with_suffix(".json")
                if finished.exists() and not args.overwrite:
                    continue
                key = embedding_index * 100000 + source_index * 100 + fold
                unit = {"embedding": name, "method": source["method"], "fold": fold, "source": source}
                units.append(dict(unit, input=(name, source["method"], fold), key=key))
    skipped = len(args.embeddings) * len(sources) * len(args.folds) - len(units)
    if skipped:
        print(f"reusing {skipped} finished (embedding, method, fold) task-head sets (--overwrite retrains)")
    return units


def check_exp1_heads(args, sources) -> None:
    """Every exp1 head an unfinished unit reads exists: checked before the folds file or anything else
    is written (the heads' contents are checked when they are loaded, also before any output)."""
    for name in args.embeddings:
        for source in sources:
            for fold in args.folds:
                finished = metrics_path(args.results_dir, name, source["method"], fold).with_suffix(".json")
                if source["exp1_tag"] is None or (finished.exists() and not args.overwrite):
                    continue
                path = awir.exp1_head_path(
                    args.results_dir, name, source["exp1_tag"], fold, source["exp1_subdir"]
                )
                if not path.is_file():
                    expected = f"the head of `{source['command']}`; run it first"
                    raise InputError(path, "exp1 projection head not found", expected)


def record_heads(job, result, data, args, pending, keras_models, costs):
    """Export a finished stack's heads, evaluate them on the test set and on their fold's validation
    split, and write each completed unit's metrics."""
    # The joint wall time is split by each method's calibrated cost (docs/tgmatl.md, Timings).
    seconds = stacked_training.head_seconds(result["seconds"], result["heads"], costs, cost_group)
    # TensorBoard: a run per embedding (a stack holds one embedding's heads, see plan_jobs), a tag per
    # method, head kind, loss and fold.
    stacked_training.write_loss_histories(
        result,
        Path(args.results_dir) / "trained_models" / "exp2_task_heads" / "tensorboard" / job["group"][0],
        lambda head, loss: f"{head['method']}/{head['kind']}/{loss}/fold{head['fold']}",
        enabled=not args.no_tensorboard,
    )
    for index, head in enumerate(result["heads"]):
        kind, unit = head["kind"], (head["embedding"], head["method"], head["fold"])
        path = task_head_path(args.results_dir, *unit[:2], kind, head["fold"])
        state = result["state"]
        export_task_head(
            result["params"], state, index, kind, result["input_dim"], path, args.learning_rate, keras_models
        )
        target = head_targets(data, head["fold"], kind)[:, : HEAD_KINDS[kind]["units"]]
        unit_metrics = pending.setdefault(unit, {})
        for prefix, split in (("", data["test"]), ("val_", data["folds"][head["fold"] - 1][1])):
            predictions = head_predictions(kind, result["outputs"][index][split])
            metrics = task_metrics(kind, predictions, target[split])
            unit_metrics.update({prefix + name: value for name, value in metrics.items()})
        unit_metrics[HEAD_KINDS[kind]["time"]] = round(float(seconds[index]), 4)
        unit_metrics[f"{kind}_best_val_loss"] = float(result["best_val_loss"][index])
        if all(HEAD_KINDS[k]["time"] in unit_metrics for k in HEAD_KINDS):
            write_metrics(args.results_dir, *unit, unit_metrics)
    print(stacked_training.finished_line(job, result, args.epochs))


def run_task_heads(
    data, sources, args, resume_settings, config_name="exp2_config.json", calibration_epochs=0
):
    """Train, export and evaluate the task heads of every (embedding, source, fold) not yet finished;
    with `calibration_epochs`, each method's time is its own calibrated share (docs/tgmatl.md, Timings).

    Finished heads are reused only if the `resume_settings` arguments agree with those recorded in
    `config_name`.
    """
    results_dir = Path(args.results_dir)
    config_path = results_dir / "trained_models" / "exp2_task_heads" / config_name
    training_config = runs.check_same_settings(
        config_path,
        runs.settings_of(args, resume_settings),
        args.overwrite,
        "existing task heads",
        hint=awir.RESUME_HINT,
    )
    units = units_to_train(args, sources, results_dir)
    if not units:
        return
    needed = sorted({(unit["embedding"], unit["method"]) for unit in units})
    needed_sources = [s for s in sources if any(s["method"] == m for _, m in needed)]
    folds = sorted({u["fold"] for u in units})
    inputs = load_task_head_inputs(data, needed_sources, sorted({n for n, _ in needed}), folds, results_dir)
    atomic.write_json(config_path, training_config)
    costs = {}
    if calibration_epochs > 0:
        costs = calibrate_method_costs(units, inputs, data, args, calibration_epochs)
        stacked_training.write_costs(costs, results_dir / "exp2_results" / "method_costs.csv")
    jobs = plan_jobs(units, inputs, args.workers)
    print(
        f"# ---- train: {sum(len(j['heads']) for j in jobs)} task heads in {len(jobs)} stacks on "
        f"{args.workers} worker(s), {args.epochs} epochs ----"
    )
    for job in jobs:
        job["inputs"] = {head["input"]: inputs[head["input"]] for head in job["heads"]}
    record = functools.partial(record_heads, data=data, args=args, pending={}, keras_models={}, costs=costs)
    run = functools.partial(train_task_job, data=data, args=args)
    seconds = stacked_training.run_side_by_side(
        jobs, run, record, args.workers, args.deterministic, args.progress
    )
    print(f"  all stacks done in {seconds:.1f}s")


def write_metrics(results_dir, embedding, method, fold, values):
    """The reference's .npy dict (np.save of a dict) and a .json twin that our code reads."""
    path = metrics_path(results_dir, embedding, method, fold)
    record = {key: values[key] for key in METRICS + TIME_METRICS}
    atomic.save_npy(path, np.array(record, dtype=object), allow_pickle=True)
    atomic.write_json(path.with_suffix(".json"), dict(values, embedding=embedding, method=method, fold=fold))


def read_metrics(results_dir, embedding, method, folds):
    """Per-fold metrics from the .json twins (never unpickled); folds not finished are left out."""
    rows = []
    for fold in folds:
        path = metrics_path(results_dir, embedding, method, fold).with_suffix(".json")
        if path.exists():
            expected = "the metrics twin igarss_exp2.py writes; delete it to retrain that fold"
            try:
                rows.append(json.loads(path.read_text()))
            except ValueError as error:
                raise InputError(path, f"is not valid JSON ({error})", expected) from None
            missing = [key for key in METRICS + VAL_METRICS + TIME_METRICS if key not in rows[-1]]
            if missing:
                raise InputError(path, f"has no {missing[0]} (an earlier version wrote it)", expected)
    return rows


# ---- the paper's table ----


def per_fold_metrics(results_dir, embedding_names, methods, folds) -> dict:
    """{(embedding, method): {fold: metrics}} of every finished fold (methods without one left out)."""
    per_fold = {}
    for name in embedding_names:
        for method in methods:
            rows = read_metrics(results_dir, name, method, folds)
            if rows:
                per_fold[(name, method)] = {int(row["fold"]): row for row in rows}
    return per_fold


def summarise(results_dir, embedding_names, methods, folds, per_fold=None):
    """Mean and sample std (ddof=1) over folds per embedding x method: the rows of summary.csv / .md."""
    per_fold = per_fold or per_fold_metrics(results_dir, embedding_names, methods, folds)
    rows = []
    for name in embedding_names:
        for method in methods:
            if (name, method) not in per_fold:
                continue
            finished = [per_fold[(name, method)][fold] for fold in sorted(per_fold[(name, method)])]
            row = {"embedding": name, "method": method, "folds": len(finished)}
            for metric in METRICS + VAL_METRICS + TIME_METRICS:
                values = [fold_metrics[metric] for fold_metrics in finished]
                row[f"{metric}_mean"], row[f"{metric}_std"] = reports.mean_std(values)
            rows.append(row)
    return rows


# ---- how sure each ranking is: paired differences over the folds both methods finished ----


def paper_comparisons(methods, top_percent, random_percent) -> list[tuple[str, str, tuple]]:
    """The pairs the paper ranks, TG-MATL vs MATL, TG-MATL vs DTL and MATL vs DTL, on every metric
    (as (first, second, metrics); pairs with a method not in `methods` are left out)."""
    tg_matl = awir.method_tag("tg_matl", top_percent, random_percent)
    pairs = ((tg_matl, "matl"), (tg_matl, "dtl"), ("matl", "dtl"))
    return [(a, b, METRICS) for a, b in pairs if a in methods and b in methods]


def paired_values(per_fold, embedding, methods, metrics) -> dict:
    """{method: {metric: [value per fold]}} on the folds every one of `methods` finished, in fold order."""
    folds = sorted(set.intersection(*(set(per_fold[(embedding, m)]) for m in methods)))
    return {m: {k: [per_fold[(embedding, m)][f][k] for f in folds] for k in metrics} for m in methods}


def paired_table(per_fold, embedding_names, comparisons) -> list[list]:
    """Rows [embedding, *reports.PAIRED_HEADER cells] of each (first, second, metrics) comparison."""
    table = []
    for name in embedding_names:
        for first, second, metrics in comparisons:
            if (name, first) not in per_fold or (name, second) not in per_fold:
                continue
            values = paired_values(per_fold, name, (first, second), metrics)
            if not values[first][metrics[0]]:
                continue
            cells = reports.paired_rows(values, [(first, second)], metrics, LOWER_IS_BETTER)
            table += [[name, *row] for row in cells]
    return table


def sure_best_marks(rows, per_fold, metrics=METRICS) -> set[tuple[int, str]]:
    """{(row index, metric)} of the best mean of its embedding whose paired 95 % interval against every
    other method of that embedding excludes 0 in its favour (a best mean within the noise is not marked)."""
    marks = set()
    for index, metric in reports.best_marks(rows, "embedding", metrics, LOWER_IS_BETTER):
        row = rows[index]
        others = [r["method"] for r in rows if r["embedding"] == row["embedding"] and r is not row]
        sure = bool(others)
        for other in others:
            values = paired_values(per_fold, row["embedding"], (row["method"], other), [metric])
            first, second = values[row["method"]][metric], values[other][metric]
            if metric in LOWER_IS_BETTER:
                first, second = second, first
            result = reports.paired_difference(first, second)
            sure = sure and result["sure"] and result["mean_diff"] > 0
        if sure:
            marks.add((index, metric))
    return marks


PAIRED_NOTE = (
    "Paired over the folds both methods finished: per-fold difference first - second (second - first\n"
    "for the MSE metrics, so positive always favours the first), its mean with a 95 % Student-t\n"
    "interval, the folds the first method wins, and the two-sided Wilcoxon signed-rank p (n/a below 5\n"
    'folds). "sure" is yes only when the interval excludes 0.\n\n'
)


def write_summary(rows, directory, per_fold, comparisons, prefix="summary", comparisons_note=""):
    """summary.csv (numbers), summary.md (means, and the paired comparisons of `comparisons`: (first,
    second, metrics)), summary_paired.csv (the same cells) and summary.png. A mean is bold only when
    its paired interval against every other method of its embedding excludes 0."""
    directory = Path(directory)
    grid = [key for key in ("top_percent", "random_percent") if rows and key in rows[0]]
    columns = ["embedding", "method", *grid, "folds"]
    columns += [f"{m}_{s}" for m in METRICS + VAL_METRICS + TIME_METRICS for s in ("mean", "std")]
    marks = sure_best_marks(rows, per_fold)
    table = []
    for index, row in enumerate(rows):
        cells = [reports.format_mean_std(row[f"{metric}_mean"], row[f"{metric}_std"]) for metric in METRICS]
        cells = [
            f"**{cell}**" if (index, metric) in marks else cell
            for cell, metric in zip(cells, METRICS, strict=True)
        ]
        table.append([row["embedding"], row["method"], row["folds"], *cells])
    paired = paired_table(per_fold, sorted({row["embedding"] for row in rows}, key=str), comparisons)
    header = ["embedding", *reports.PAIRED_HEADER]
    markdown = (
        "# TG-MATL experiment 2: task heads on the fixed test set\n\n"
        "Mean +- sample std (ddof=1) over folds. **Bold**: the best mean of its embedding (highest acc /\n"
        "precision / recall / f1 / R^2, lowest MSE) only where its paired 95 % interval against every\n"
        "other method of that embedding excludes 0.\n\n"
        + reports.markdown_table(["embedding", "method", "folds", *METRICS], table)
        + "\n## Paired comparisons\n\n"
        + PAIRED_NOTE
        + comparisons_note
        + (reports.markdown_table(header, paired) if paired else "No pair of compared methods finished.\n")
    )
    reports.write_table(directory / prefix, rows, columns, markdown)
    paired_rows = [dict(zip(header, cells, strict=True)) for cells in paired]
    atomic.write_csv(directory / f"{prefix}_paired.csv", paired_rows, header)
    metrics = ("acc", "precision", "recall", "r2_feat", "r2_loc")
    plots.metric_bars(rows, directory / f"{prefix}.png", "embedding", "method", metrics)
    return paired


def report_methods(rows, methods, args):
    """One summary line per method: fold means averaged over the embeddings."""
    report = {}
    for method in methods:
        members = [row for row in rows if row["method"] == method]
        values = report[method] = {m: float(np.mean([row[f"{m}_mean"] for row in members])) for m in METRICS}
        print(
            f"summary: {method} acc {values['acc']:.3f} prec {values['precision']:.3f}"
            f" rec {values['recall']:.3f} f1 {values['f1']:.3f} r2_feat {values['r2_feat']:.3f}"
            f" r2_loc {values['r2_loc']:.3f} (mean over {len(members)} embeddings x {len(args.folds)} folds)"
        )
    return report


def check_arguments(args) -> None:
    """Every flag in range and --results_dir writable, before anything is read or written."""
    awir.check_protocol_arguments(args)
    args.folds = awir.checked_folds(args.folds)
    require_in_range(args, "margin", 0)
    for flag in ("top_percent", "random_percent"):
        if hasattr(args, flag):
            require_in_range(args, flag, 0, 1)


@cli_entry
def main(args):
    check_arguments(args)
    if args.demo:
        args.data, args.embeddings_dir = awir.demo_inputs(args, "igarss_exp2")
    runs.print_args(args)
    sources = sources_for(args, exp1_command("igarss_exp1.py", args))
    check_exp1_heads(args, sources)

    # ---- data ----
    data = awir.load_awir(
        args.data, args.embeddings_dir, args.embeddings, args.results_dir, args.test_size, args.batch_size
    )
    runs.seed_everything(args.seed, args.deterministic)  # after reading: bad inputs stop sooner
    print(
        f"samples {len(data['class_label'])}, test {len(data['test'])}, folds {args.folds}, "
        f"steps per epoch {int(np.ceil(max(len(t) for t, _ in data['folds']) / args.batch_size))}, "
        f"task heads {3 * len(args.embeddings) * len(args.methods) * len(args.folds)}"
    )

    # ---- train ----
    run_task_heads(data, sources, args, RESUME_SETTINGS, calibration_epochs=args.calibration_epochs)

    # ---- evaluate ----
    methods = [source["method"] for source in sources]
    per_fold = per_fold_metrics(args.results_dir, args.embeddings, methods, args.folds)
    rows = summarise(args.results_dir, args.embeddings, methods, args.folds, per_fold)
    comparisons = paper_comparisons(methods, args.top_percent, args.random_percent)
    write_summary(rows, Path(args.results_dir) / "exp2_results", per_fold, comparisons)
    return report_methods(rows, methods, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
