"""TG-MATL experiment 1: projection heads trained with four triplet losses on foundation embeddings.

Paper: M. Zhou, A. Zare, "Task-Guided Multi-Annotation Triplet Learning for Remote Sensing
Representations", IGARSS 2026, arXiv 2604.03837 (predecessor: MATL, IGARSS 2025, arXiv 2504.08054).

For each embedding (CLIP, DINOv2, MAE), each loss (DTL, DTL-Hard, MATL, TG-MATL) and each of the 8
folds, a linear 64-unit projection head is trained for 5000 epochs with Adam(1e-4), batch 32, and the
weights with the best validation loss are kept: 96 heads. Writes, at the paper repo's paths,

    results/trained_models/exp1_emb_proj/{emb}/{method}_best_fold{k}.h5
    results/exp1_test_projections/{emb}/{method}_proj_val0.7_fold{k}.npy   (fixed test set, best weights)
    results/exp1_timings/timings_test0.7.csv
    results/splits/folds_test0.7.json                                       (the shared fold protocol)

Commands:
    python igarss_exp1.py --margin 0.1 --batch_size 32 --test_size 0.7     # the paper's protocol
    python igarss_exp1.py --demo                                           # synthetic data, ~1 minute

All heads of one embedding train together in one compiled graph (common/stacked_training.py),
which equals training them one by one: the full protocol takes under 3 minutes on a 2-core CPU.
It ends with one line per method, e.g.
    summary: tg_matl test 5-NN accuracy 0.93 (mean over 3 embeddings x 8 folds), best val loss 0.02
"""

import argparse
import functools
import time
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np
import tensorflow as tf

from common import atomic, awir, cli, embedding_views, runs, stacked_training, triplet
from common.errors import cli_entry

METHODS = ("dtl", "dtl_hard", "matl", "tg_matl")
PROJECTION_DIM = 64
TIMING_COLUMNS = {
    "dtl": "dtl_train_time",
    "dtl_hard": "dtl_hard_train_time",
    "matl": "matl_train_time",
    "tg_matl": "tg_matl_train_time",
}
# Arguments that change what a head learns: finished heads are reused only if these agree.
TRAINING_KEYS = (
    "margin", "batch_size", "test_size", "box_weight", "top_percent", "random_percent", "extra_selection",
    "epochs", "learning_rate", "seed", "model_selection",
)  # fmt: skip
MODEL_SELECTIONS = ("reference", "matl_val", "last")


def add_projection_head_arguments(parser, demo_help):
    """Flags of igarss_exp1.py and igarss_exp1_sweep.py (the reference repository's names)."""
    awir.add_protocol_arguments(parser, demo_help)
    parser.add_argument("--margin", type=float, default=0.1, help="Triplet margin m (paper: 0.1).")
    parser.add_argument(
        "--box_weight",
        type=float,
        default=0.5,
        help="MATL weight w of the box-cluster triplet term: (1-w) L_class + w L_box.",
    )
    parser.add_argument(
        "--top_percent",
        type=float,
        default=0.3,
        help="TG-MATL: share of each class kept by score.",
    )
    parser.add_argument(
        "--random_percent",
        type=float,
        default=0.1,
        help="TG-MATL: extra share of each class.",
    )
    parser.add_argument(
        "--extra_selection",
        default="ranked",
        choices=("ranked", "random"),
        help="TG-MATL extra samples: next-ranked (reference) or a seeded uniform draw among the rest.",
    )
    parser.add_argument(
        "--model_selection",
        default="reference",
        choices=MODEL_SELECTIONS,
        help="Weights kept: best validation value of the head's own training loss (reference), of the "
        "unmasked MATL loss for TG-MATL heads (matl_val; others as reference), or the last epoch's.",
    )
    return parser


def get_args_parser():
    parser = cli.Parser("TG-MATL experiment 1: projection heads")
    add_projection_head_arguments(parser, "and run the full protocol on it (about a minute on a CPU).")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="Losses to train (paper: all four).",
    )
    awir.add_calibration_argument(parser)
    parser.add_argument(
        "--views",
        nargs="*",
        default=list(embedding_views.VIEW_METHODS),
        choices=embedding_views.VIEW_METHODS,
        help="2-D maps of the fold-1 test projections per embedding x method (silhouette scores are "
        "always written; give no value to skip the maps).",
    )
    parser.demo_defaults(epochs=300)
    return parser


def head_paths(results_dir, embedding, tag, fold, test_size, model_subdir=""):
    model_dir = Path(results_dir) / "trained_models" / "exp1_emb_proj" / embedding / model_subdir
    projection_dir = Path(results_dir) / "exp1_test_projections" / embedding / model_subdir
    return (
        model_dir / f"{tag}_best_fold{fold}.h5",
        projection_dir / f"{tag}_proj_val{test_size}_fold{fold}.npy",
    )


# ---- the paper's model and losses ----


def build_projection_head(input_dim):
    """The reference ProjectionHead: a linear Dense(64) on the foundation embedding, no normalisation."""
    import keras

    inputs = keras.Input(shape=(input_dim,), name="foundation_embedding")
    outputs = keras.layers.Dense(
        PROJECTION_DIM, name="proj", kernel_initializer="glorot_uniform", bias_initializer="zeros"
    )(inputs)
    return keras.Model(inputs, outputs, name="ProjectionHead")


def initial_head_params(input_dim, generators):
    """Glorot-uniform kernels and zero biases, one per model, from each model's own generator."""
    kernel = np.stack([stacked_training.glorot_uniform(g, input_dim, PROJECTION_DIM) for g in generators])
    return {
        "kernel": kernel.astype(np.float32),
        "bias": np.zeros((len(generators), PROJECTION_DIM), np.float32),
    }


def linear_forward(params, state, x, valid, training):
    return tf.einsum("mbd,mde->mbe", x, params["kernel"]) + params["bias"][:, None, :], state


def method_loss(method, outputs, batch, valid, args, top_percent=None, random_percent=None):
    """One of the four exp1 losses on a stack of same-method models: the readable reference.

    DTL and DTL-Hard are the paper's baselines, MATL the predecessor's loss (arXiv 2504.08054), and
    TG-MATL is MATL on the paper's task-guided selection (README: igarss_exp1.py).
    """
    distance = triplet.pairwise_distance(outputs)
    if method == "dtl":
        return triplet.batch_all_triplet_loss(distance, batch["class_label"], valid, args.margin)
    if method == "dtl_hard":
        return triplet.batch_hard_triplet_loss(distance, batch["class_label"], valid, args.margin)
    if method == "tg_matl":
        # TG-MATL: MATL restricted to the task-guided selection of each class in the batch.
        random_key = None
        if args.extra_selection == "random":
            random_key = triplet.random_selection_key(
                batch["model_key"], batch["model_step"], batch["sample_id"]
            )
        valid = triplet.task_guided_selection(
            batch["task_score"], batch["class_label"], valid, top_percent, random_percent, random_key
        )
    return triplet.matl_loss(
        distance, batch["class_label"], batch["box_cluster"], valid, args.margin, args.box_weight
    )


def fold_task_scores(data, seed):
    """The paper's task-guidance scores per fold: train and validation splits scored separately."""
    scores = np.zeros((len(data["folds"]), len(data["class_label"])), np.float32)
    for fold, (train, val) in enumerate(data["folds"]):
        for split in (train, val):
            scores[fold, split] = awir.task_guidance_scores(
                data["box_label"][split], data["class_label"][split], seed
            )
    return scores


# ---- training many heads at once ----

# Order of the methods inside a stack: every batch-all term then covers one contiguous block of rows.
STACK_ORDER = ("dtl_hard", "dtl", "matl", "tg_matl")


def stacked_method_loss(heads, args, task_guided=True):
    """The loss of a stack of heads sorted by STACK_ORDER, per head equal to `method_loss`.

    With `task_guided` False, TG-MATL rows get the unmasked MATL loss (the `--model_selection
    matl_val` validation loss: the selection leaves a 9-sample split almost no triplet).

    The fast twin of `method_loss`: tests/test_igarss_exp1.py
    (test_stacked_engine_matches_one_by_one_keras_training) proves them equal. Built from few, large
    operations (one distance matrix, one batch-hard call, one batch-all call covering the class
    labels of DTL/MATL/TG-MATL rows and the box clusters of MATL/TG-MATL rows), which keeps the
    compiled step small and quick to compile.
    """
    methods = [head["method"] for head in heads]
    if methods != sorted(methods, key=STACK_ORDER.index):
        raise ValueError("heads must be sorted by STACK_ORDER")
    num_models = len(heads)
    class_start = methods.count("dtl_hard")  # rows with a class batch-all term
    box_start = class_start + methods.count("dtl")  # rows with a box-cluster term (MATL, TG-MATL)
    selection_start = box_start + methods.count("matl")  # TG-MATL rows
    top_percent = np.array([head.get("top_percent", args.top_percent) for head in heads[selection_start:]])
    random_percent = np.array(
        [head.get("random_percent", args.random_percent) for head in heads[selection_start:]]
    )

    def loss(outputs, batch, valid):
        distance = triplet.pairwise_distance(outputs)
        class_label, box_cluster = batch["class_label"], batch["box_cluster"]
        losses = []
        if class_start:
            losses.append(
                triplet.batch_hard_triplet_loss(
                    distance[:class_start], class_label[:class_start], valid[:class_start], args.margin
                )
            )
        if task_guided and selection_start < num_models:
            random_key = None
            if args.extra_selection == "random":
                random_key = triplet.random_selection_key(
                    batch["model_key"][selection_start:],
                    batch["model_step"][selection_start:],
                    batch["sample_id"][selection_start:],
                )
            selected = triplet.task_guided_selection(
                batch["task_score"][selection_start:],
                class_label[selection_start:],
                valid[selection_start:],
                top_percent,
                random_percent,
                random_key,
            )
            valid = tf.concat([valid[:selection_start], selected], axis=0)
        if class_start < num_models:
            batch_all = triplet.batch_all_triplet_loss(
                tf.concat([distance[class_start:], distance[box_start:]], axis=0),
                tf.concat([class_label[class_start:], box_cluster[box_start:]], axis=0),
                tf.concat([valid[class_start:], valid[box_start:]], axis=0),
                args.margin,
            )
            class_term, box_term = (
                batch_all[: num_models - class_start],
                batch_all[num_models - class_start :],
            )
            losses.append(class_term[: box_start - class_start])
            if box_start < num_models:
                losses.append(
                    (1.0 - args.box_weight) * class_term[box_start - class_start :]
                    + args.box_weight * box_term
                )
        return tf.concat(losses, axis=0)

    return loss


def train_heads(
    heads, embedding, data, task_scores, args, progress_label="", chunk_epochs=None, progress=None
):
    """Train a list of heads (dicts with method, fold, key, top/random percent) in one stack.

    Returns the selected params (`--model_selection`), validation losses, histories and wall seconds;
    the heads come back in the stack's order (by method, see STACK_ORDER). `chunk_epochs` and
    `progress` override the compiled chunk length and the progress printer.
    """
    heads = sorted(heads, key=lambda head: STACK_ORDER.index(head["method"]))
    generators = [stacked_training.model_generator(args.seed, head["key"]) for head in heads]
    params = initial_head_params(embedding.shape[1], generators)
    per_model = {"task_score": task_scores[[head["fold"] - 1 for head in heads]]}
    shared = {
        "x": embedding,
        "class_label": data["class_label"].astype(np.int32),
        "box_cluster": data["box_cluster"].astype(np.int32),
        "sample_id": np.arange(len(data["class_label"]), dtype=np.int32),
    }
    validation_loss = None
    if args.model_selection == "matl_val":
        validation_loss = stacked_method_loss(heads, args, task_guided=False)
    stack = stacked_training.StackedModels(
        params,
        linear_forward,
        stacked_method_loss(heads, args),
        shared,
        per_model,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        model_keys=[head["key"] for head in heads],
        # Compiling pays off only over many epochs; results agree either way.
        jit_compile=getattr(args, "jit_compile", args.epochs >= 100),
        validation_loss=validation_loss,
    )
    train_lists, val_lists = stacked_training.fold_index_lists(data["folds"], heads)
    started = time.perf_counter()
    train_history, val_history = stack.fit(
        train_lists,
        val_lists,
        args.epochs,
        generators,
        chunk_epochs=chunk_epochs or max(1, min(500, args.epochs)),
        progress=progress or stacked_training.progress_printer(progress_label),
    )
    seconds = time.perf_counter() - started
    best_params, _ = stack.best()
    best_val_loss, best_epoch = stack.best_val_loss.numpy(), stack.best_epoch.numpy()
    if args.model_selection == "last":
        best_params, _ = stack.last()
        best_val_loss, best_epoch = val_history[-1], np.full(len(heads), args.epochs - 1)
    return {
        "heads": heads,
        "params": best_params,
        "best_val_loss": best_val_loss,
        "best_epoch": best_epoch,
        "train_history": train_history,
        "val_history": val_history,
        "seconds": seconds,
    }


def calibrate_method_costs(heads_by_embedding, data, task_scores, args):
    """{(embedding, method): seconds per head-epoch of a stack of that method's heads alone}.

    The timings split a stack's wall time over its heads in proportion to these costs, so each
    method is charged what its own loss costs (batch-hard, batch-all, selection), not an equal share.
    Each stack of one method's heads (up to 8 folds) runs one compiled chunk of
    `--calibration_epochs`, then two timed ones (stacked_training.calibrate_costs).
    """
    epochs = args.calibration_epochs
    settings = argparse.Namespace(**dict(vars(args), epochs=3 * epochs, jit_compile=args.epochs >= 100))
    groups = {}
    for name, heads in heads_by_embedding.items():
        for method in sorted({head["method"] for head in heads}, key=STACK_ORDER.index):
            alone = [dict(head, key=head["key"] + 10**7) for head in heads if head["method"] == method]
            groups[(name, method)] = alone

    def train(key, heads, chunk_epochs, progress):
        embedding = data["embeddings"][key[0]]
        train_heads(
            heads, embedding, data, task_scores, settings, chunk_epochs=chunk_epochs, progress=progress
        )

    return stacked_training.calibrate_costs(groups, train, epochs)


def split_into_jobs(heads_by_embedding, embeddings, workers):
    """Split each embedding's heads into `workers` stacks (folds round-robin), largest work first."""
    jobs = stacked_training.split_into_stacks(
        heads_by_embedding, workers, cost=lambda name: embeddings[name].shape[1], label=str
    )
    return [dict(job, embedding=job["group"]) for job in jobs]


def train_job(job, data, task_scores, args):
    """Train one stack of heads (a module-level function, so worker processes can run it)."""
    embedding = data["embeddings"][job["embedding"]]
    return train_heads(job["heads"], embedding, data, task_scores, args, progress_label=job["label"])


def train_jobs(jobs, data, task_scores, args, record):
    """Train the stacks side by side on `args.workers` workers; `record` runs in this process."""

    def finished(job, result):
        record(job, result)
        print(stacked_training.finished_line(job, result, args.epochs))

    run = functools.partial(train_job, data=data, task_scores=task_scores, args=args)
    seconds = stacked_training.run_side_by_side(jobs, run, finished, args.workers, args.deterministic)
    print(f"  all stacks done in {seconds:.1f}s")


# ---- export and evaluation ----


def export_heads(result, embedding, test_embedding, paths):
    """Save each head as a reloadable Keras .h5 and its test projection (best weights) as .npy."""
    head_model = build_projection_head(embedding.shape[1])
    for index, (model_path, projection_path) in enumerate(paths):
        kernel, bias = result["params"]["kernel"][index], result["params"]["bias"][index]
        head_model.set_weights([kernel, bias])
        atomic.save_keras(head_model, model_path)
        projection = (test_embedding @ kernel + bias).astype(np.float32)
        atomic.save_npy(projection_path, projection)


def head_knn_accuracies(result, embedding, data):
    """Test and validation 5-NN class accuracies of every head of a finished stack, each against
    its fold's training projections: ([test], [validation])."""
    test_accuracies, val_accuracies = [], []
    for index, head in enumerate(result["heads"]):
        train, val = data["folds"][head["fold"] - 1]
        kernel, bias = result["params"]["kernel"][index], result["params"]["bias"][index]
        train_points, train_labels = embedding[train] @ kernel + bias, data["class_label"][train]
        for split, accuracies in ((data["test"], test_accuracies), (val, val_accuracies)):
            accuracies.append(
                awir.knn_accuracy(
                    train_points, train_labels, embedding[split] @ kernel + bias, data["class_label"][split]
                )
            )
    return test_accuracies, val_accuracies


def export_and_evaluate(job, result, data):
    """Write a finished stack's heads and projections; return each head's test and validation 5-NN
    accuracies."""
    embedding = data["embeddings"][job["embedding"]]
    export_heads(result, embedding, embedding[data["test"]], [head["paths"] for head in result["heads"]])
    return head_knn_accuracies(result, embedding, data)


# ---- the protocol ----


def check_training_settings(results_dir, config_name, args, keys):
    """Refuse to mix heads trained with other arguments into this results tree; record these ones."""
    config_path = Path(results_dir) / "trained_models" / "exp1_emb_proj" / config_name
    current = runs.check_same_settings(
        config_path, runs.settings_of(args, keys), args.overwrite, "existing heads", hint=awir.RESUME_HINT
    )
    atomic.write_json(config_path, current)


def heads_to_train(args, results_dir):
    """{embedding: [head]} for every (embedding, method, fold) without finished files."""
    heads_by_embedding = {}
    for embedding_index, name in enumerate(args.embeddings):
        for method in args.methods:
            tag = awir.method_tag(method, args.top_percent, args.random_percent)
            for fold in range(1, awir.NUM_FOLDS + 1):
                paths = head_paths(results_dir, name, tag, fold, args.test_size)
                if all(path.exists() for path in paths) and not args.overwrite:
                    continue
                key = embedding_index * 1000 + METHODS.index(method) * 100 + fold
                head = {"method": method, "fold": fold, "tag": tag, "paths": paths, "key": key}
                heads_by_embedding.setdefault(name, []).append(head)
    skipped = [name for name in args.embeddings if name not in heads_by_embedding]
    if skipped:
        print(f"finished heads reused for {', '.join(skipped)} (--overwrite retrains them)")
    return heads_by_embedding


def record_stack(job, result, data, timings, timings_path, summary, zero_validation_loss, costs):
    """Export a finished stack, add its timings and test accuracies, note zero validation losses."""
    accuracies, _ = export_and_evaluate(job, result, data)
    name, heads = job["embedding"], result["heads"]
    seconds = stacked_training.head_seconds(result["seconds"], heads, costs, lambda h: (name, h["method"]))
    for index, head in enumerate(heads):
        row = timings.setdefault((name, head["fold"]), {"experiment": name, "fold": head["fold"]})
        row[TIMING_COLUMNS[head["method"]]] = round(float(seconds[index]), 4)
        if result["best_val_loss"][index] == 0.0:
            zero_validation_loss.setdefault(f"{name} {head['tag']}", []).append(
                f"{head['fold']} (epoch {result['best_epoch'][index] + 1})"
            )
        summary[head["method"]]["knn"].append(accuracies[index])
        summary[head["method"]]["val"].append(float(result["best_val_loss"][index]))
    columns = ["experiment", "fold", *TIMING_COLUMNS.values()]
    atomic.write_csv(timings_path, [timings[key] for key in sorted(timings)], columns)


def method_costs(heads_by_embedding, data, task_scores, args, results_dir):
    """Calibrate each method's own cost (see calibrate_method_costs), print and record it."""
    if not heads_by_embedding or args.calibration_epochs <= 0:
        return {}
    costs = calibrate_method_costs(heads_by_embedding, data, task_scores, args)
    stacked_training.write_costs(
        costs, results_dir / "exp1_timings" / f"method_costs_test{args.test_size}.csv"
    )
    return costs


def write_views(data, args, results_dir):
    """Silhouette scores (class, box cluster) and t-SNE / UMAP maps of the test projections."""
    projections = {}
    for name in args.embeddings:
        for method in args.methods:
            tag = awir.method_tag(method, args.top_percent, args.random_percent)
            paths = [head_paths(results_dir, name, tag, fold, args.test_size)[1] for fold in range(1, 9)]
            projections[(name, tag)] = [np.load(path) for path in paths if path.exists()]
    projections = {key: value for key, value in projections.items() if value}
    if not projections:
        return []
    test = data["test"]
    rows = embedding_views.write_views(
        projections, data["class_label"][test], data["box_cluster"][test],
        results_dir / "exp1_test_projections" / "views", args.views, args.seed,
    )  # fmt: skip
    for row in rows:
        print(
            f"  silhouette {row['embedding']} {row['method']}: class {row['silhouette_class']:.3f}, "
            f"box cluster {row['silhouette_box']:.3f} (mean over {row['folds']} folds)"
        )
    return rows


def write_report(summary, zero_validation_loss, args, results_dir):
    """knn_summary.json and the summary lines: per method, mean test 5-NN accuracy and best val loss."""
    for head_group, folds in sorted(zero_validation_loss.items()):
        # The reference's model selection uses the training loss on the validation split; when it is
        # exactly 0 (e.g. TG-MATL keeps one sample per class of a 9-sample split, so no triplet
        # exists), the first epoch that reaches 0 is kept.
        print(
            f"  note: {head_group}: validation loss 0, selection kept the first such epoch, folds "
            f"{', '.join(sorted(folds))}"
        )
    report = {
        method: {
            "test_knn5_accuracy": float(np.mean(v["knn"])),
            "best_val_loss": float(np.mean(v["val"])),
            "heads": len(v["knn"]),
        }
        for method, v in summary.items()
        if v["knn"]
    }
    if report:
        atomic.write_json(Path(results_dir) / "exp1_test_projections" / "knn_summary.json", report)
    for method, values in report.items():
        print(
            f"summary: {awir.method_tag(method, args.top_percent, args.random_percent)} test 5-NN accuracy "
            f"{values['test_knn5_accuracy']:.3f} (mean over {values['heads']} heads), "
            f"best val loss {values['best_val_loss']:.4f}"
        )
    return report


@cli_entry
def main(args):
    runs.seed_everything(args.seed, args.deterministic)
    if args.demo:
        args.data, args.embeddings_dir = awir.demo_inputs(args, "igarss_exp1")
    runs.print_args(args)
    results_dir = Path(args.results_dir)

    # ---- data ----
    data = awir.load_awir(args.data, args.embeddings_dir, args.embeddings, results_dir, args.test_size)
    awir.print_data(data, args.batch_size)
    task_scores = fold_task_scores(data, args.seed)
    check_training_settings(results_dir, "exp1_config.json", args, TRAINING_KEYS)

    # ---- train ----
    timings_path = results_dir / "exp1_timings" / f"timings_test{args.test_size}.csv"
    timings = awir.read_timings(
        timings_path, args.overwrite, key=lambda row: (row["experiment"], int(row["fold"]))
    )
    heads_by_embedding = heads_to_train(args, results_dir)
    costs = method_costs(heads_by_embedding, data, task_scores, args, results_dir)
    jobs = split_into_jobs(heads_by_embedding, data["embeddings"], args.workers)
    summary = {method: {"knn": [], "val": []} for method in args.methods}
    zero_validation_loss = {}
    record = functools.partial(
        record_stack,
        data=data,
        timings=timings,
        timings_path=timings_path,
        summary=summary,
        zero_validation_loss=zero_validation_loss,
        costs=costs,
    )
    print(
        f"# ---- train: {sum(len(j['heads']) for j in jobs)} heads in {len(jobs)} stacks on "
        f"{args.workers} worker(s), {args.epochs} epochs ----"
    )
    train_jobs(jobs, data, task_scores, args, record)

    # ---- evaluate ----
    write_views(data, args, results_dir)
    return write_report(summary, zero_validation_loss, args, results_dir)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
