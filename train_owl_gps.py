"""OWL-GPS: concept-weighted active learning with a Reptile meta-update, in Keras 3.

Paper: "Adapting Actively on the Fly: Relevance-Guided Online Meta-Learning with Latent Concepts for
Geospatial Discovery" (arXiv 2602.17605), as restated by the "OWL-GPS active learning" tutorial: a
small CNN classifies 4-band (R, G, B, NIR) patches as target / background; each round it trains on
the labelled set, reports test ROC-AUC, queries the patches with the highest
alpha * entropy + (1 - alpha) * concept relevance, and takes one Reptile step on the new labels.

What it reproduces: the tutorial's round table (labelled count, test AUC, train loss, Reptile query
loss) and the comparisons its "where to go next" list asks for: concept weighting vs pure
uncertainty vs pure relevance vs random (mean +- std over seeds), MC-dropout and deep-ensemble
uncertainty, a linear alpha schedule, and a human-in-the-loop CSV oracle.

The steps, in the order this file defines them: the seeded 80/20 pool/test split and the random
initial labels; concept relevance (the product of the weights of a patch's active concepts), the
uncertainty (softmax entropy, MC-dropout or ensemble disagreement), both min-max normalised over the
unlabelled pool and mixed by alpha into the acquisition score, of which the top query_budget are
labelled; the SimpleCNN trained with Adam on every label so far; the Reptile step on the newly
labelled batch; then one (strategy, seed) run of the loop with its label store, CSV oracle queue and
checkpoints, and the round tables, AUC curves and metrics of all runs.

Commands:
    python train_owl_gps.py --demo                                  # tutorial loop, ~10 s CPU
    python train_owl_gps.py --demo --query_strategy all --seeds 5   # four strategies, shaded bands
    python train_owl_gps.py --demo --uncertainty mc_dropout --alpha_schedule linear
    python train_owl_gps.py --data_dir DIR                          # DIR/images.npy (N,4,H,W),
                                                                    # labels.npy, concepts.csv or .pkl
    python train_owl_gps.py --geotiff scene.tif --concepts_csv c.csv --labels_csv l.csv
    python train_owl_gps.py --data_dir DIR --oracle csv             # writes queue_round{t}.csv, stops
                                                                    # (labels.npy optional: unlabelled pool)
    python train_owl_gps.py --data_dir DIR --oracle csv --resume    # reads your labels, continues
    python train_owl_gps.py --demo --resume --n_rounds 15           # extend a finished run

Runtime: `--demo` takes about 15 seconds of CPU time (500 patches of 32x32, 10 rounds; 34 s of wall
time on a heavily shared 2-core machine). It prints one row per round and ends with
    final: test_auc concept=0.8056 n_labeled=110 rounds=10 uncertainty=entropy
(the numbers are in metrics.json; the AUC depends on the CPU: float reductions differ between
instruction sets and thread counts). With `--signal 0` the pixels are pure noise, as in the
tutorial, and the test AUC stays near 0.5 by design (0.4518 after 10 rounds).
`--query_strategy all --seeds 5` (20 runs) takes about 150 seconds of CPU time. docs/owl_gps.md has
the data layouts, the outputs and the differences from the tutorial's code.

Outputs in results/train_owl_gps/<run_name>/: config.json, rounds.csv, labels.csv (the label store),
checkpoints/ (the last 3 rounds), auc_curve.png, metrics.json, model.keras (model_member{k}.keras for
the other ensemble members), and queue_round{t}.csv / .png with --oracle csv. With several strategies
or seeds each run has its own <strategy>_seed<k>/ folder, and the top level holds rounds.csv of all
runs, strategy_comparison.csv, auc_curve.png and metrics.json.
"""

import csv
import math
import shlex
import sys
import time
from pathlib import Path

from common import cli, progress, tensorboard

SCRIPT_STEM = "train_owl_gps"
STRATEGIES = ("concept", "uncertainty", "relevance", "random")


def get_args_parser():
    """The flags; every default is the tutorial's value."""
    parser = cli.Parser(SCRIPT_STEM, description="Concept-weighted active learning with Reptile (OWL-GPS).")
    cli.add_demo_argument(parser, "in the --data_dir format (images.npy, labels.npy, concepts.csv).")
    add_data_arguments(parser.add_argument_group("data"))
    add_active_learning_arguments(parser.add_argument_group("active learning"))
    add_training_arguments(parser.add_argument_group("training and Reptile"))
    cli.add_run_arguments(parser)
    tensorboard.add_argument(parser)
    progress.add_argument(parser)
    return parser


def add_data_arguments(group):
    """Where the patches, concepts and labels come from, and the synthetic set's sizes."""
    group.add_argument(
        "--data_dir",
        default="",
        help="Folder: images.npy (N,4,H,W), labels.npy (N,) 0/1 if known, concepts.csv or .pkl.",
    )
    group.add_argument(
        "--geotiff", default="", help="A 4-band (R,G,B,NIR) GeoTIFF tiled into non-overlapping patches."
    )
    group.add_argument(
        "--concepts_csv", default="", help="With --geotiff: concepts per patch keyed by patch grid row, col."
    )
    group.add_argument(
        "--land_cover_geotiff",
        default="",
        help="Instead of --concepts_csv: land cover (1 = urban), patch majority.",
    )
    group.add_argument(
        "--distance_geotiff",
        default="",
        help="With --land_cover_geotiff: distance to industry in [0,1], patch mean.",
    )
    group.add_argument(
        "--labels_csv",
        default="",
        help="With --geotiff: known labels (row, col, label); without: --oracle csv.",
    )
    group.add_argument("--patch_size", type=int, default=32, help="GeoTIFF patch size in pixels.")
    group.add_argument(
        "--reflectance_scale",
        type=float,
        default=1.0,
        help="GeoTIFF values are divided by this (10000 for Sentinel-2 L2A).",
    )
    group.add_argument(
        "--near_industrial_threshold",
        type=float,
        default=0.3,
        help="near_industrial = dist_industrial < threshold.",
    )
    group.add_argument("--test_fraction", type=float, default=0.2, help="Seeded 80/20 pool/test split.")
    group.add_argument("--data_seed", type=int, default=42, help="Seed of the synthetic generator.")
    group.add_argument("--n_samples", type=int, default=500, help="Synthetic patches.")
    group.add_argument("--image_size", type=int, default=32, help="Synthetic patch size.")
    group.add_argument(
        "--signal",
        type=float,
        default=0.1,
        help="Strength of the planted NIR/red blob; 0 is the tutorial's pure noise.",
    )


def add_active_learning_arguments(group):
    """The loop: budgets, the acquisition score, the uncertainty estimator and the oracle."""
    group.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="Repeat every strategy with seeds seed..seed+seeds-1 (mean +- sample std bands).",
    )
    group.add_argument("--n_rounds", type=int, default=10, help="Active-learning rounds.")
    group.add_argument("--initial_budget", type=int, default=20, help="Random initial labels.")
    group.add_argument("--query_budget", type=int, default=10, help="Labels queried per round.")
    group.add_argument(
        "--alpha", type=float, default=0.5, help="Weight of uncertainty against concept relevance."
    )
    group.add_argument(
        "--concept_weights",
        default="urban=2,near_industrial=3",
        help="Relevance = product of active weights.",
    )
    group.add_argument("--mc_passes", type=int, default=20, help="MC-dropout forward passes T.")
    group.add_argument(
        "--ensemble_size",
        type=int,
        default=5,
        help="Deep-ensemble members K; disagreement = mutual information.",
    )
    group.add_argument(
        "--score_batch_size",
        type=int,
        default=1024,
        help="Pool patches scored per batch (memory bounded by one batch).",
    )
    group.add_argument(
        "--query_strategy",
        default="concept",
        choices=(*STRATEGIES, "all"),
        help="concept: alpha*u + (1-alpha)*r; uncertainty: alpha=1; relevance: alpha=0; random; "
        "all: every strategy on the same splits and initial labels.",
    )
    group.add_argument(
        "--alpha_schedule",
        default="constant",
        choices=("constant", "linear"),
        help="linear: alpha_t = min(1, t / n_rounds + 0.3).",
    )
    group.add_argument(
        "--uncertainty",
        default="entropy",
        choices=("entropy", "mc_dropout", "ensemble"),
        help="Softmax entropy, MC-dropout or ensemble.",
    )
    group.add_argument(
        "--mc_score",
        default="entropy",
        choices=("entropy", "bald"),
        help="MC-dropout score: predictive entropy or BALD.",
    )
    group.add_argument(
        "--oracle",
        default="simulated",
        choices=("simulated", "csv"),
        help="csv: writes queue_round{t}.csv, stops, reads it on --resume.",
    )
    group.add_argument(
        "--ensemble_eval",
        action="store_true",
        help="Evaluate the averaged ensemble (else member 0, as for other estimators).",
    )


def add_training_arguments(group):
    """Training on the labelled set each round, and the Reptile step on each new batch of labels."""
    group.add_argument("--epochs", type=int, default=5, help="Epochs over the labelled set per round.")
    group.add_argument("--batch_size", type=int, default=16, help="Training batch size.")
    group.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate.")
    group.add_argument("--inner_lr", type=float, default=0.01, help="Reptile inner SGD learning rate.")
    group.add_argument(
        "--meta_lr",
        type=float,
        default=0.1,
        help="Reptile: theta <- theta + meta_lr * (theta_adapted - theta); 0 disables.",
    )
    group.add_argument(
        "--inner_steps",
        type=int,
        default=5,
        help="At most this many inner batches over the support half.",
    )
    group.add_argument("--inner_batch_size", type=int, default=8, help="Reptile inner batch size.")
    group.add_argument(
        "--reptile_support",
        default="lower",
        choices=("lower", "upper"),
        help="Support = lower-scored half of the query (tutorial) or upper.",
    )
    group.add_argument(
        "--keep_optimizer_state",
        action="store_true",
        help="Keep Adam's moments across the Reptile step (the tutorial's stale momentum); else reset.",
    )


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly; must come before it)

import numpy as np

from common import atomic, checkpoints, plots, reports, runs
from common.errors import InputError, cli_entry, require, require_file, require_in_range
from common.owl_gps import datasets, patches

# The discovery rate, what the method is for: positives among the patches labelled before a round's
# training (new_*: the previous round's query; round 1: the random initial labels), the same over every
# strategy query so far (queried_*: the initial labels left out), and the positive share of the
# unlabelled pool before any label, the rate a random query expects.
DISCOVERY_FIELDS = (
    "new_labels",
    "new_positives",
    "discovery_rate",
    "queried",
    "queried_positives",
    "cumulative_discovery_rate",
    "pool_positive_rate",
)
ROUND_FIELDS = (
    "round",
    "n_labeled",
    "alpha",
    "test_auc",
    "train_loss",
    "meta_query_loss",
    "seconds",
    *DISCOVERY_FIELDS,
)
LABEL_FIELDS = ("id", "row", "col", "label", "round", "score", "strategy")
QUEUE_FIELDS = ("id", "row", "col", "score", "label")
# Arguments that define a run; a --resume with any of them changed would silently mix two experiments.
RESUME_SETTINGS = (
    "query_strategy",
    "seeds",
    "alpha",
    "alpha_schedule",
    "uncertainty",
    "mc_passes",
    "mc_score",
    "ensemble_size",
    "initial_budget",
    "query_budget",
    "epochs",
    "batch_size",
    "learning_rate",
    "inner_lr",
    "meta_lr",
    "inner_steps",
    "inner_batch_size",
    "concept_weights",
    "keep_optimizer_state",
    "test_fraction",
    "oracle",
    "seed",
    "data_dir",
    "geotiff",
    "patch_size",
    "signal",
    "data_seed",
    "n_samples",
    "image_size",
    "ensemble_eval",
    "reptile_support",
)
# The input files and folders among RESUME_SETTINGS (recorded relative to the run folder).
INPUT_PATHS = ("data_dir", "geotiff")
KEEP_CHECKPOINTS = 3
# One printed row of the round table: strategy, seed, then the round's figures.
ROUND_LINE = (
    "{:>11} seed {} | round {round:>2} | labelled {n_labeled:>4} | alpha {alpha:.2f}"
    " | test AUC {test_auc:.4f} | train loss {train_loss:.4f}"
    " | meta query loss {meta_query_loss:.4f} | {seconds:.1f}s"
)


# ---- the tutorial's pieces ----


def discovery_counts(label_rows, round_number) -> dict:
    """The DISCOVERY_FIELDS (but the pool rate) of round `round_number` from the label store's rows
    (dicts with `round`, the query round that labelled a patch, and `label`)."""
    new = [row["label"] for row in label_rows if row["round"] == round_number - 1]
    queried = [row["label"] for row in label_rows if 1 <= row["round"] <= round_number - 1]
    return {
        "new_labels": len(new),
        "new_positives": int(sum(new)),
        "discovery_rate": float(np.mean(new)) if new else float("nan"),
        "queried": len(queried),
        "queried_positives": int(sum(queried)),
        "cumulative_discovery_rate": float(np.mean(queried)) if queried else float("nan"),
    }


def split_pool_test(n_samples, test_fraction, initial_budget, seed):
    """Seeded permutation: the first test_fraction is the test set; initial labels drawn from the pool."""
    rng = np.random.default_rng([seed, 0])
    permutation = rng.permutation(n_samples)
    n_test = round(test_fraction * n_samples)
    test_ids, pool_ids = np.sort(permutation[:n_test]), np.sort(permutation[n_test:])
    initial_ids = rng.choice(pool_ids, min(initial_budget, len(pool_ids)), replace=False)
    return test_ids, pool_ids, initial_ids


def parse_concept_weights(text):
    """'urban=2,near_industrial=3' -> {'urban': 2.0, 'near_industrial': 3.0}."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            expected = "name=number pairs, e.g. urban=2,near_industrial=3"
            raise InputError("--concept_weights", f"cannot read {item!r}", expected) from None
    require(weights, "--concept_weights", "is empty", "at least one name=number pair")
    return weights


def concept_relevance(active, weights):
    """Tutorial relevance: r_i = product of the weights of the concepts active in patch i (1 if none)."""
    return np.prod(np.where(active, np.asarray(weights, dtype=np.float64)[None, :], 1.0), axis=1)


def min_max(values):
    """Min-max normalise over the candidate pool; a constant vector maps to zeros."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min() if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def acquisition_score(uncertainty, relevance, alpha):
    """Tutorial acquisition: score = alpha * minmax(u) + (1 - alpha) * minmax(r) over the unlabelled pool."""
    return alpha * min_max(uncertainty) + (1.0 - alpha) * min_max(relevance)


def select_top_k(candidate_ids, scores, k, rng):
    """The k highest-scoring candidates (ties broken at random, seeded); never more than exist."""
    tie_break = rng.random(len(candidate_ids))
    order = np.lexsort((tie_break, -np.asarray(scores)))
    return np.asarray(candidate_ids)[order[: min(k, len(candidate_ids))]]


def alpha_for_round(alpha, schedule, round_index, n_rounds):
    """constant: alpha; linear ("where to go next"): alpha_t = min(1, t / n_rounds + 0.3), t 0-based."""
    return alpha if schedule == "constant" else min(1.0, round_index / n_rounds + 0.3)


def entropy(probabilities):
    """Tutorial uncertainty: entropy of the softmax, over the last axis."""
    probabilities = np.clip(probabilities, 1e-12, 1.0)
    return -(probabilities * np.log(probabilities)).sum(axis=-1)


def support_first(ids, labels, support):
    """Order a query (highest score first) so that its first len // 2 patches are the Reptile support set.

    The tutorial sorts the scores ascending, keeps the last query_budget (its top-k) and adapts on the
    first half of them: the lower-scored half (`lower`); `upper` adapts on the higher-scored half.
    """
    order = slice(None, None, -1) if support == "lower" else slice(None)
    return np.asarray(ids)[order], np.asarray(labels)[order]


def reptile_update(theta, theta_adapted, meta_lr):
    """Reptile: theta <- theta + meta_lr * (theta_adapted - theta), per weight array."""
    return [w + meta_lr * (w_adapted - w) for w, w_adapted in zip(theta, theta_adapted, strict=True)]


def build_simple_cnn(image_size, name="simple_cnn"):
    """Tutorial SimpleCNN: Conv32-ReLU-Pool, Conv64-ReLU-Pool, Dense128-ReLU, Dropout 0.5, Dense 2 (logits).

    Layers are named so that every member's checkpoint keys are the same (`member0/conv1/kernel`).
    """
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 4), name="patch")
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="hidden")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    return keras.Model(inputs, layers.Dense(2, name="logits")(x), name=name)


# ---- the learner: training, evaluation, pool uncertainty and the Reptile step ----


class Learner:
    """One SimpleCNN (or K for an ensemble) with Adam, compiled train/predict steps and Reptile.

    The models and their compiled functions are built once and re-initialised per seed, so comparing
    strategies over many seeds does not pay the tracing cost again. Every random draw inside (weight
    initialisation, dropout masks) is keyed, so a resumed round repeats an uninterrupted one exactly.
    """

    def __init__(self, args, image_size):
        import keras
        import tensorflow as tf

        self.tf, self.keras, self.args = tf, keras, args
        # Fixed signatures (any batch size) so each compiled step is traced once, not once per shape.
        self.patch_spec = tf.TensorSpec([None, image_size, image_size, 4], tf.float32)
        self.label_spec = tf.TensorSpec([None], tf.int32)
        size = args.ensemble_size if args.uncertainty == "ensemble" else 1
        self.members = [build_simple_cnn(image_size, f"simple_cnn_{k}") for k in range(size)]
        self.optimizers = [keras.optimizers.Adam(args.learning_rate) for _ in self.members]
        pairs = list(zip(self.members, self.optimizers, strict=True))
        for model, optimizer in pairs:
            optimizer.build(model.trainable_variables)
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.train_steps = [self._make_train_step(model, optimizer) for model, optimizer in pairs]
        self.adapted = build_simple_cnn(image_size, "adapted_copy")
        self.inner_step = self._make_train_step(self.adapted, keras.optimizers.SGD(args.inner_lr))
        self.probabilities = [self._make_predict(m) for m in self.members]
        self.adapted_probabilities = self._make_predict(self.adapted)
        self.mc = self._make_mc_moments(self.members[0]) if args.uncertainty == "mc_dropout" else None

    def _make_mc_moments(self, model):
        """T stochastic passes for MC-dropout, sharing one deterministic pass through the trunk.

        Dropout is the only stochastic layer and sits after Dense(128), so running the convolutional
        trunk once and only the Dropout -> Dense(2) head T times gives exactly the distribution of T
        full passes at about 1/T of the cost (test_mc_dropout_moments_equal_full_passes). Moments are
        accumulated in place: only batch-sized tensors are ever held, never pool x T probabilities.
        """
        tf, passes = self.tf, self.args.mc_passes
        dropout, logits = model.layers[-2], model.layers[-1]
        trunk = self.keras.Model(model.inputs, dropout.input)

        @tf.function(input_signature=[self.patch_spec])
        def moments(x):
            features = trunk(x, training=False)
            mean = tf.zeros((tf.shape(x)[0], 2))
            mean_entropy = tf.zeros((tf.shape(x)[0],))
            for _ in range(passes):
                p = tf.nn.softmax(logits(dropout(features, training=True)))
                mean += p / passes
                mean_entropy += -tf.reduce_sum(p * tf.math.log(tf.maximum(p, 1e-12)), -1) / passes
            return mean, mean_entropy

        return moments

    def _make_train_step(self, model, optimizer):
        """One compiled step of `optimizer` on the mean cross-entropy of a batch; returns the loss."""
        tf = self.tf

        @tf.function(input_signature=[self.patch_spec, self.label_spec])
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = self.loss(y, model(x, training=True))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            return loss

        return train_step

    def _make_predict(self, model):
        """The compiled softmax of `model` in inference mode (dropout off)."""
        tf = self.tf
        return tf.function(
            lambda x: tf.nn.softmax(model(x, training=False)), input_signature=[self.patch_spec]
        )

    def train_round(self, images, labels, rng):
        """Tutorial training: args.epochs epochs of Adam over the labelled set, fresh shuffle each epoch.

        Returns the tutorial's train loss: the mean of the last epoch's batch means (a short last batch
        counts as much as a full one), averaged over ensemble members.
        """
        losses = []
        for train_step in self.train_steps:
            for _ in range(self.args.epochs):
                order, batch_losses = rng.permutation(len(labels)), []
                for start in range(0, len(labels), self.args.batch_size):
                    batch = order[start : start + self.args.batch_size]
                    batch_losses.append(float(train_step(images[batch], labels[batch].astype(np.int32))))
            losses.append(np.mean(batch_losses))
        return float(np.mean(losses))

    def predict_positive(self, source, ids):
        """P(class 1) of the evaluated classifier, batch by batch.

        That is member 0, trained exactly as the single model of the other estimators, so that the
        uncertainty estimators differ only in what they query; --ensemble_eval averages all members.
        """
        evaluated = self.probabilities if self.args.ensemble_eval else self.probabilities[:1]
        out = np.empty(len(ids), np.float64)
        for start, batch_ids, x in patches.batches(source, ids, self.args.score_batch_size):
            out[start : start + len(batch_ids)] = np.mean([p(x).numpy()[:, 1] for p in evaluated], 0)
        return out

    def pool_uncertainty(self, source, ids):
        """Entropy (tutorial), MC-dropout predictive entropy / BALD, or ensemble mutual information."""
        out = np.empty(len(ids), np.float64)
        for start, batch_ids, x in patches.batches(source, ids, self.args.score_batch_size):
            if self.args.uncertainty == "mc_dropout":
                mean, mean_entropy = (t.numpy() for t in self.mc(x))
                score = entropy(mean) - (mean_entropy if self.args.mc_score == "bald" else 0.0)
            else:
                member_probabilities = np.stack([p(x).numpy() for p in self.probabilities])
                score = entropy(member_probabilities.mean(0))
                if self.args.uncertainty == "ensemble":
                    score = score - entropy(member_probabilities).mean(0)
            out[start : start + len(batch_ids)] = score
        return out

    def reptile(self, images, labels, rng):
        """Tutorial Reptile step: adapt a copy on the support half with SGD, move each member towards it.

        Returns the adapted copy's cross-entropy on the query half (mean over members). Adam's moments
        are reset afterwards unless --keep_optimizer_state (the tutorial leaves them stale).
        """
        n_support = len(labels) // 2
        query_losses = []
        for model in self.members:
            self.adapted.set_weights(model.get_weights())
            order = rng.permutation(n_support)
            starts = range(0, n_support, self.args.inner_batch_size)
            for start in list(starts)[: self.args.inner_steps]:
                batch = order[start : start + self.args.inner_batch_size]
                self.inner_step(images[batch], labels[batch].astype(np.int32))
            query_probability = self.adapted_probabilities(images[n_support:]).numpy()
            picked = query_probability[np.arange(len(labels) - n_support), labels[n_support:]]
            query_losses.append(float(-np.log(np.clip(picked, 1e-12, 1)).mean()))
            model.set_weights(
                reptile_update(model.get_weights(), self.adapted.get_weights(), self.args.meta_lr)
            )
        if not self.args.keep_optimizer_state:
            self.reset_optimizers()
        return float(np.mean(query_losses))

    # -- seeded state: every draw is keyed, so a resumed round repeats an uninterrupted one --
    def reseed_dropout(self, *key):
        """Set every dropout stream from (seed, round, phase, member): resumed rounds draw identically."""
        for index, model in enumerate([*self.members, self.adapted]):
            state = int(np.random.SeedSequence([*key, index]).generate_state(1)[0])
            for layer in model.layers:
                if hasattr(layer, "seed_generator"):
                    layer.seed_generator.state.assign(np.array([state, 0], dtype=np.int64))

    def initialise(self, seed):
        """Fresh weights from each layer's own initialisers, seeded by (seed, member, layer), and zeroed Adam.

        Member k is seeded by (seed, k), so member 0 of an ensemble is initialised exactly as the single
        model of the other uncertainty estimators.
        """
        for index, model in enumerate(self.members):
            for position, layer in enumerate(model.layers):
                if not hasattr(layer, "kernel_initializer"):
                    continue
                layer_seed = int(np.random.SeedSequence([seed, 1, index, position]).generate_state(1)[0] >> 1)
                config = {**layer.kernel_initializer.get_config(), "seed": layer_seed}
                kernel_initializer = type(layer.kernel_initializer).from_config(config)
                layer.kernel.assign(kernel_initializer(layer.kernel.shape))
                layer.bias.assign(layer.bias_initializer(layer.bias.shape))
        self.reset_optimizers()

    def reset_optimizers(self):
        """Zero every Adam variable except the learning rate: the moments and the iteration count."""
        for optimizer in self.optimizers:
            for variable in optimizer.variables:
                if not variable.path.endswith("learning_rate"):
                    variable.assign(np.zeros(variable.shape, variable.dtype))

    def _member_groups(self):
        # Weights as `member{k}/...`, Adam slots as `member{k}_optimizer/...` without the optimizer's name.
        for k, (model, optimizer) in enumerate(zip(self.members, self.optimizers, strict=True)):
            yield f"member{k}", model.weights, ()
            yield f"member{k}_optimizer", optimizer.variables, (f"{optimizer.name}/",)

    def checkpoint_arrays(self):
        """Every member's weights and Adam slots, keyed `member{k}/...` and `member{k}_optimizer/...`."""
        arrays = {}
        for group in self._member_groups():
            arrays.update(checkpoints.variable_arrays(*group))
        return arrays

    def restore(self, arrays, source):
        """Inverse of `checkpoint_arrays`; a checkpoint of other settings is an InputError naming `source`."""
        for group, variables, strip in self._member_groups():
            checkpoints.assign_arrays(arrays, group, variables, source, strip)


# ---- the label store and the CSV oracle's queue ----
# The queue is the CSV oracle's file protocol: a round writes queue_round{t}.csv with a blank label
# column (and a contact sheet of the patches), a person fills it, and the run started again with
# --resume reads it back, validates it and continues.


class LabelStore:
    """A run's labels.csv: every label so far with its grid cell, round, score and strategy.

    It is the record a person reads and the run's memory of what is labelled; each change rewrites it.
    """

    def __init__(self, path, rows=()):
        self.path, self.rows = Path(path), list(rows)

    @classmethod
    def read(cls, path, before_round: int) -> "LabelStore":
        """The labels of rounds before `before_round`; a hand-edited, unreadable row is an InputError."""
        path = require_file(path, "the run's label store")
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        try:
            integers = ("id", "label", "round")
            rows = [
                {key: int(row[key]) if key in integers else row[key] for key in LABEL_FIELDS} for row in rows
            ]
        except (KeyError, TypeError, ValueError) as error:
            columns = ", ".join(LABEL_FIELDS)
            expected = f"columns {columns} with integer id, label and round, as this script writes them"
            raise InputError(path, f"cannot be read ({error})", expected) from None
        return cls(path, [row for row in rows if row["round"] < before_round])

    def ids(self) -> np.ndarray:
        """The labelled ids, in the order they were labelled."""
        return np.array([row["id"] for row in self.rows], dtype=np.int64)

    def labels(self) -> np.ndarray:
        """Their labels, 0/1."""
        return np.array([row["label"] for row in self.rows], dtype=np.int64)

    def add(self, ids, labels, round_number: int, scores, strategy: str, locations) -> None:
        """Append newly labelled patches (scores kept exactly, as repr) and rewrite the file."""
        new = []
        for sample, label, score in zip(ids, labels, scores, strict=True):
            row, col = _grid_cells(locations, sample)
            score_text = "" if score is None else repr(float(score))
            cells = (int(sample), row, col, int(label), round_number, score_text, strategy)
            new.append(dict(zip(LABEL_FIELDS, cells, strict=True)))
        self.rows = [*self.rows, *new]
        self.write()

    def write(self) -> None:
        """Rewrite labels.csv (through a temporary file, so a crash never leaves half a store)."""
        atomic.write_csv(self.path, self.rows, list(LABEL_FIELDS))


class AwaitingLabels(Exception):
    """The CSV oracle wrote a queue for a person to label; the same command with --resume continues."""

    def __init__(self, queue_path, count: int):
        super().__init__(str(queue_path))
        self.queue_path, self.count = Path(queue_path), count

    def instruction(self, argv) -> str:
        """What the person does next: the file to fill, then the command `argv` with --resume."""
        rest = [argument for argument in argv[1:] if argument != "--resume"]
        command = shlex.join(["python", Path(argv[0]).name, *rest, "--resume"])
        what = f"0/1 in the label column; contact sheet {self.queue_path.with_suffix('.png').name}"
        return f"oracle: label the {self.count} patches in {self.queue_path} ({what}), then run: {command}"


def _grid_cells(locations, sample) -> tuple:
    # A GeoTIFF tile's patch grid cell (row, col); blank cells for the --data_dir layout.
    return ("", "") if locations is None else (int(locations[sample][0]), int(locations[sample][1]))


def write_queue(path, ids, scores, data: dict) -> Path:
    """The queue CSV with a blank label column, plus a contact sheet (same name, .png) of the patches."""
    path = Path(path)
    rows = []
    for sample, score in zip(ids, scores, strict=True):
        row, col = _grid_cells(data["locations"], sample)
        score_text = "" if score is None else f"{score:.6f}"
        rows.append({"id": int(sample), "row": row, "col": col, "score": score_text, "label": ""})
    atomic.write_csv(path, rows, list(QUEUE_FIELDS))
    save_contact_sheet(data["source"].read(ids), ids, scores, path.with_suffix(".png"))
    return path


def read_queue(path, expected_ids) -> np.ndarray:
    """Validated labels from a filled-in queue: every queued id once, each label 0 or 1."""
    path = require_file(path, "the queue CSV written by the previous round, with the label column filled")
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        require(
            reader.fieldnames and {"id", "label"} <= set(reader.fieldnames),
            path,
            f"has columns {reader.fieldnames}",
            "columns id and label",
        )
        rows = list(reader)
    answers = {}
    for line, row in enumerate(rows, start=2):
        sample = (row["id"] or "").strip()
        require(
            sample.isdigit(),
            path,
            f"line {line}: id {row['id']!r} is not an integer",
            "the queued ids unchanged",
        )
        value = (row["label"] or "").strip()
        expected = "every queued patch labelled 0 or 1"
        require(value != "", path, f"line {line}: blank label for id {sample}", expected)
        require(
            value in ("0", "1", "0.0", "1.0"),
            path,
            f"line {line}: label {value!r} for id {sample} is not 0/1",
            expected,
        )
        answers[int(sample)] = int(float(value))
    missing = [i for i in expected_ids if i not in answers]
    if missing:
        raise InputError(path, f"queued id {missing[0]} is missing", "all queued ids")
    extra = sorted(set(answers) - set(expected_ids))
    if extra:
        raise InputError(path, f"id {extra[0]} was not queued", "only the queued ids")
    return np.array([answers[i] for i in expected_ids], dtype=np.int64)


def save_contact_sheet(queued_patches: np.ndarray, ids, scores, path, columns: int = 5) -> None:
    """Each queued patch twice: true colour (R,G,B) and false colour (NIR,R,G), 2-98 % stretched."""
    plt = plots.pyplot()
    rows = math.ceil(len(ids) / columns)
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.3, rows * 1.6), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for index, (patch, sample, score) in enumerate(zip(queued_patches, ids, scores, strict=True)):
        for offset, (bands, title) in enumerate((((0, 1, 2), "RGB"), ((3, 0, 1), "NIR-R-G"))):
            image = patch[..., list(bands)]
            low, high = np.percentile(image, (2, 98))
            axis = axes[index // columns, 2 * (index % columns) + offset]
            axis.imshow(np.clip((image - low) / max(high - low, 1e-6), 0, 1))
            subtitle = f"\ns={score:.2f}" if score is not None else ""
            axis.set_title(f"id {sample} {title}{subtitle}", fontsize=7)
    plots.save(figure, path)


# ---- one active-learning run (one strategy, one seed) ----


class ActiveLearningRun:
    """The tutorial loop for one (strategy, seed): query -> oracle -> Reptile -> train -> evaluate.

    A checkpoint is written after every round's training and evaluation (members, Adam slots, the
    round table); the label store labels.csv is written whenever labels arrive. Every random draw is
    keyed by (seed, round, phase), so a resumed run repeats the interrupted round exactly; the phases
    are 0 the training's dropout, 1 its shuffles, 2 the query (MC-dropout masks, ties, random picks)
    and 3 the Reptile step.
    """

    def __init__(self, args, data, learner, arm_dir, strategy, seed):
        self.args = args
        self.data = data
        self.learner = learner
        self.strategy = strategy
        self.seed = seed
        self.source = data["source"]
        self.arm_dir = Path(arm_dir)
        self.checkpoint_dir = self.arm_dir / "checkpoints"
        # Without known labels there is no test set: every patch is in the pool a person labels.
        test_fraction = 0.0 if data["labels"] is None else args.test_fraction
        self.test_ids, self.pool_ids, self.initial_ids = split_pool_test(
            self.source.count, test_fraction, args.initial_budget, seed
        )
        weights = list(parse_concept_weights(args.concept_weights).values())
        self.relevance = concept_relevance(data["active"], weights)
        # What the checkpoints must match on --resume.
        self.identity = {"strategy": strategy, "seed": seed, "n_samples": self.source.count}
        self.store = LabelStore(self.arm_dir / "labels.csv")
        self.rows = []  # the round table
        self.scalars = tensorboard.ScalarLog(self.arm_dir, enabled=not args.no_tensorboard)
        self.queue = None  # the queue a person is labelling (ids, scores), if any

    def run(self):
        """Run (or continue) to args.n_rounds; raises AwaitingLabels when a person must label a queue."""
        first_round = self.restore() if self.args.resume else None
        if first_round is None:
            self.learner.initialise(self.seed)
            first_round = 0
        rounds = range(first_round, self.args.n_rounds)
        label = f"{self.strategy} seed {self.seed} rounds"
        for round_number in progress.bar(rounds, desc=label, enabled=self.args.progress, unit="round"):
            ids, scores = self.queue or self.query(round_number)
            labels = self.oracle(round_number, ids, scores)
            self.add_labels(round_number, ids, labels, scores)
            if round_number > 0:
                self.adapt(round_number, ids, labels)
                self.report()
            self.train_and_evaluate(round_number + 1)
            self.save_checkpoint(round_number + 1)
        if first_round < self.args.n_rounds:
            self.report()
        return self.rows

    # -- the round's steps --
    def query(self, round_number):
        """Round 0: the random initial labels; then the top query_budget unlabelled ids with their scores."""
        if round_number == 0:
            return self.initial_ids, [None] * len(self.initial_ids)
        started = time.perf_counter()
        candidates = np.setdiff1d(self.pool_ids, self.store.ids())
        rng = np.random.default_rng([self.seed, round_number, 2])
        if self.strategy == "random":
            chosen = rng.choice(candidates, min(self.args.query_budget, len(candidates)), replace=False)
            scores = [None] * len(chosen)
        else:
            alpha = self.round_alpha(round_number)
            self.learner.reseed_dropout(self.seed, round_number, 2)
            uncertainty = np.zeros(len(candidates))
            if alpha > 0:
                uncertainty = self.learner.pool_uncertainty(self.source, candidates)
            score = acquisition_score(uncertainty, self.relevance[candidates], alpha)
            chosen = select_top_k(candidates, score, self.args.query_budget, rng)
            scores = list(score[np.searchsorted(candidates, chosen)])
        self.rows[-1]["seconds"] += time.perf_counter() - started
        return chosen, scores

    def oracle(self, round_number, ids, scores):
        """Labels for `ids`: the known ones (simulated), or a person's answers in queue_round{t}.csv."""
        if self.args.oracle == "simulated":
            return self.data["labels"][ids]
        queue_path = self.arm_dir / f"queue_round{round_number}.csv"
        if self.queue is not None:
            self.queue = None
            return read_queue(queue_path, [int(i) for i in ids])
        write_queue(queue_path, ids, scores, self.data)
        queue = {"ids": [int(i) for i in ids], "scores": [None if s is None else float(s) for s in scores]}
        self.save_checkpoint(round_number, queue)
        if not self.store.path.exists():
            self.store.write()
        self.report()
        raise AwaitingLabels(queue_path, len(ids))

    def add_labels(self, round_number, ids, labels, scores):
        """Record the new labels in labels.csv (round 0's random picks as strategy `initial`)."""
        strategy = "initial" if round_number == 0 else self.strategy
        self.store.add(ids, labels, round_number, scores, strategy, self.data["locations"])

    def adapt(self, round_number, ids, labels):
        """Reptile on the newly labelled batch (only when it holds at least 4 samples)."""
        started = time.perf_counter()
        if len(ids) >= 4 and self.args.meta_lr > 0:
            self.learner.reseed_dropout(self.seed, round_number, 3)
            rng = np.random.default_rng([self.seed, round_number, 3])
            ids, labels = support_first(ids, labels, self.args.reptile_support)
            self.rows[-1]["meta_query_loss"] = self.learner.reptile(self.source.read(ids), labels, rng)
        self.rows[-1]["seconds"] += time.perf_counter() - started

    def train_and_evaluate(self, round_number):
        """Train on every label so far, then the test ROC-AUC of P(target) (NaN for a one-class test set)."""
        from sklearn.metrics import roc_auc_score

        started = time.perf_counter()
        self.learner.reseed_dropout(self.seed, round_number, 0)
        ids, labels = self.store.ids(), self.store.labels()
        rng = np.random.default_rng([self.seed, round_number, 1])
        train_loss = self.learner.train_round(self.source.read(ids), labels, rng)
        test_auc = float("nan")
        truth = self.data["labels"][self.test_ids] if len(self.test_ids) else []
        if len(np.unique(truth)) == 2:
            test_auc = float(roc_auc_score(truth, self.learner.predict_positive(self.source, self.test_ids)))
        row = {
            "round": round_number,
            "n_labeled": len(ids),
            "alpha": self.round_alpha(round_number),
            "test_auc": test_auc,
            "train_loss": train_loss,
            "meta_query_loss": float("nan"),  # filled in by the Reptile step that follows the next query
            "seconds": time.perf_counter() - started,
            **discovery_counts(self.store.rows, round_number),
            "pool_positive_rate": self.pool_positive_rate(),
        }
        self.rows.append(row)

    def pool_positive_rate(self):
        """The positive share of the pool before any label (NaN when no labels are known)."""
        if self.data["labels"] is None:
            return float("nan")
        return float(np.mean(self.data["labels"][self.pool_ids]))

    def round_alpha(self, round_number):
        """The alpha of the query after round `round_number`: fixed by the strategy or scheduled."""
        fixed = {"uncertainty": 1.0, "relevance": 0.0, "random": float("nan")}
        if self.strategy in fixed:
            return fixed[self.strategy]
        return alpha_for_round(
            self.args.alpha, self.args.alpha_schedule, round_number - 1, self.args.n_rounds
        )

    # -- checkpoints and outputs --
    def save_checkpoint(self, round_number, queue=None):
        """Members, Adam slots and the round table (and a pending queue) as checkpoints/round_XXX."""
        state = {"round": round_number, "rows": self.rows, "queue": queue, **self.identity}
        arrays = self.learner.checkpoint_arrays()
        checkpoints.save(self.checkpoint_dir, f"round_{round_number:03d}", arrays, state, KEEP_CHECKPOINTS)

    def restore(self):
        """Load the newest checkpoint; returns its round, or None when there is none."""
        loaded = checkpoints.load(self.checkpoint_dir)
        if loaded is None:
            return None
        state, arrays = loaded
        state_path = self.checkpoint_dir / checkpoints.STATE_FILE
        runs.check_same_settings(
            state_path, self.identity, what="the checkpoints", hint="the same data and run"
        )
        self.learner.restore(arrays, self.checkpoint_dir / f"{state['checkpoint']}.npz")
        # Labels of a round interrupted after its checkpoint are dropped: that round is redone identically.
        self.store = LabelStore.read(self.store.path, before_round=state["round"])
        self.rows = [row for row in state["rows"] if row["round"] <= state["round"]]
        if state["queue"] is not None:
            self.queue = (np.array(state["queue"]["ids"], dtype=np.int64), state["queue"]["scores"])
        return state["round"]

    def report(self):
        """Write rounds.csv and print the newest row of the round table."""
        write_round_table(self.arm_dir / "rounds.csv", self.rows, ROUND_FIELDS)
        if self.rows:
            print(ROUND_LINE.format(self.strategy, self.seed, **self.rows[-1]), flush=True)
            self.scalars.write(self.rows[-1]["round"], self.rows[-1])


# ---- round results: the round tables, the AUC curves over seeds, metrics.json and the summary line ----


def write_round_table(path, rows, fields):
    """Round rows as CSV; floats as repr, so a resumed run's table can be compared digit for digit."""
    table = [
        {key: repr(row[key]) if isinstance(row[key], float) else row[key] for key in fields} for row in rows
    ]
    atomic.write_csv(path, table, list(fields))


def summarise_curves(all_rows):
    """{strategy: [{round, n_labeled, auc_mean, auc_std, discovery rates' mean and std, n_seeds}]} over
    seeds (NaNs skipped; std is the sample std, ddof=1)."""
    curves = {}
    for strategy in dict.fromkeys(row["strategy"] for row in all_rows):
        rows = [row for row in all_rows if row["strategy"] == strategy]
        curves[strategy] = []
        for round_number in sorted({row["round"] for row in rows}):
            same = [row for row in rows if row["round"] == round_number]
            point = {"strategy": strategy, "round": round_number, "n_labeled": same[0]["n_labeled"]}
            for name, field in (
                ("auc", "test_auc"),
                ("discovery", "discovery_rate"),
                ("cumulative_discovery", "cumulative_discovery_rate"),
                ("pool_positive", "pool_positive_rate"),
            ):
                values = np.array([row[field] for row in same], dtype=np.float64)
                point[f"{name}_mean"], point[f"{name}_std"] = reports.mean_std(values[np.isfinite(values)])
            curves[strategy].append({**point, "n_seeds": len(same)})
    return curves


def save_curve_plot(curves, path, title, name, ylabel, reference=None):
    """`<name>_mean` vs labelled count per strategy; mean +- sample std over seeds as a shaded band."""
    figure, axis = plots.pyplot().subplots(figsize=(6, 4))
    for strategy, rows in curves.items():
        counts = np.array([row["n_labeled"] for row in rows])
        mean = np.array([row[f"{name}_mean"] for row in rows])
        std = np.array([row[f"{name}_std"] for row in rows])
        axis.plot(counts, mean, marker="o", label=f"{strategy} (n={rows[0]['n_seeds']})")
        axis.fill_between(counts, mean - std, mean + std, alpha=0.2)
    if reference is not None and np.isfinite(reference[0]):
        axis.axhline(reference[0], color="grey", linestyle=":", linewidth=1, label=reference[1])
    axis.set(xlabel="labelled patches", ylabel=ylabel)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    plots.save(figure, path)


def save_auc_plot(curves, path, title):
    """AUC vs labelled count per strategy; mean +- sample std over seeds as a shaded band."""
    save_curve_plot(curves, path, title, "auc", "test ROC-AUC", (0.5, "chance"))


def save_discovery_plot(curves, path, title, base_rate):
    """Cumulative discovery rate (positives among the queried patches) vs labelled count, base rate dotted."""
    ylabel = "positives among queried patches"
    save_curve_plot(curves, path, title, "cumulative_discovery", ylabel, (base_rate, "pool positive rate"))


def final_discovery(all_rows):
    """{strategy: [cumulative discovery rate of each seed's last round]}, in seed order."""
    final = {}
    for strategy in dict.fromkeys(row["strategy"] for row in all_rows):
        rows = [row for row in all_rows if row["strategy"] == strategy]
        last = max(row["round"] for row in rows)
        by_seed = sorted(
            (row["seed"], row["cumulative_discovery_rate"]) for row in rows if row["round"] == last
        )
        final[strategy] = [rate for _, rate in by_seed]
    return final


def discovery_comparison(all_rows) -> str:
    """Markdown: each strategy vs random, paired over seeds, on the final cumulative discovery rate
    (empty without random, with one seed or without labels)."""
    final = final_discovery(all_rows)
    others = [s for s in final if s != "random"]
    usable = "random" in final and len(final["random"]) >= 2 and np.isfinite(final["random"]).all()
    if not usable or not others:
        return ""
    metric = "cumulative discovery rate"
    values = {strategy: {metric: rates} for strategy, rates in final.items()}
    rows = reports.paired_rows(values, [(s, "random") for s in others], [metric])
    return reports.markdown_table(reports.PAIRED_HEADER, rows)


def write_results(args, run_dir, all_rows, seeds):
    """The round tables, auc_curve.png and metrics.json (final and mean-over-rounds test AUC per strategy).

    `all_rows` are round rows with their `strategy` and `seed`. With several runs the run folder gets
    rounds.csv of all runs and strategy_comparison.csv (one run's rounds.csv is its own). Returns the
    metrics.
    """
    import keras

    run_dir = Path(run_dir)
    curves = summarise_curves(all_rows)
    if len({(row["strategy"], row["seed"]) for row in all_rows}) > 1:
        write_round_table(run_dir / "rounds.csv", all_rows, ("strategy", "seed", *ROUND_FIELDS))
        points = [point for rows in curves.values() for point in rows]
        atomic.write_csv(run_dir / "strategy_comparison.csv", points, list(points[0]))
    setting = f"{args.uncertainty} uncertainty, alpha {args.alpha} ({args.alpha_schedule})"
    save_auc_plot(curves, run_dir / "auc_curve.png", f"OWL-GPS: {setting}, {len(seeds)} seed(s)")
    final = {strategy: rows[-1] for strategy, rows in curves.items()}
    base_rate = float(np.nanmean([row["pool_positive_rate"] for row in all_rows] or [np.nan]))
    title = f"OWL-GPS discovery: {setting}, {len(seeds)} seed(s)"
    save_discovery_plot(curves, run_dir / "discovery_curve.png", title, base_rate)
    comparison = discovery_comparison(all_rows)
    if comparison:
        atomic.write_text(run_dir / "discovery_vs_random.md", DISCOVERY_NOTE + comparison)
    finite = {s: [r["auc_mean"] for r in rows if np.isfinite(r["auc_mean"])] for s, rows in curves.items()}
    ensemble_mean = args.ensemble_eval and args.uncertainty == "ensemble"
    metrics = {
        "n_rounds": args.n_rounds,
        "n_labeled": next(iter(final.values()))["n_labeled"],
        "seeds": list(seeds),
        "uncertainty": args.uncertainty,
        "keras": keras.__version__,
        "evaluated": "ensemble mean" if ensemble_mean else "member 0",
        "final_test_auc": {s: row["auc_mean"] for s, row in final.items()},
        "final_test_auc_std": {s: row["auc_std"] for s, row in final.items()},
        "mean_test_auc_over_rounds": {s: reports.mean_std(values)[0] for s, values in finite.items()},
        "std": "sample std over seeds (ddof=1)",
        "cumulative_discovery_rate": {s: row["cumulative_discovery_mean"] for s, row in final.items()},
        "cumulative_discovery_rate_std": {s: row["cumulative_discovery_std"] for s, row in final.items()},
        "pool_positive_rate": base_rate,
        "discovery_vs_random": comparison,
    }
    atomic.write_json(run_dir / "metrics.json", metrics)
    return metrics


DISCOVERY_NOTE = (
    "Final cumulative discovery rate (positives among the patches each strategy queried, the random\n"
    "initial labels left out), each strategy vs random paired over seeds: mean difference, 95 % t\n"
    "interval, seeds won, Wilcoxon signed-rank p (n/a below 5 seeds); sure = the interval excludes 0.\n\n"
)


def discovery_lines(metrics) -> list[str]:
    """The lines printed before the final one: discovery rate per strategy against the base rate."""
    several = len(metrics["seeds"]) > 1
    rates = metrics["cumulative_discovery_rate"]
    if not np.isfinite(list(rates.values())).any():
        return []
    spread = {
        s: f" +- {std:.3f}" if several else "" for s, std in metrics["cumulative_discovery_rate_std"].items()
    }
    parts = ", ".join(f"{s} {rate:.3f}{spread[s]}" for s, rate in rates.items())
    lines = [
        f"discovery: positives among queried patches {parts}; pool positive rate "
        f"{metrics['pool_positive_rate']:.3f}"
        + (f" (mean +- sample std over {len(metrics['seeds'])} seeds)" if several else "")
    ]
    if metrics["discovery_vs_random"]:
        lines += ["discovery vs random, paired over seeds:", metrics["discovery_vs_random"].rstrip()]
    return lines


def summary_line(metrics):
    """The last line a run prints; its figures are those of metrics.json (AUC "unknown" without labels)."""
    several = len(metrics["seeds"]) > 1
    spread = {s: f"+-{std:.4f}" if several else "" for s, std in metrics["final_test_auc_std"].items()}
    aucs = " ".join(f"{s}={mean:.4f}{spread[s]}" for s, mean in metrics["final_test_auc"].items())
    if not np.isfinite(list(metrics["final_test_auc"].values())).any():
        aucs = "unknown (no test labels)"
    counts = f"n_labeled={metrics['n_labeled']} rounds={metrics['n_rounds']}"
    spread_note = f" (mean +- sample std over {len(metrics['seeds'])} seeds)" if several else ""
    return f"final: test_auc {aucs} {counts} uncertainty={metrics['uncertainty']}{spread_note}"


# ---- main's steps ----


# Ranges of the numeric flags, (low, high) inclusive (None: unbounded). The upper bounds lie far above
# any sensible setting (the tutorial: 10 rounds, 5 epochs, batch 16) and refuse a typing slip that
# would run for ever or fill the memory.
MAX_SEED = 2**32 - 1
MAX_BATCH = 1 << 20
FLAG_RANGES = {
    "n_rounds": (1, 10_000),
    "initial_budget": (1, None),  # at most the pool, checked once the data is read
    "query_budget": (1, None),  # a query takes at most the unlabelled pool
    "seeds": (1, 1000),
    "epochs": (1, 100_000),
    "mc_passes": (1, 10_000),
    "ensemble_size": (1, 100),
    "score_batch_size": (1, MAX_BATCH),
    "batch_size": (1, MAX_BATCH),
    "inner_batch_size": (1, MAX_BATCH),
    "inner_steps": (1, 100_000),
    "alpha": (0.0, 1.0),
    "meta_lr": (0.0, 1.0),
    "inner_lr": (0.0, 10.0),
    "test_fraction": (0.0, 0.99),
    "signal": (0.0, 1000.0),
    "n_samples": (2, 1_000_000),
    "image_size": (4, 1024),
    "patch_size": (4, 4096),
    "seed": (0, MAX_SEED),
    "data_seed": (0, MAX_SEED),
}


def check_arguments(args):
    """Reject impossible settings before anything is read or written; returns the concept weights."""
    for flag, (low, high) in FLAG_RANGES.items():
        require_in_range(args, flag, low, high)
    require_in_range(args, "learning_rate", 0.0, 10.0, low_open=True)
    require_in_range(args, "reflectance_scale", 0.0, None, low_open=True)
    threshold = args.near_industrial_threshold
    require(math.isfinite(threshold), "--near_industrial_threshold", f"is {threshold}", "a finite distance")
    runs.require_writable_folder(args.results_dir)
    if args.demo:
        # The demo writes its data first: a budget larger than its pool is refused before that.
        pool = args.n_samples - round(args.test_fraction * args.n_samples)
        budget = f"at least --initial_budget ({args.initial_budget}) patches"
        require(pool >= args.initial_budget, "--n_samples", f"gives a pool of {pool} patches", budget)
    one_arm = args.query_strategy != "all" and args.seeds == 1
    require(
        one_arm or args.oracle == "simulated",
        "--oracle",
        "csv with several strategies or seeds",
        "one --query_strategy and --seeds 1 when a person labels the queue",
    )
    sources = [f"--{flag}" for flag in ("demo", "data_dir", "geotiff") if getattr(args, flag)]
    given = " and ".join(sources) or "no data source"
    require(len(sources) == 1, "arguments", f"{given} given", "exactly one of --demo, --data_dir, --geotiff")
    return parse_concept_weights(args.concept_weights)


def load_data(args, concept_names):
    """The demo set (written in the --data_dir layout first), a --data_dir, or a tiled --geotiff."""
    if args.demo:
        demo_dir = cli.demo_data_dir(args, SCRIPT_STEM)
        images, labels, concept_columns = datasets.synthetic_dataset(
            args.n_samples, args.image_size, args.signal, args.data_seed
        )
        datasets.write_dataset(demo_dir, images, labels, concept_columns)
        args.data_dir = str(demo_dir)
    if not args.geotiff:
        return datasets.load_npy_dataset(args.data_dir, concept_names, args.near_industrial_threshold)
    return datasets.load_geotiff_dataset(
        args.geotiff,
        concept_names,
        patch_size=args.patch_size,
        reflectance_scale=args.reflectance_scale,
        threshold=args.near_industrial_threshold,
        concepts_csv=args.concepts_csv,
        land_cover_geotiff=args.land_cover_geotiff,
        distance_geotiff=args.distance_geotiff,
        labels_csv=args.labels_csv,
    )


def describe_data(args, data):
    """Check the split against the budgets and print it; returns the test set size."""
    source, labels, name = data["source"], data["labels"], data["name"]
    if args.demo:
        share = f"{labels.mean():.0%} targets, signal {args.signal}"
        print(f"demo: wrote {source.count} synthetic patches ({share}) to {args.data_dir}")
    if args.geotiff:
        print(f"geotiff: {source.count} patches of {args.patch_size}px kept from {args.geotiff}")
    where = "--labels_csv" if args.geotiff else Path(args.data_dir) / "labels.npy"
    expected = "known labels for the simulated oracle, or --oracle csv to label the pool yourself"
    require(labels is not None or args.oracle == "csv", where, "missing", expected)
    require(source.height == source.width, name, "patches are not square", "square patches")
    n_test = round(args.test_fraction * source.count) if labels is not None else 0
    pool = source.count - n_test
    budget = f"at least --initial_budget ({args.initial_budget}) patches"
    require(pool >= args.initial_budget, name, f"pool of {pool} patches", budget)
    if labels is None:
        print(f"data: {source.count} unlabelled patches, no test set (test AUC unknown)")
    else:
        split = f"pool {pool}, test {n_test}, positives {labels.mean():.1%}"
        print(f"data: {source.count} patches of {source.height}x{source.width}x4, {split}")
    return n_test


def prepare_run(args, data, n_test, arms, weights):
    """The run folder; --resume refuses changed settings; config.json records the run."""
    seeds = f"x{args.seeds}" if args.seeds > 1 else ""
    derived = (
        f"{args.query_strategy}_{args.uncertainty}_alpha{args.alpha:g}_{args.alpha_schedule}"
        f"_seed{args.seed}{seeds}"
    )
    run_name = args.run_name or ("demo" if args.demo else derived)
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, run_name, args.overwrite, args.resume)
    config_path = run_dir / "config.json"
    unfinished = args.resume or args.overwrite or not config_path.exists()
    expected = "--resume to continue it, --overwrite to replace it, or another --run_name"
    require(unfinished, run_dir, "an unfinished run with this name exists", expected)
    # Input paths are compared relative to the run folder, so a results tree moved with its inputs resumes.
    settings = runs.settings_of(args, RESUME_SETTINGS, run_dir, input_paths=INPUT_PATHS)
    settings_path = run_dir / "resume_settings.json"
    if args.resume:
        runs.check_same_settings(
            settings_path if settings_path.exists() else config_path,
            settings if settings_path.exists() else runs.settings_of(args, RESUME_SETTINGS),
            what="the run being resumed",
            section=None if settings_path.exists() else "args",
            hint="the settings of the run being resumed",
        )
    sizes = {"n_samples": data["source"].count, "n_test": n_test, "image_size": data["source"].height}
    runs.write_config(run_dir, args, **sizes, arms=arms, concept_weights=weights)
    atomic.write_json(settings_path, settings)
    return run_dir


@cli_entry
def main(args):
    weights = check_arguments(args)
    runs.print_args(args)
    strategies = list(STRATEGIES) if args.query_strategy == "all" else [args.query_strategy]
    seeds = list(range(args.seed, args.seed + args.seeds))
    arms = [(strategy, seed) for strategy in strategies for seed in seeds]

    # ---- data ----
    data = load_data(args, list(weights))
    n_test = describe_data(args, data)
    run_dir = prepare_run(args, data, n_test, arms, weights)
    runs.seed_everything(args.seed, args.deterministic)  # after reading, which draws no random numbers
    print(f"run: {run_dir} ({len(arms)} run(s): {', '.join(strategies)} x seeds {seeds})")

    # ---- model ----
    learner = Learner(args, data["source"].height)
    members = f"SimpleCNN x{len(learner.members)}, {learner.members[0].count_params()} parameters each"
    print(f"model: {members}; uncertainty {args.uncertainty}")

    # ---- train: the active-learning loop of every (strategy, seed) ----
    all_rows = []
    for strategy, seed in arms:
        arm_dir = run_dir if len(arms) == 1 else run_dir / f"{strategy}_seed{seed}"
        try:
            rows = ActiveLearningRun(args, data, learner, arm_dir, strategy, seed).run()
        except AwaitingLabels as waiting:
            print(waiting.instruction(sys.argv))
            return None
        for index, member in enumerate(learner.members):
            atomic.save_keras(member, arm_dir / (f"model_member{index}.keras" if index else "model.keras"))
        all_rows += [{"strategy": strategy, "seed": seed, **row} for row in rows]

    # ---- evaluate ----
    metrics = write_results(args, run_dir, all_rows, seeds)
    for line in discovery_lines(metrics):
        print(line)
    print(summary_line(metrics))
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
