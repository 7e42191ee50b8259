"""TG-MATL experiment 2: task heads on base embeddings and on the exp1 projections (the paper's table).

Paper: M. Zhou, A. Zare, "Task-Guided Multi-Annotation Triplet Learning for Remote Sensing
Representations", IGARSS 2026, arXiv 2604.03837 (predecessor: MATL, IGARSS 2025, arXiv 2504.08054).

For each embedding (CLIP, DINOv2, MAE), each input (the raw embedding, `base`, and the projections
of every exp1 method: DTL, DTL-Hard, MATL, TG-MATL) and each of the 8 folds, three task heads are
trained for 5000 epochs with Adam(1e-4), batch 32, keeping the best-validation weights: a 3-way
classifier, a 13-d box-feature regressor and a 2-d box-location regressor (360 heads). Each is
evaluated on the fixed test set. Writes, at the paper repo's paths,

    results/trained_models/exp2_task_heads/{emb}/{method}/{class_head,reg_boxfeat_head,reg_boxloc_head}_run{k}.h5
    results/exp2_results/{emb}/{method}_fold{k}_taskhead_metrics.npy   (+ .json twin, safe to load)
    results/exp2_results/summary.csv, summary.md, summary.png          (mean +- std over folds)

Commands:
    python igarss_exp1.py --margin 0.1 --batch_size 32 --test_size 0.7    # exp1 heads first
    python igarss_exp2.py --margin 0.1 --batch_size 32 --test_size 0.7    # the paper's protocol
    python igarss_exp1.py --demo && python igarss_exp2.py --demo          # synthetic data

The heads of one (embedding, input width) train together in compiled graphs
(common/stacked_training.py), which equals training them one by one (own parameters, Adam
moments, BatchNorm statistics, batches and best weights). The full protocol takes about 8.5
minutes on a 2-core CPU (python -m bench.tgmatl_exp2_speed compares it with model.fit); --demo
takes a few minutes.
It ends with one line per method; the demo prints, e.g.
    summary: tg_matl_30_10 acc 0.919 f1 0.919 r2_feat 0.599 r2_loc -0.459 (mean over 3 embeddings x 8 folds)
"""

import argparse
import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from common import awir
from common import atomic, runs
from common.errors import InputError, cli_entry
from common.stacked_training import (
    StackedModels,
    model_generator,
    run_side_by_side,
)

EXP1_METHODS = ("dtl", "dtl_hard", "matl", "tg_matl")
METHODS = ("base",) + EXP1_METHODS
TRUNK_UNITS = (128, 64, 32, 16)
# The three task heads: output width, output activation and the file stem the reference uses.
HEAD_KINDS = {"class": {"units": awir.NUM_CLASSES, "file": "class_head", "time": "class_time"},
              "boxfeat": {"units": len(awir.BOX_FEATURE_NAMES), "file": "reg_boxfeat_head",
                          "time": "reg_boxfeat_time"},
              "boxloc": {"units": 2, "file": "reg_boxloc_head", "time": "reg_boxloc_time"}}
OUTPUT_UNITS = max(kind["units"] for kind in HEAD_KINDS.values())
BN_MOMENTUM, BN_EPSILON = 0.99, 1e-3  # Keras BatchNormalization defaults.
METRICS = ("acc", "f1", "mse_feat", "r2_feat", "mse_loc", "r2_loc")
LOWER_IS_BETTER = ("mse_feat", "mse_loc")
TIME_METRICS = ("class_time", "reg_boxfeat_time", "reg_boxloc_time")
# Arguments that change what a head learns: finished heads are reused only if these agree.
TRAINING_KEYS = ("batch_size", "test_size", "epochs", "learning_rate", "seed")


def add_task_head_arguments(parser):
    """Flags shared by igarss_exp2.py and igarss_exp2_sweep.py (data, protocol, training, run control)."""
    parser.add_argument("--data", default="data.npz",
                        help="data.npz with class_label (N,) and box_label (N,4) [xmin,xmax,ymin,ymax].")
    parser.add_argument("--embeddings_dir", default="embeddings",
                        help="Folder with awir_{clip,dinov2,mae}_emb.npy, (N, D) each.")
    parser.add_argument("--results_dir", default="results",
                        help="Root of the fixed results tree (exp1 heads are read from here).")
    parser.add_argument("--embeddings", nargs="+", default=list(awir.EMBEDDING_NAMES),
                        choices=awir.EMBEDDING_NAMES, help="Which foundation embeddings to use.")
    parser.add_argument("--batch_size", type=int, default=32, help="Mini-batch size (paper: 32).")
    parser.add_argument("--test_size", type=float, default=0.7,
                        help="Fraction held out as the fixed test set (paper: 0.7, i.e. 168 of 240).")
    parser.add_argument("--epochs", type=int, default=5000, help="Training epochs (paper: 5000, no early stop).")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4).")
    parser.add_argument("--folds", type=int, nargs="+", default=list(range(1, awir.NUM_FOLDS + 1)),
                        help="Folds to train (default all 8; a subset is for quick checks).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds initialisation and batch order.")
    parser.add_argument("--deterministic", action="store_true", help="Turn on TF op determinism.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Retrain heads that already exist (default: reuse finished heads when the "
                             "training arguments match, and stop with an error when they do not).")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="Stacks of heads trained side by side (default: the number of CPU cores).")
    return parser


def get_args_parser():
    parser = argparse.ArgumentParser("TG-MATL experiment 2: task heads", add_help=True)
    add_task_head_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="Inputs of the task heads: 'base' (raw embedding) and the exp1 methods' projections.")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="Triplet margin the exp1 heads were trained with (paper: 0.1; the reference "
                             "exp2 takes it for its command line, the task heads do not use it).")
    parser.add_argument("--top_percent", type=float, default=0.3,
                        help="TG-MATL top_percent of the exp1 heads to read (file tag tg_matl_30_10).")
    parser.add_argument("--random_percent", type=float, default=0.1,
                        help="TG-MATL random_percent of the exp1 heads to read.")
    parser.add_argument("--demo", action="store_true",
                        help="Use the synthetic dataset of `igarss_exp1.py --demo` (same seed) and train "
                             "100 epochs at learning rate 3e-3 (unless given); run igarss_exp1.py --demo first.")
    return parser


def exp1_head_path(results_dir, embedding, tag, fold, model_subdir=""):
    return (Path(results_dir) / "trained_models" / "exp1_emb_proj" / embedding / model_subdir
            / f"{tag}_best_fold{fold}.h5")


def task_head_path(results_dir, embedding, method, kind, fold):
    return (Path(results_dir) / "trained_models" / "exp2_task_heads" / embedding / method
            / f"{HEAD_KINDS[kind]['file']}_run{fold}.h5")


def metrics_path(results_dir, embedding, method, fold):
    return Path(results_dir) / "exp2_results" / embedding / f"{method}_fold{fold}_taskhead_metrics.npy"


# ---- inputs: raw embeddings or exp1 projections ----

def project_with_exp1_head(path, embedding, command):
    """Apply one saved exp1 ProjectionHead to every sample; clear errors for missing or broken files."""
    import keras

    if not Path(path).is_file():
        raise InputError(path, "exp1 projection head not found", f"the head written by `{command}`; run it first")
    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:  # h5py/Keras
        raise InputError(path, f"cannot be loaded as a Keras model ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120] if str(error) else ''})",
                         f"a .h5 written by `{command}`; delete it and re-run that command") from None
    input_width = model.input_shape[-1]
    if input_width != embedding.shape[1]:
        raise InputError(path, f"takes {input_width}-d inputs but the embedding is {embedding.shape[1]}-d",
                         f"a head trained on this embedding by `{command}`")
    projection = np.asarray(model(embedding, training=False), np.float32)
    if projection.ndim != 2 or not np.isfinite(projection).all():
        raise InputError(path, f"gives outputs of shape {projection.shape} with non-finite values"
                         if projection.ndim == 2 else f"gives outputs of shape {projection.shape}",
                         "a ProjectionHead with finite (N, 64) outputs")
    return projection


# ---- the task heads (spec: Task heads) ----

def build_task_head(input_dim, kind, learning_rate=1e-4):
    """The MATL task head: Dense 128-64-32-16, each ReLU then BatchNorm, then the task's output layer."""
    import keras
    from keras import layers

    units = HEAD_KINDS[kind]["units"]
    inputs = keras.Input(shape=(input_dim,), name="embedding")
    hidden = inputs
    for layer, width in enumerate(TRUNK_UNITS, start=1):
        hidden = layers.Dense(width, activation="relu", kernel_initializer="glorot_normal", name=f"dense{layer}")(hidden)
        hidden = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"bn{layer}")(hidden)
    if kind == "class":
        outputs = layers.Dense(units, activation="softmax", kernel_initializer="glorot_normal", name="output")(hidden)
        loss = keras.losses.CategoricalCrossentropy()
    else:
        outputs = layers.Dense(units, activation="sigmoid", kernel_initializer="glorot_normal", name="output")(hidden)
        loss = keras.losses.MeanSquaredError()
    model = keras.Model(inputs, outputs, name=f"{HEAD_KINDS[kind]['file']}")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    return model


def glorot_normal(generator, fan_in, fan_out):
    """Keras GlorotNormal: truncated normal (redraw beyond 2 sd), sd = sqrt(2/(in+out)) / 0.8796."""
    scale = np.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978
    values = generator.standard_normal((fan_in, fan_out))
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = generator.standard_normal(outside.sum())
        outside = np.abs(values) > 2
    return values * scale


def initial_task_head_params(input_dim, kinds, generators):
    """Per model: GlorotNormal kernels, zero biases, BN gamma 1 / beta 0 / moving mean 0 / variance 1.

    All kinds share one output width (13); a narrower head's extra output columns stay zero (they get
    no gradient, so Adam leaves them at zero) and are dropped on export.
    """
    widths = (input_dim,) + TRUNK_UNITS
    params, state = {}, {}
    for layer in range(len(TRUNK_UNITS)):
        params[f"kernel{layer + 1}"] = np.stack([glorot_normal(g, widths[layer], widths[layer + 1]) for g in generators])
        params[f"bias{layer + 1}"] = np.zeros((len(generators), widths[layer + 1]))
        params[f"gamma{layer + 1}"] = np.ones((len(generators), widths[layer + 1]))
        params[f"beta{layer + 1}"] = np.zeros((len(generators), widths[layer + 1]))
        state[f"moving_mean{layer + 1}"] = np.zeros((len(generators), widths[layer + 1]))
        state[f"moving_variance{layer + 1}"] = np.ones((len(generators), widths[layer + 1]))
    output_kernel = np.zeros((len(generators), TRUNK_UNITS[-1], OUTPUT_UNITS))
    for model, (generator, kind) in enumerate(zip(generators, kinds)):
        units = HEAD_KINDS[kind]["units"]
        output_kernel[model, :, :units] = glorot_normal(generator, TRUNK_UNITS[-1], units)
    params["kernel_out"] = output_kernel
    params["bias_out"] = np.zeros((len(generators), OUTPUT_UNITS))
    return ({k: v.astype(np.float32) for k, v in params.items()},
            {k: v.astype(np.float32) for k, v in state.items()})


def task_head_forward(params, state, x, valid, training):
    """Stacked forward pass: x (M, B, D) -> output pre-activations (M, B, 13) and updated BN statistics.

    Training mode normalises with the mean and biased variance of the valid samples of each model's
    batch and moves the statistics like Keras (momentum 0.99); inference uses the moving statistics.
    """
    weight = tf.cast(valid, tf.float32)[:, :, None]
    count = tf.maximum(tf.reduce_sum(weight, axis=1, keepdims=True), 1.0)
    new_state = dict(state)
    hidden = x
    for layer in range(1, len(TRUNK_UNITS) + 1):
        hidden = tf.nn.relu(tf.einsum("mbd,mde->mbe", hidden, params[f"kernel{layer}"])
                            + params[f"bias{layer}"][:, None, :])
        if training:
            mean = tf.reduce_sum(hidden * weight, axis=1, keepdims=True) / count
            variance = tf.reduce_sum(tf.square(hidden - mean) * weight, axis=1, keepdims=True) / count
            new_state[f"moving_mean{layer}"] = (state[f"moving_mean{layer}"] * BN_MOMENTUM
                                                + mean[:, 0] * (1 - BN_MOMENTUM))
            new_state[f"moving_variance{layer}"] = (state[f"moving_variance{layer}"] * BN_MOMENTUM
                                                    + variance[:, 0] * (1 - BN_MOMENTUM))
        else:
            mean = state[f"moving_mean{layer}"][:, None, :]
            variance = state[f"moving_variance{layer}"][:, None, :]
        hidden = ((hidden - mean) * tf.math.rsqrt(variance + BN_EPSILON) * params[f"gamma{layer}"][:, None, :]
                  + params[f"beta{layer}"][:, None, :])
    outputs = tf.einsum("mbd,mde->mbe", hidden, params["kernel_out"]) + params["bias_out"][:, None, :]
    return outputs, new_state


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


def head_predictions(kind, outputs):
    """Turn pre-activations (N, 13) of one head into its Keras outputs (softmax or sigmoid)."""
    outputs = outputs[:, :HEAD_KINDS[kind]["units"]].astype(np.float64)
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
        model.get_layer(f"dense{layer}").set_weights([params[f"kernel{layer}"][index], params[f"bias{layer}"][index]])
        model.get_layer(f"bn{layer}").set_weights([params[f"gamma{layer}"][index], params[f"beta{layer}"][index],
                                                   state[f"moving_mean{layer}"][index],
                                                   state[f"moving_variance{layer}"][index]])
    model.get_layer("output").set_weights([params["kernel_out"][index][:, :units], params["bias_out"][index][:units]])
    atomic.save_keras(model, path)
    return model


def task_metrics(kind, predictions, target):
    """The spec's test metrics of one head: acc / weighted f1, or MSE / R^2 (uniform average)."""
    from sklearn.metrics import accuracy_score, f1_score, mean_squared_error, r2_score

    if kind == "class":
        truth, predicted = target.argmax(axis=1), predictions.argmax(axis=1)
        return {"acc": float(accuracy_score(truth, predicted)),
                "f1": float(f1_score(truth, predicted, average="weighted", zero_division=0))}
    suffix = "feat" if kind == "boxfeat" else "loc"
    return {f"mse_{suffix}": float(mean_squared_error(target, predictions)),
            f"r2_{suffix}": float(r2_score(target, predictions))}


# ---- training many heads at once ----

class TaskHeadStack(StackedModels):
    """StackedModels whose validation pass is one forward over each model's whole validation list.

    In inference mode the loss is per sample, so the mean over the list equals Keras's batch-weighted
    mean over 32-sample batches; one pass avoids padding 9 validation samples to 32.
    """

    validation_padding = 1

    def _mean_loss(self, index, counts, params, state):
        valid = tf.range(tf.shape(index)[1])[None, :] < counts[:, None]
        batch = self._gather(index)
        outputs, _ = self.forward(params, state, batch["x"], valid, False)
        return self.loss(outputs, batch, valid)


def sources_for(args, command):
    """The task-head inputs of this run: (method tag, exp1 model subdir, exp1 file tag) per method."""
    sources = []
    for method in args.methods:
        tag = awir.method_tag(method, args.top_percent, args.random_percent)
        sources.append({"method": tag, "exp1_tag": None if method == "base" else tag, "exp1_subdir": "",
                        "command": command})
    return sources


def load_inputs(data, sources, embedding_names, folds, results_dir):
    """{(embedding, method, fold): (N, D) input} for every source; exp1 heads are read per fold."""
    inputs = {}
    for name in embedding_names:
        embedding = data["embeddings"][name]
        for source in sources:
            for fold in folds:
                if source["exp1_tag"] is None:
                    inputs[(name, source["method"], fold)] = embedding
                else:
                    path = exp1_head_path(results_dir, name, source["exp1_tag"], fold, source["exp1_subdir"])
                    inputs[(name, source["method"], fold)] = project_with_exp1_head(path, embedding, source["command"])
    return inputs


def head_targets(data, fold, kind):
    """(N, 13) targets of one head, zero-padded: class one-hot, fold-normalised box features, location."""
    if kind == "class":
        target = np.eye(awir.NUM_CLASSES)[data["class_label"]]
    elif kind == "boxfeat":
        target = awir.box_feature_targets(data["box_features"], data["folds"][fold - 1][0])
    else:
        target = data["box_location"]
    padded = np.zeros((len(target), OUTPUT_UNITS), np.float32)
    padded[:, :target.shape[1]] = target
    return padded


def train_task_heads(heads, inputs, data, args, progress_label="", chunk_epochs=None):
    """Train a list of heads (dicts with embedding, method, fold, kind, key) of one input width together.

    Heads are grouped by kind into contiguous slices so each slice gets its own loss in the same
    compiled step. Returns best-validation params/state, test predictions and wall seconds.
    """
    heads = sorted(heads, key=lambda head: list(HEAD_KINDS).index(head["kind"]))
    generators = [model_generator(args.seed, head["key"]) for head in heads]
    input_dim = inputs[heads[0]["input"]].shape[1]
    params, state = initial_task_head_params(input_dim, [h["kind"] for h in heads], generators)
    groups = []
    for kind in HEAD_KINDS:
        members = [i for i, head in enumerate(heads) if head["kind"] == kind]
        if members:
            groups.append((kind, members[0], members[-1] + 1))

    def stacked_loss(outputs, batch, valid):
        return tf.concat([task_head_loss(kind, outputs[start:stop], batch["target"][start:stop], valid[start:stop])
                          for kind, start, stop in groups], axis=0)

    per_model = {"x": np.stack([inputs[head["input"]] for head in heads]).astype(np.float32),
                 "target": np.stack([head_targets(data, head["fold"], head["kind"]) for head in heads])}
    stack = TaskHeadStack(params, task_head_forward, stacked_loss, {}, per_model, state=state,
                          learning_rate=args.learning_rate, batch_size=args.batch_size,
                          model_keys=[head["key"] for head in heads])

    chunk_seconds = []

    def progress(done, total, seconds, train_loss, val_loss):
        chunk_seconds.append(seconds)
        print(f"  {progress_label} epoch {done}/{total}  {seconds:6.1f}s  mean train loss "
              f"{train_loss.mean():.4f}  mean val loss {val_loss.mean():.4f}", flush=True)

    train_lists = [data["folds"][head["fold"] - 1][0] for head in heads]
    val_lists = [data["folds"][head["fold"] - 1][1] for head in heads]
    started = time.perf_counter()
    # One compiled chunk of up to 500 epochs is reused for every later chunk of the same length.
    stack.fit(train_lists, val_lists, args.epochs, generators,
              chunk_epochs=chunk_epochs or max(1, min(500, args.epochs)), progress=progress)
    seconds = time.perf_counter() - started
    best_params, best_state = stack.best()
    test_outputs = stack.predict(per_model["x"][:, data["test"]])
    return {"heads": heads, "params": best_params, "state": best_state, "test_outputs": test_outputs,
            "input_dim": input_dim, "best_val_loss": stack.best_val_loss.numpy(), "seconds": seconds,
            "chunk_seconds": chunk_seconds}


def train_task_job(job, data, args):
    """Train one stack of task heads (a module-level function, so worker processes can run it)."""
    return train_task_heads(job["heads"], job["inputs"], data, args, progress_label=job["label"])


def plan_jobs(units, inputs, workers):
    """Split the heads of each (embedding, input width) into `workers` stacks, largest work first."""
    stacks = {}
    for unit in units:
        width = inputs[unit["input"]].shape[1]
        for kind in HEAD_KINDS:
            # Each head's random stream (initialisation, batch order) depends only on its identity.
            key = unit["key"] * 10 + list(HEAD_KINDS).index(kind)
            stacks.setdefault((unit["embedding"], width), []).append(dict(unit, kind=kind, key=key))
    jobs = []
    for (name, width), heads in stacks.items():
        folds = sorted({head["fold"] for head in heads})
        parts = max(1, min(workers, len(folds)))
        for part in range(parts):
            members = [head for head in heads if folds.index(head["fold"]) % parts == part]
            jobs.append({"heads": members, "label": f"{name}/{width}d[{part + 1}/{parts}]",
                         "cost": (width + 40) * len(members)})
    return sorted(jobs, key=lambda job: -job["cost"])


def check_previous_run(config_path, args, overwrite):
    """Refuse to mix heads trained with other arguments into this run's outputs."""
    return runs.check_same_settings(config_path, {key: getattr(args, key) for key in TRAINING_KEYS}, overwrite,
                                  "existing task heads", hint=awir.RESUME_HINT)


def run_task_heads(data, sources, args, config_name="exp2_config.json"):
    """Train, export and evaluate the task heads of every (embedding, source, fold) not yet finished."""
    results_dir = Path(args.results_dir)
    config_path = results_dir / "trained_models" / "exp2_task_heads" / config_name
    training_config = check_previous_run(config_path, args, args.overwrite)
    units = []
    for embedding_index, name in enumerate(args.embeddings):
        for source_index, source in enumerate(sources):
            for fold in args.folds:
                if metrics_path(results_dir, name, source["method"], fold).with_suffix(".json").exists() \
                        and not args.overwrite:
                    continue
                units.append({"embedding": name, "method": source["method"], "fold": fold,
                              "input": (name, source["method"], fold), "source": source,
                              "key": embedding_index * 100000 + source_index * 100 + fold})
    skipped = len(args.embeddings) * len(sources) * len(args.folds) - len(units)
    if skipped:
        print(f"reusing {skipped} finished (embedding, method, fold) task-head sets (--overwrite retrains them)")
    if not units:
        return
    needed = sorted({(unit["embedding"], unit["method"]) for unit in units})
    inputs = load_inputs(data, [s for s in sources if any(s["method"] == m for _, m in needed)],
                         sorted({n for n, _ in needed}), sorted({u["fold"] for u in units}), results_dir)
    atomic.write_json(config_path, training_config)
    jobs = plan_jobs(units, inputs, args.workers)
    print(f"# ---- train: {sum(len(j['heads']) for j in jobs)} task heads in {len(jobs)} stacks on "
          f"{args.workers} worker(s), {args.epochs} epochs ----")
    pending, keras_models = {}, {}

    def finished(job, result):
        # The joint wall time is divided evenly over the heads trained together (spec: Timings).
        seconds_per_head = result["seconds"] / len(result["heads"])
        for index, head in enumerate(result["heads"]):
            path = task_head_path(results_dir, head["embedding"], head["method"], head["kind"], head["fold"])
            export_task_head(result["params"], result["state"], index, head["kind"], result["input_dim"], path,
                             args.learning_rate, keras_models)
            # ---- evaluate ----
            target = head_targets(data, head["fold"], head["kind"])[data["test"], :HEAD_KINDS[head["kind"]]["units"]]
            predictions = head_predictions(head["kind"], result["test_outputs"][index])
            unit_metrics = pending.setdefault((head["embedding"], head["method"], head["fold"]), {})
            unit_metrics.update(task_metrics(head["kind"], predictions, target))
            unit_metrics[HEAD_KINDS[head["kind"]]["time"]] = round(seconds_per_head, 4)
            unit_metrics[f"{head['kind']}_best_val_loss"] = float(result["best_val_loss"][index])
            if all(HEAD_KINDS[k]["time"] in unit_metrics for k in HEAD_KINDS):
                write_metrics(results_dir, head["embedding"], head["method"], head["fold"], unit_metrics)
        print(f"  {job['label']}: {len(result['heads'])} heads in {result['seconds']:.1f}s "
              f"({1e3 * result['seconds'] / (len(result['heads']) * args.epochs):.3f} ms per head-epoch)")

    for job in jobs:
        job["inputs"] = {head["input"]: inputs[head["input"]] for head in job["heads"]}
    seconds = run_side_by_side(jobs, functools.partial(train_task_job, data=data, args=args), finished,
                               args.workers, args.deterministic)
    print(f"  all stacks done in {seconds:.1f}s")


def write_metrics(results_dir, embedding, method, fold, values):
    """The reference's .npy dict (np.save of a dict) and a .json twin that our code reads."""
    path = metrics_path(results_dir, embedding, method, fold)
    record = {key: values[key] for key in METRICS + TIME_METRICS}
    atomic.save_npy(path, np.array(record, dtype=object), allow_pickle=True)
    atomic.write_json(path.with_suffix(".json"), dict(values, embedding=embedding, method=method, fold=fold))


def read_metrics(results_dir, embedding, method, folds):
    """Per-fold metrics from the .json twins (never unpickled); None for folds not finished."""
    rows = []
    for fold in folds:
        path = metrics_path(results_dir, embedding, method, fold).with_suffix(".json")
        if path.exists():
            try:
                rows.append(json.loads(path.read_text()))
            except ValueError as error:
                raise InputError(path, f"is not valid JSON ({error})", "the metrics twin igarss_exp2.py writes; "
                                 "delete it to retrain that fold") from None
    return rows


# ---- the paper's table ----

def summarise(results_dir, embedding_names, methods, folds):
    """Mean and std over folds per embedding x method: the rows of summary.csv / summary.md."""
    rows = []
    for name in embedding_names:
        for method in methods:
            per_fold = read_metrics(results_dir, name, method, folds)
            if not per_fold:
                continue
            row = {"embedding": name, "method": method, "folds": len(per_fold)}
            for metric in METRICS + TIME_METRICS:
                values = np.array([fold_metrics[metric] for fold_metrics in per_fold], np.float64)
                row[f"{metric}_mean"] = float(values.mean())
                row[f"{metric}_std"] = float(values.std())
            rows.append(row)
    return rows


def best_marks(rows):
    """{(row index, metric)} of the best value of each column within each embedding."""
    marks = set()
    for name in sorted({row["embedding"] for row in rows}):
        members = [i for i, row in enumerate(rows) if row["embedding"] == name]
        for metric in METRICS:
            values = [rows[i][f"{metric}_mean"] for i in members]
            best = min(values) if metric in LOWER_IS_BETTER else max(values)
            marks.update((i, metric) for i, value in zip(members, values) if value == best)
    return marks


def write_summary(rows, directory, prefix="summary"):
    """summary.csv (numbers), summary.md (readable table, best per embedding in bold), summary.png."""
    directory = Path(directory)
    grid = [key for key in ("top_percent", "random_percent") if rows and key in rows[0]]
    columns = (["embedding", "method"] + grid + ["folds"]
               + [f"{m}_{s}" for m in METRICS + TIME_METRICS for s in ("mean", "std")])
    atomic.write_csv(directory / f"{prefix}.csv", rows, columns)
    marks = best_marks(rows)
    lines = ["# TG-MATL experiment 2: task heads on the fixed test set",
             "",
             "Mean +- std over folds. Best per embedding in **bold** (highest acc / f1 / R^2, lowest MSE).",
             "",
             "| embedding | method | folds | " + " | ".join(METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for index, row in enumerate(rows):
        cells = []
        for metric in METRICS:
            cell = f"{row[f'{metric}_mean']:.4f} +- {row[f'{metric}_std']:.4f}"
            cells.append(f"**{cell}**" if (index, metric) in marks else cell)
        lines.append(f"| {row['embedding']} | {row['method']} | {row['folds']} | " + " | ".join(cells) + " |")
    atomic.write_text(directory / f"{prefix}.md", "\n".join(lines) + "\n")
    plot_summary(rows, directory / f"{prefix}.png")


def plot_summary(rows, path):
    """Bar chart of acc / r2_feat / r2_loc per method, grouped by embedding, with fold std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    embeddings = sorted({row["embedding"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / max(len(methods), 1)
    for axis, metric in zip(axes, ("acc", "r2_feat", "r2_loc")):
        for offset, method in enumerate(methods):
            means, stds, positions = [], [], []
            for position, name in enumerate(embeddings):
                match = [row for row in rows if row["embedding"] == name and row["method"] == method]
                if match:
                    means.append(match[0][f"{metric}_mean"])
                    stds.append(match[0][f"{metric}_std"])
                    positions.append(position + (offset - (len(methods) - 1) / 2) * width)
            axis.bar(positions, means, width, yerr=stds, label=method, capsize=2)
        axis.set_xticks(range(len(embeddings)), embeddings)
        axis.set_title(metric)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    atomic.save_figure(figure, path)
    plt.close(figure)


def demo_inputs(args, script="igarss_exp2"):
    """The synthetic dataset of `igarss_exp1.py --demo`, regenerated from the same seed (identical data,
    so the folds file and the exp1 heads apply)."""
    demo_dir = Path(args.results_dir) / "demo_data" / script
    return awir.make_demo_data(demo_dir, seed=args.seed)


def checked_folds(folds):
    bad_folds = [fold for fold in folds if not 1 <= fold <= awir.NUM_FOLDS]
    if bad_folds:
        raise InputError("--folds", f"has {bad_folds}", f"fold numbers in 1..{awir.NUM_FOLDS}")
    return sorted(set(folds))


@cli_entry
def main(args):
    runs.seed_everything(args.seed, args.deterministic)
    command = "python igarss_exp1.py" + (" --demo" if args.demo else "") + \
        (f" --results_dir {args.results_dir}" if args.results_dir != "results" else "")
    if args.demo:
        args.data, args.embeddings_dir = demo_inputs(args)
        # Demo: fewer epochs with a 30x learning rate, so the heads converge in about a minute.
        if args.epochs == get_args_parser().get_default("epochs"):
            args.epochs = 100
        if args.learning_rate == get_args_parser().get_default("learning_rate"):
            args.learning_rate = 3e-3
    args.folds = checked_folds(args.folds)
    runs.print_args(args)

    # ---- data ----
    data = awir.load_awir(args.data, args.embeddings_dir, args.embeddings, args.results_dir, args.test_size)
    print(f"samples {len(data['class_label'])}, test {len(data['test'])}, folds {args.folds}, "
          f"steps per epoch {int(np.ceil(max(len(t) for t, _ in data['folds']) / args.batch_size))}, "
          f"task heads {3 * len(args.embeddings) * len(args.methods) * len(args.folds)}")
    sources = sources_for(args, command)

    # ---- model + train + evaluate ----
    run_task_heads(data, sources, args)

    # ---- summary ----
    methods = [source["method"] for source in sources]
    rows = summarise(args.results_dir, args.embeddings, methods, args.folds)
    write_summary(rows, Path(args.results_dir) / "exp2_results")
    report = {}
    for method in methods:
        members = [row for row in rows if row["method"] == method]
        report[method] = {metric: float(np.mean([row[f"{metric}_mean"] for row in members])) for metric in METRICS}
        print(f"summary: {method} acc {report[method]['acc']:.3f} f1 {report[method]['f1']:.3f} "
              f"r2_feat {report[method]['r2_feat']:.3f} r2_loc {report[method]['r2_loc']:.3f} "
              f"(mean over {len(members)} embeddings x {len(args.folds)} folds)")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
