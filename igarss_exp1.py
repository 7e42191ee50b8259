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
    python igarss_exp1.py --demo                                           # synthetic data, 2-4 minutes

The file reads top to bottom as the method: the ProjectionHead, the triplet losses (batch-all DTL,
batch-hard DTL-Hard, MATL), the task-guidance score and the task-guided selection of TG-MATL, the
four losses as one readable function (`method_loss`), then its fast twin that trains many heads in
one graph, evaluation (5-NN accuracy, silhouettes, t-SNE / UMAP maps) and the protocol.

All heads of one embedding train together in one compiled graph (common/tgmatl/stacked_training.py),
which equals training them one by one: the full protocol (N=240, 96 heads x 5000 epochs) took
2 min 31 s and 2 min 41 s end to end in two runs on a 2-core CPU. It ends with one line per method;
the demo printed on a 2-core CPU (the figures depend a little on the CPU):
    summary: dtl test 5-NN accuracy 0.999 (mean over 24 heads), best val loss 0.6521
    summary: dtl_hard test 5-NN accuracy 0.999 (mean over 24 heads), best val loss 0.6686
    summary: matl test 5-NN accuracy 0.988 (mean over 24 heads), best val loss 2.7054
    summary: tg_matl_30_10 test 5-NN accuracy 0.939 (mean over 24 heads), best val loss 0.3150
"""

import argparse
import csv
import functools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from common import cli, tensorboard
from common import progress as progress_bars
from common.tgmatl import awir, flags

METHODS = ("dtl", "dtl_hard", "matl", "tg_matl")
# The 2-D maps of the test projections, and the marker of each box cluster in them.
VIEW_METHODS = ("tsne", "umap")
MARKERS = ("o", "^", "s", "D", "v", "P")


def get_args_parser():
    parser = cli.Parser("TG-MATL experiment 1: projection heads")
    flags.add_projection_head_arguments(parser, "and run the full protocol on it (about a minute on a CPU).")
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
        default=list(VIEW_METHODS),
        choices=VIEW_METHODS,
        help="2-D maps of the fold-1 test projections per embedding x method (silhouette scores are "
        "always written; give no value to skip the maps).",
    )
    tensorboard.add_argument(parser)
    progress_bars.add_argument(parser)
    parser.demo_defaults(epochs=300)
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np
import tensorflow as tf

from common import atomic, plots, runs
from common.errors import cli_entry, require_in_range
from common.tgmatl import stacked_training

PROJECTION_DIM = 64
TIMING_COLUMNS = {
    "dtl": "dtl_train_time",
    "dtl_hard": "dtl_hard_train_time",
    "matl": "matl_train_time",
    "tg_matl": "tg_matl_train_time",
}
# The settings a resume must match: finished heads are reused only if these arguments agree.
RESUME_SETTINGS = (
    "margin",
    "batch_size",
    "test_size",
    "box_weight",
    "top_percent",
    "random_percent",
    "extra_selection",
    "epochs",
    "learning_rate",
    "seed",
    "model_selection",
)
# Below this a triplet term counts as not violating the margin (the reference's 1e-16), and the guard
# of the square root at zero distance.
TINY = 1e-16


def head_paths(results_dir, embedding, tag, fold, test_size, model_subdir=""):
    """A head's .h5 (awir.exp1_head_path, which igarss_exp2.py reads) and its test projection .npy."""
    projection_dir = Path(results_dir) / "exp1_test_projections" / embedding / model_subdir
    return (
        awir.exp1_head_path(results_dir, embedding, tag, fold, model_subdir),
        projection_dir / f"{tag}_proj_val{test_size}_fold{fold}.npy",
    )


# ---- the paper's model ----


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


# ---- the paper's triplet losses ----
#
# Every function works on a stack of M independent models' batches: embeddings (M, B, E), labels
# (M, B), and a boolean `valid` (M, B) that marks real samples (padding and samples dropped by the
# task-guided selection are False). Distances are Euclidean on the raw outputs, not squared; the
# square root is guarded so its gradient at zero distance is finite. The readable loss of one head
# is `method_loss` below; tests/test_triplet.py checks each function against brute-force loops over
# all triplets.


def pairwise_distance(embeddings):
    """(M, B, E) -> (M, B, B) Euclidean distances, with a finite gradient where two points coincide.

    Uses |a|^2 + |b|^2 - 2 a.b (one batched matrix product instead of a (M, B, B, E) difference
    tensor), clamped at 0 against rounding. The squared norms are the diagonal of the same Gram
    matrix, so for a point and its duplicate all four terms are the same float and the distance is
    exactly 0 (norms summed separately differ from the matrix product's dot products by rounding:
    up to 0.016 at norm 31 in float32, a sixth of the margin 0.1). This needs a matrix product that
    rounds every row alike, as the XLA-compiled training step does; TensorFlow's eager CPU product
    was seen to round the last row of a 40-row batch differently (0.011 at norm 31).
    """
    gram = tf.matmul(embeddings, embeddings, transpose_b=True)
    squared_norm = tf.linalg.diag_part(gram)
    squared = squared_norm[:, :, None] + squared_norm[:, None, :] - 2.0 * gram
    off_diagonal = 1.0 - tf.eye(tf.shape(embeddings)[1], dtype=embeddings.dtype)[None]
    squared = tf.maximum(squared, 0.0) * off_diagonal
    is_zero = tf.cast(squared <= 0.0, squared.dtype)
    return tf.sqrt(squared + is_zero * TINY) * (1.0 - is_zero)


def batch_all_triplet_loss(distance, labels, valid, margin):
    """Batch-all triplet loss L_BA per model (MATL paper, arXiv 2504.08054: the DTL loss).

    Valid triplets (a, p, n) are pairwise distinct, all valid, with y_a = y_p != y_n;
    l = max(0, D_ap - D_an + m); L = sum(l) / (count(l > 1e-16) + 1e-16), 0 when nothing violates.

    The triplet mask factorises as positive[a, p] * negative[a, n] (n differs from a and p by its
    label). With x_ap = D_ap + m and y_an = D_an, sum(l) = sum_ap x_ap c_ap - sum_an y_an c_an where
    c_ap = #{n: l_apn > 0} and c_an = #{p: l_apn > 0}. The counts are piecewise constant, so only
    they need the (B, B, B) comparison, which carries no gradient: value and gradient equal those of
    the relu form, at a fraction of its cost.
    """
    batch_size = tf.shape(labels)[1]
    same = tf.equal(labels[:, :, None], labels[:, None, :])
    pair_valid = valid[:, :, None] & valid[:, None, :]
    positive = same & pair_valid & ~tf.eye(batch_size, dtype=tf.bool)[None]
    negative = ~same & pair_valid
    far = tf.cast(1e9, distance.dtype)
    anchor_positive = tf.where(positive, distance + margin, -far)
    anchor_negative = tf.where(negative, distance, far)
    violates = tf.cast(
        tf.stop_gradient(anchor_positive)[:, :, :, None] - tf.stop_gradient(anchor_negative)[:, :, None, :]
        > TINY,
        distance.dtype,
    )
    positive_counts = tf.reduce_sum(violates, axis=3)
    negative_counts = tf.reduce_sum(violates, axis=2)
    violation_sum = tf.reduce_sum(
        tf.where(positive, anchor_positive, 0.0) * positive_counts, axis=[1, 2]
    ) - tf.reduce_sum(tf.where(negative, anchor_negative, 0.0) * negative_counts, axis=[1, 2])
    return violation_sum / (tf.reduce_sum(positive_counts, axis=[1, 2]) + TINY)


def batch_hard_triplet_loss(distance, labels, valid, margin):
    """Batch-hard triplet loss per model: mean over anchors of max(0, d+ - d- + m): the paper's DTL-Hard.

    d+ is the largest distance to another sample of the anchor's class (0 if there is none); d- is
    the smallest distance to a sample of another class, or the row maximum when there is none.
    """
    dtype = distance.dtype
    batch_size = tf.shape(labels)[1]
    same = tf.equal(labels[:, :, None], labels[:, None, :])
    pair_valid = valid[:, :, None] & valid[:, None, :]
    not_self = ~tf.eye(batch_size, dtype=tf.bool)[None]
    positive_mask = tf.cast(same & not_self & pair_valid, dtype)
    hardest_positive = tf.reduce_max(distance * positive_mask, axis=2)
    row_maximum = tf.reduce_max(distance * tf.cast(pair_valid, dtype), axis=2, keepdims=True)
    negative_mask = ~same & pair_valid
    # Non-negatives are pushed above the row maximum so the minimum falls back to it when no
    # negative exists, exactly as the reference batch-hard implementation does.
    candidate = tf.where(negative_mask, distance, distance + row_maximum)
    candidate = tf.where(valid[:, None, :], candidate, tf.cast(float("inf"), dtype))
    hardest_negative = tf.reduce_min(candidate, axis=2)
    per_anchor = tf.nn.relu(hardest_positive - hardest_negative + margin) * tf.cast(valid, dtype)
    anchors = tf.reduce_sum(tf.cast(valid, dtype), axis=1)
    return tf.reduce_sum(per_anchor, axis=1) / tf.maximum(anchors, 1.0)


def matl_loss(distance, class_label, box_cluster, valid, margin, box_weight):
    """MATL = (1 - w) L_BA(class) + w L_BA(box cluster), each normalised by its own violating count.

    The MATL paper (arXiv 2504.08054) weighs the class and box-annotation triplet terms by w.
    """
    return (1.0 - box_weight) * batch_all_triplet_loss(
        distance, class_label, valid, margin
    ) + box_weight * batch_all_triplet_loss(distance, box_cluster, valid, margin)


# ---- the paper's task guidance: the score and the selection of TG-MATL ----


def task_guidance_scores(box_label, class_label, seed):
    """TG-MATL score s_i = sum_j MI_j * X_ij with X = [x_c, y_c, w, h]/300 min-max scaled over the split.

    MI_j is the mutual information between feature j and the class (sklearn's estimator), computed
    on this split only: train and validation scores are computed separately.
    """
    from sklearn.feature_selection import mutual_info_classif

    box, width, height = awir.box_width_height(box_label)
    centre = np.stack([(box[:, 0] + box[:, 1]) / 2, (box[:, 2] + box[:, 3]) / 2], axis=1)
    geometry = awir.min_max_scale(
        np.concatenate([centre, width[:, None], height[:, None]], axis=1) / awir.IMAGE_SIZE
    )
    mutual_information = np.array(
        [mutual_info_classif(geometry[:, [j]], class_label, random_state=seed)[0] for j in range(4)]
    )
    return geometry @ mutual_information


def fold_task_scores(data, seed):
    """The paper's task-guidance scores per fold: train and validation splits scored separately."""
    scores = np.zeros((len(data["folds"]), len(data["class_label"])), np.float32)
    for fold, (train, val) in enumerate(data["folds"]):
        for split in (train, val):
            scores[fold, split] = task_guidance_scores(
                data["box_label"][split], data["class_label"][split], seed
            )
    return scores


def _rank_within_class(key, labels, valid):
    """Rank of each sample among the valid samples of its class by descending `key` (ties: lower index)."""
    batch_size = tf.shape(labels)[1]
    index = tf.range(batch_size)
    earlier = index[None, :, None] > index[None, None, :]  # [i, j]: j comes before i
    same_valid = tf.equal(labels[:, :, None], labels[:, None, :]) & valid[:, None, :]
    ahead = (key[:, None, :] > key[:, :, None]) | ((key[:, None, :] == key[:, :, None]) & earlier)
    return tf.reduce_sum(tf.cast(same_valid & ahead, tf.int32), axis=2)


def task_guided_selection(score, class_label, valid, top_percent, random_percent, random_key=None):
    """The paper's task-guided sample selection per batch and class (docs/tgmatl.md).

    For each class c present among the valid samples (n_c of them) keep the top
    k_top = max(1, floor(n_c * top_percent)) by score, plus k_more = min(floor(n_c * random_percent),
    n_c - k_top) more: the next-ranked ones (`random_key` None, the reference behaviour) or, given a
    `random_key` (M, B) of random draws (any ordered dtype), those of the rest of the class with the
    largest keys.
    `top_percent` and `random_percent` are per model (M,), so one stack can hold a whole sweep grid.
    Returns the keep mask (M, B).
    """
    same_valid = tf.equal(class_label[:, :, None], class_label[:, None, :]) & valid[:, None, :]
    class_count = tf.reduce_sum(tf.cast(same_valid, tf.int32), axis=2)
    # k_top and k_more for every possible class count 0..B, looked up per sample: the float64
    # arithmetic stays on this small table (float64 inside the per-sample graph slows XLA's CPU
    # code for the whole triplet loss several-fold). The 1e-5 keeps e.g. floor(10 * 0.7) at 7
    # despite 0.7 being stored as 0.69999998 in float32.
    possible_count = tf.range(tf.shape(class_label)[1] + 1, dtype=tf.float64)[None, :]
    top_table = tf.maximum(tf.floor(possible_count * tf.cast(top_percent, tf.float64)[:, None] + 1e-5), 1.0)
    more_table = tf.minimum(
        tf.floor(possible_count * tf.cast(random_percent, tf.float64)[:, None] + 1e-5),
        possible_count - top_table,
    )
    k_top = tf.gather(tf.cast(top_table, tf.int32), class_count, batch_dims=1)
    k_more = tf.gather(tf.cast(more_table, tf.int32), class_count, batch_dims=1)
    rank = _rank_within_class(score, class_label, valid)
    if random_key is None:
        keep = rank < k_top + k_more
    else:
        rest = valid & (rank >= k_top)
        random_rank = _rank_within_class(random_key, class_label, rest)
        keep = (rank < k_top) | (rest & (random_rank < k_more))
    return keep & valid


def random_selection_key(model_key, model_step, sample_id):
    """A uniformly random int32 per (model, step, sample), independent of which models share the stack.

    Only the order of the keys matters; int32 rather than a float64 draw keeps XLA's CPU code fast.
    """
    mixed = (
        tf.cast(model_key, tf.int64)[:, None] * 0x2545F491
        + tf.cast(model_step, tf.int64)[:, None] * 0x6C8E9CF5
        + tf.cast(sample_id, tf.int64) * 0x1B873593
    )
    mixed = tf.bitwise.bitwise_and(mixed, tf.constant(0xFFFFFFFF, tf.int64))
    for shift, multiplier in ((16, 0x45D9F3B), (16, 0x45D9F3B), (16, 1)):
        shifted = tf.bitwise.right_shift(mixed, tf.constant(shift, tf.int64))
        mixed = tf.bitwise.bitwise_xor(mixed, shifted) * multiplier
        mixed = tf.bitwise.bitwise_and(mixed, tf.constant(0xFFFFFFFF, tf.int64))
    return tf.cast(mixed - 2**31, tf.int32)


# ---- the four exp1 losses of one head: the readable reference ----


def method_loss(method, outputs, batch, valid, args, top_percent=None, random_percent=None):
    """One of the four exp1 losses on a stack of same-method models: the readable reference.

    DTL and DTL-Hard are the paper's baselines, MATL the predecessor's loss (arXiv 2504.08054), and
    TG-MATL is MATL on the paper's task-guided selection (docs/tgmatl.md).
    """
    distance = pairwise_distance(outputs)
    if method == "dtl":
        return batch_all_triplet_loss(distance, batch["class_label"], valid, args.margin)
    if method == "dtl_hard":
        return batch_hard_triplet_loss(distance, batch["class_label"], valid, args.margin)
    if method == "tg_matl":
        # TG-MATL: MATL restricted to the task-guided selection of each class in the batch.
        random_key = None
        if args.extra_selection == "random":
            random_key = random_selection_key(batch["model_key"], batch["model_step"], batch["sample_id"])
        valid = task_guided_selection(
            batch["task_score"], batch["class_label"], valid, top_percent, random_percent, random_key
        )
    return matl_loss(
        distance, batch["class_label"], batch["box_cluster"], valid, args.margin, args.box_weight
    )


# ---- the fast twin: training many heads at once ----

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
        distance = pairwise_distance(outputs)
        class_label, box_cluster = batch["class_label"], batch["box_cluster"]
        losses = []
        if class_start:
            losses.append(
                batch_hard_triplet_loss(
                    distance[:class_start], class_label[:class_start], valid[:class_start], args.margin
                )
            )
        if task_guided and selection_start < num_models:
            random_key = None
            if args.extra_selection == "random":
                random_key = random_selection_key(
                    batch["model_key"][selection_start:],
                    batch["model_step"][selection_start:],
                    batch["sample_id"][selection_start:],
                )
            selected = task_guided_selection(
                batch["task_score"][selection_start:],
                class_label[selection_start:],
                valid[selection_start:],
                top_percent,
                random_percent,
                random_key,
            )
            valid = tf.concat([valid[:selection_start], selected], axis=0)
        if class_start < num_models:
            batch_all = batch_all_triplet_loss(
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
    seconds = stacked_training.run_side_by_side(
        jobs, run, finished, args.workers, args.deterministic, args.progress
    )
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


def knn_accuracy(train_points, train_labels, test_points, test_labels, neighbours=5):
    """k-NN class accuracy of test projections against the fold's training projections."""
    distance = ((test_points[:, None, :] - train_points[None, :, :]) ** 2).sum(-1)
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :neighbours]
    votes = np.apply_along_axis(np.bincount, 1, train_labels[nearest], minlength=awir.NUM_CLASSES)
    return float((votes.argmax(axis=1) == test_labels).mean())


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
                knn_accuracy(
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


# ---- embedding views: silhouettes and 2-D maps of the test projections ----
#
# TG-MATL's paper repository shows embedding-space views of the test projections. Here each
# (embedding, method) gets its silhouette scores in the projection space itself (64-d, Euclidean),
# once with the class labels and once with the box clusters as the grouping, averaged over the folds,
# and one 2-D map per view method of the fold-1 test projections: a panel per method, colour = class,
# marker = box cluster. The maps only illustrate; the silhouette scores are the numbers to compare.


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (b - a) / max(a, b) over the points, Euclidean; nan with fewer than 2 groups.

    a: mean distance to the other members of the point's group (a point alone in its group scores
    0), b: the smallest mean distance to another group (scikit-learn's silhouette_score).
    """
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return float("nan")
    return float(silhouette_score(np.asarray(points, np.float64), labels, metric="euclidean"))


def project_2d(points: np.ndarray, view: str, seed: int) -> np.ndarray:
    """(N, D) -> (N, 2) by t-SNE (scikit-learn, PCA init) or UMAP (umap-learn, 15 neighbours)."""
    points = np.asarray(points, np.float32)
    if view == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(points) - 1) / 3)
        return TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    if view == "umap":
        import umap

        neighbours = min(15, len(points) - 1)
        return umap.UMAP(n_neighbors=neighbours, random_state=seed, n_jobs=1).fit_transform(points)
    raise ValueError(f"unknown view {view!r}; expected one of {VIEW_METHODS}")


def silhouette_rows(
    projections: Mapping[tuple[str, str], Sequence[np.ndarray]], class_label, box_cluster
) -> list[dict]:
    """Rows (embedding, method, folds, silhouette_class, silhouette_box): fold means of the scores.

    `projections` maps (embedding, method) to the test projections of each fold.
    """
    rows = []
    for (embedding, method), per_fold in projections.items():
        by_class = [silhouette(points, class_label) for points in per_fold]
        by_box = [silhouette(points, box_cluster) for points in per_fold]
        rows.append(
            {
                "embedding": embedding,
                "method": method,
                "folds": len(per_fold),
                "silhouette_class": float(np.mean(by_class)),
                "silhouette_box": float(np.mean(by_box)),
            }
        )
    return rows


def plot_views(projections, class_label, box_cluster, views, seed, directory, class_names) -> list:
    """One PNG per (embedding, view): the fold-1 test projections of each method in 2-D."""
    plt = plots.pyplot()
    paths = []
    embeddings = list(dict.fromkeys(embedding for embedding, _ in projections))
    for embedding in embeddings:
        methods = [method for name, method in projections if name == embedding]
        for view in views:
            figure, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.6), squeeze=False)
            for axis, method in zip(axes[0], methods, strict=True):
                flat = project_2d(projections[(embedding, method)][0], view, seed)
                for cluster in np.unique(box_cluster):
                    member = box_cluster == cluster
                    axis.scatter(
                        flat[member, 0],
                        flat[member, 1],
                        c=class_label[member],
                        cmap="viridis",
                        vmin=0,
                        vmax=len(class_names) - 1,
                        marker=MARKERS[cluster % len(MARKERS)],
                        s=12,
                    )
                axis.set_title(f"{embedding} {method}", fontsize=9)
                axis.set_xticks([])
                axis.set_yticks([])
            figure.suptitle(f"{view}: colour = class ({', '.join(class_names)}), marker = box cluster")
            figure.tight_layout()
            paths.append(directory / f"{embedding}_{view}.png")
            plots.save(figure, paths[-1])
    return paths


def write_projection_views(
    projections, class_label, box_cluster, directory, views=VIEW_METHODS, seed=0, class_names=()
):
    """silhouette.csv / .json under `directory` and the 2-D maps of `views`; returns the rows."""
    rows = silhouette_rows(projections, class_label, box_cluster)
    columns = ["embedding", "method", "folds", "silhouette_class", "silhouette_box"]
    atomic.write_csv(directory / "silhouette.csv", rows, columns)
    atomic.write_json(directory / "silhouette.json", rows)
    names = list(class_names) or [str(c) for c in np.unique(class_label)]
    plot_views(projections, np.asarray(class_label), np.asarray(box_cluster), views, seed, directory, names)
    return rows


# ---- the protocol ----


def read_timings(path, overwrite, key):
    """Rows of an earlier run's timings CSV by `key(row)` (none with --overwrite)."""
    if not path.exists() or overwrite:
        return {}
    with open(path, newline="") as file:
        return {key(row): row for row in csv.DictReader(file)}


def print_data(data, batch_size):
    """The data sizes and derived values, printed at start."""
    train_sizes = sorted({len(train) for train, _ in data["folds"]})
    print(
        f"samples {len(data['class_label'])}, test {len(data['test'])}, folds {len(data['folds'])} "
        f"(train {train_sizes}, val {sorted({len(v) for _, v in data['folds']})}), "
        f"steps per epoch {int(np.ceil(max(train_sizes) / batch_size))}"
    )
    for name, embedding in data["embeddings"].items():
        paper_width = awir.PAPER_EMBEDDING_WIDTHS[name]
        note = "" if embedding.shape[1] == paper_width else f" (the paper's {name} width is {paper_width})"
        print(f"embedding {name}: {embedding.shape}{note}")


def check_training_settings(results_dir, config_name, args, resume_settings):
    """Refuse to mix heads trained with other `resume_settings` into this results tree; record these ones."""
    config_path = Path(results_dir) / "trained_models" / "exp1_emb_proj" / config_name
    current = runs.check_same_settings(
        config_path,
        runs.settings_of(args, resume_settings),
        args.overwrite,
        "existing heads",
        hint=awir.RESUME_HINT,
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


def record_stack(job, result, data, timings, timings_path, summary, zero_validation_loss, costs, args):
    """Export a finished stack, add its timings and test accuracies, note zero validation losses, and
    write its heads' loss curves for TensorBoard (a run per embedding, a tag per method, loss and fold)."""
    accuracies, _ = export_and_evaluate(job, result, data)
    name, heads = job["embedding"], result["heads"]
    stacked_training.write_loss_histories(
        result,
        Path(args.results_dir) / "trained_models" / "exp1_emb_proj" / "tensorboard" / name,
        lambda head, loss: f"{head['tag']}/{loss}/fold{head['fold']}",
        enabled=not args.no_tensorboard,
    )
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
    rows = write_projection_views(
        projections,
        data["class_label"][test],
        data["box_cluster"][test],
        results_dir / "exp1_test_projections" / "views",
        args.views,
        args.seed,
    )
    for row in rows:
        print(
            f"  silhouette {row['embedding']} {row['method']}: class {row['silhouette_class']:.3f}, "
            f"box cluster {row['silhouette_box']:.3f} (mean over {row['folds']} folds)"
        )
    return rows


def zero_loss_note(model_selection) -> str:
    """What a validation loss of 0 means for the kept weights under `--model_selection`."""
    if model_selection == "last":
        # The last epoch's weights are kept whatever the loss; the note only says it is 0 there.
        return "validation loss 0 at the last epoch, whose weights --model_selection last keeps"
    # Selection on the validation loss: when it is exactly 0 (e.g. TG-MATL keeps one sample per class
    # of a 9-sample split, so no triplet exists), the first epoch that reaches 0 is kept.
    return "validation loss 0, selection kept the first such epoch"


def check_arguments(args) -> None:
    """Every flag in range and --results_dir writable, before anything is read or written."""
    awir.check_protocol_arguments(args)
    require_in_range(args, "margin", 0)
    for flag in ("box_weight", "top_percent", "random_percent"):
        require_in_range(args, flag, 0, 1)


def write_report(summary, zero_validation_loss, args, results_dir):
    """knn_summary.json and the summary lines: per method, mean test 5-NN accuracy and best val loss."""
    for head_group, folds in sorted(zero_validation_loss.items()):
        print(
            f"  note: {head_group}: {zero_loss_note(args.model_selection)}, folds {', '.join(sorted(folds))}"
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
    check_arguments(args)
    if args.demo:
        args.data, args.embeddings_dir = awir.demo_inputs(args, "igarss_exp1")
    runs.print_args(args)
    results_dir = Path(args.results_dir)

    # ---- data ----
    data = awir.load_awir(
        args.data, args.embeddings_dir, args.embeddings, results_dir, args.test_size, args.batch_size
    )
    runs.seed_everything(args.seed, args.deterministic)  # after reading: bad inputs stop sooner
    print_data(data, args.batch_size)
    task_scores = fold_task_scores(data, args.seed)
    check_training_settings(results_dir, "exp1_config.json", args, RESUME_SETTINGS)

    # ---- train ----
    timings_path = results_dir / "exp1_timings" / f"timings_test{args.test_size}.csv"
    timings = read_timings(
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
        args=args,
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
