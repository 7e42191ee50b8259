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

Commands:
    python train_owl_gps.py --demo                                  # tutorial loop, ~10 s CPU
    python train_owl_gps.py --demo --query_strategy all --seeds 5   # four strategies, shaded bands
    python train_owl_gps.py --demo --uncertainty mc_dropout --alpha_schedule linear
    python train_owl_gps.py --data_dir DIR          # DIR/images.npy (N,4,H,W), labels.npy, concepts.csv/.pkl
    python train_owl_gps.py --geotiff scene.tif --concepts_csv c.csv --labels_csv l.csv
    python train_owl_gps.py --data_dir DIR --oracle csv             # writes queue_round{t}.csv, stops
                                                                    # (labels.npy optional: unlabelled pool)
    python train_owl_gps.py --data_dir DIR --oracle csv --resume    # reads your labels, continues
    python train_owl_gps.py --demo --resume --n_rounds 15           # extend a finished run

Runtime: `--demo` takes about 10 seconds on a CPU (500 patches of 32x32, 10 rounds). It prints one
row per round and ends with
    final: test_auc concept=0.9093 n_labeled=110 rounds=10 uncertainty=entropy
(the numbers are in metrics.json; the last digits depend on the CPU). With `--signal 0` the pixels
are pure noise, as in the tutorial, and the test AUC stays near 0.5 by design.
`--query_strategy all --seeds 5` (20 runs) takes about 80 seconds.
"""

import sys
import time
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly; must come before it)

import numpy as np

from common import atomic, checkpoints, cli, owl_gps_data, runs
from common.errors import InputError, cli_entry, require

SCRIPT_STEM = "train_owl_gps"
STRATEGIES = ("concept", "uncertainty", "relevance", "random")
ROUND_FIELDS = ("round", "n_labeled", "alpha", "test_auc", "train_loss", "meta_query_loss", "seconds")
# Arguments that define a run; a --resume with any of them changed would silently mix two experiments.
RUN_SETTINGS = (
    *("query_strategy", "seeds", "alpha", "alpha_schedule", "uncertainty", "mc_passes", "mc_score"),
    *("ensemble_size", "initial_budget", "query_budget", "epochs", "batch_size", "learning_rate"),
    *("inner_lr", "meta_lr", "inner_steps", "inner_batch_size", "concept_weights", "keep_optimizer_state"),
    *("test_fraction", "oracle", "seed", "data_dir", "geotiff", "patch_size", "signal", "data_seed"),
    *("n_samples", "image_size", "ensemble_eval", "reptile_support"),
)
KEEP_CHECKPOINTS = 3
# One printed row of the round table: strategy, seed, then the round's figures.
ROUND_LINE = "{:>11} seed {} | round {round:>2} | labelled {n_labeled:>4} | alpha {alpha:.2f}"
ROUND_LINE += " | test AUC {test_auc:.4f} | train loss {train_loss:.4f}"
ROUND_LINE += " | meta query loss {meta_query_loss:.4f} | {seconds:.1f}s"
# (flag, default, help) per argument group, after the data flags of common.owl_gps_data; the type is
# the default's, a tuple default lists the choices (the first is the default) and False makes a switch.
FLAGS = {
    "active learning": (
        ("--seeds", 1, "Repeat every strategy with seeds seed..seed+seeds-1 (mean +- std bands)."),
        ("--n_rounds", 10, "Active-learning rounds."),
        ("--initial_budget", 20, "Random initial labels."),
        ("--query_budget", 10, "Labels queried per round."),
        ("--alpha", 0.5, "Weight of uncertainty against concept relevance."),
        ("--concept_weights", "urban=2,near_industrial=3", "Relevance = product of active weights."),
        ("--mc_passes", 20, "MC-dropout forward passes T."),
        ("--ensemble_size", 5, "Deep-ensemble members K; disagreement = mutual information."),
        ("--score_batch_size", 1024, "Pool patches scored per batch (memory bounded by one batch)."),
        ("--query_strategy", (*STRATEGIES, "all"), "concept: alpha*u + (1-alpha)*r; all: every strategy."),
        ("--alpha_schedule", ("constant", "linear"), "linear: alpha_t = min(1, t / n_rounds + 0.3)."),
        ("--uncertainty", ("entropy", "mc_dropout", "ensemble"), "Softmax entropy, MC-dropout or ensemble."),
        ("--mc_score", ("entropy", "bald"), "MC-dropout score: predictive entropy or BALD."),
        ("--oracle", ("simulated", "csv"), "csv: writes queue_round{t}.csv, stops, reads it on --resume."),
        (
            "--ensemble_eval",
            False,
            "Evaluate the averaged ensemble (else member 0, as for other estimators).",
        ),
    ),
    "training and Reptile": (
        ("--epochs", 5, "Epochs over the labelled set per round."),
        ("--batch_size", 16, "Training batch size."),
        ("--learning_rate", 1e-3, "Adam learning rate."),
        ("--inner_lr", 0.01, "Reptile inner SGD learning rate."),
        ("--meta_lr", 0.1, "Reptile: theta <- theta + meta_lr * (theta_adapted - theta); 0 disables."),
        ("--inner_steps", 5, "At most this many inner batches over the support half."),
        ("--inner_batch_size", 8, "Reptile inner batch size."),
        (
            "--reptile_support",
            ("lower", "upper"),
            "Support = lower-scored half of the query (tutorial) or upper.",
        ),
        ("--keep_optimizer_state", False, "Keep Adam's stale moments after Reptile (tutorial); else reset."),
    ),
}


def get_args_parser():
    parser = cli.Parser(SCRIPT_STEM, description="Concept-weighted active learning with Reptile (OWL-GPS).")
    cli.add_demo_argument(parser, "in the --data_dir format (images.npy, labels.npy, concepts.csv).")
    owl_gps_data.add_flag_groups(parser, {"data": owl_gps_data.DATA_FLAGS, **FLAGS})
    cli.add_run_arguments(parser)
    return parser


# ---- the tutorial's pieces ----


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


class Learner:
    """One SimpleCNN (or K for an ensemble) with Adam, compiled train/predict steps and Reptile.

    Built once and re-initialised per seed, so comparing strategies over seeds traces the steps once.
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
        softmax, signature = self.tf.nn.softmax, [self.patch_spec]
        return self.tf.function(lambda x: softmax(model(x, training=False)), input_signature=signature)

    def reseed_dropout(self, *key):
        """Dropout streams from (seed, round, phase, member): a resumed round draws identically."""
        owl_gps_data.reseed_dropout([*self.members, self.adapted], key)

    def initialise(self, seed):
        """Fresh seeded weights for every member and zeroed Adam moments."""
        owl_gps_data.initialise_weights(self.members, seed)
        owl_gps_data.reset_slots(self.optimizers)

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
        for start, batch_ids, x in owl_gps_data.batches(source, ids, self.args.score_batch_size):
            out[start : start + len(batch_ids)] = np.mean([p(x).numpy()[:, 1] for p in evaluated], 0)
        return out

    def pool_uncertainty(self, source, ids):
        """Entropy (tutorial), MC-dropout predictive entropy / BALD, or ensemble mutual information."""
        out = np.empty(len(ids), np.float64)
        for start, batch_ids, x in owl_gps_data.batches(source, ids, self.args.score_batch_size):
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
            theta, theta_adapted = model.get_weights(), self.adapted.get_weights()
            model.set_weights(reptile_update(theta, theta_adapted, self.args.meta_lr))
        if not self.args.keep_optimizer_state:
            owl_gps_data.reset_slots(self.optimizers)
        return float(np.mean(query_losses))


# ---- one active-learning run (one strategy, one seed) ----


class ActiveLearningRun:
    """The tutorial loop for one (strategy, seed): query -> oracle -> Reptile -> train -> evaluate.

    Every round ends with a checkpoint (members, Adam slots, round table) and new labels reach
    labels.csv at once; draws are keyed by (seed, round, phase), so a resumed round repeats exactly.
    """

    def __init__(self, args, data, learner, arm_dir, strategy, seed):
        self.args, self.data, self.learner, self.strategy, self.seed = args, data, learner, strategy, seed
        self.arm_dir, self.source = Path(arm_dir), data["source"]
        self.checkpoint_dir = self.arm_dir / "checkpoints"
        test_fraction = 0.0 if data["labels"] is None else args.test_fraction
        split = split_pool_test(self.source.count, test_fraction, args.initial_budget, seed)
        self.test_ids, self.pool_ids, self.initial_ids = split
        weights = list(parse_concept_weights(args.concept_weights).values())
        self.relevance = concept_relevance(data["active"], weights)
        self.identity = {"strategy": strategy, "seed": seed, "n_samples": self.source.count}
        # labels.csv, the round table, and the queue a person is labelling (ids, scores) if any.
        self.store, self.rows, self.queue = owl_gps_data.LabelStore(self.arm_dir / "labels.csv"), [], None

    def run(self):
        """Run (or continue) to args.n_rounds; raises AwaitingLabels when a person must label a queue."""
        first_round = self.restore() if self.args.resume else None
        if first_round is None:
            self.learner.initialise(self.seed)
            first_round = 0
        for round_number in range(first_round, self.args.n_rounds):
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
            return owl_gps_data.read_queue(queue_path, [int(i) for i in ids])
        owl_gps_data.write_queue(queue_path, ids, scores, self.data)
        queue = {"ids": [int(i) for i in ids], "scores": [None if s is None else float(s) for s in scores]}
        self.save_checkpoint(round_number, queue)
        if not self.store.path.exists():
            self.store.write()
        self.report()
        raise owl_gps_data.AwaitingLabels(queue_path, len(ids))

    def add_labels(self, round_number, ids, labels, scores):
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
        row = {"round": round_number, "n_labeled": len(ids), "alpha": self.round_alpha(round_number)}
        row |= {"test_auc": test_auc, "train_loss": train_loss, "meta_query_loss": float("nan")}
        self.rows.append({**row, "seconds": time.perf_counter() - started})

    def round_alpha(self, round_number):
        fixed = {"uncertainty": 1.0, "relevance": 0.0, "random": float("nan")}
        schedule = (self.args.alpha, self.args.alpha_schedule, round_number - 1, self.args.n_rounds)
        return fixed[self.strategy] if self.strategy in fixed else alpha_for_round(*schedule)

    # -- checkpoints and outputs --
    def save_checkpoint(self, round_number, queue=None):
        state = {"round": round_number, "rows": self.rows, "queue": queue, **self.identity}
        arrays = owl_gps_data.member_arrays(self.learner.members, self.learner.optimizers)
        checkpoints.save(self.checkpoint_dir, f"round_{round_number:03d}", arrays, state, KEEP_CHECKPOINTS)

    def restore(self):
        """Load the newest checkpoint; returns its round, or None when there is none."""
        loaded = checkpoints.load(self.checkpoint_dir)
        if loaded is None:
            return None
        (state, arrays), state_path = loaded, self.checkpoint_dir / checkpoints.STATE_FILE
        hint = "the same data and run"
        runs.check_same_settings(state_path, self.identity, what="the checkpoints", hint=hint)
        npz = self.checkpoint_dir / f"{state['checkpoint']}.npz"
        owl_gps_data.restore_members(arrays, self.learner.members, self.learner.optimizers, npz)
        # Labels of a round interrupted after its checkpoint are dropped: that round is redone identically.
        self.store = owl_gps_data.LabelStore.read(self.store.path, before_round=state["round"])
        self.rows = [row for row in state["rows"] if row["round"] <= state["round"]]
        if state["queue"] is not None:
            self.queue = (np.array(state["queue"]["ids"], dtype=np.int64), state["queue"]["scores"])
        return state["round"]

    def report(self):
        """Write rounds.csv and print the newest row of the round table."""
        owl_gps_data.write_round_table(self.arm_dir / "rounds.csv", self.rows, ROUND_FIELDS)
        if self.rows:
            print(ROUND_LINE.format(self.strategy, self.seed, **self.rows[-1]), flush=True)


# ---- main's steps ----


def check_arguments(args):
    """Reject impossible settings; returns the concept weights."""
    counts = ("n_rounds", "initial_budget", "query_budget", "seeds", "epochs", "mc_passes", "ensemble_size")
    for name in counts:
        require(getattr(args, name) >= 1, f"--{name}", f"is {getattr(args, name)}", "at least 1")
    require(0.0 <= args.alpha <= 1.0, "--alpha", f"is {args.alpha}", "a value in [0, 1]")
    one_arm = args.query_strategy != "all" and args.seeds == 1
    expected = "one --query_strategy and --seeds 1 when a person labels the queue"
    several = "csv with several strategies or seeds"
    require(one_arm or args.oracle == "simulated", "--oracle", several, expected)
    sources = [f"--{flag}" for flag in ("demo", "data_dir", "geotiff") if getattr(args, flag)]
    given = " and ".join(sources) or "no data source"
    require(len(sources) == 1, "arguments", f"{given} given", "exactly one of --demo, --data_dir, --geotiff")
    return parse_concept_weights(args.concept_weights)


def prepare_run(args, data, n_test, arms, weights):
    """The run folder; --resume refuses changed settings; config.json records the run."""
    derived = f"{args.query_strategy}_{args.uncertainty}_alpha{args.alpha:g}_{args.alpha_schedule}"
    derived += f"_seed{args.seed}" + (f"x{args.seeds}" if args.seeds > 1 else "")
    run_name = args.run_name or ("demo" if args.demo else derived)
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, run_name, args.overwrite, args.resume)
    config_path = run_dir / "config.json"
    unfinished = args.resume or args.overwrite or not config_path.exists()
    expected = "--resume to continue it, --overwrite to replace it, or another --run_name"
    require(unfinished, run_dir, "an unfinished run with this name exists", expected)
    if args.resume:
        settings, what = runs.settings_of(args, RUN_SETTINGS), "the run being resumed"
        hint = f"the settings of {what}"
        runs.check_same_settings(config_path, settings, what=what, section="args", hint=hint)
    sizes = {"n_samples": data["source"].count, "n_test": n_test, "image_size": data["source"].height}
    runs.write_config(run_dir, args, **sizes, arms=arms, concept_weights=weights)
    return run_dir


@cli_entry
def main(args):
    runs.seed_everything(args.seed, args.deterministic)
    runs.print_args(args)
    weights = check_arguments(args)
    strategies = list(STRATEGIES) if args.query_strategy == "all" else [args.query_strategy]
    seeds = list(range(args.seed, args.seed + args.seeds))
    arms = [(strategy, seed) for strategy in strategies for seed in seeds]

    # ---- data ----
    data = owl_gps_data.load_from_args(args, list(weights), cli.demo_data_dir(args, SCRIPT_STEM))
    n_test = owl_gps_data.describe_data(args, data)
    run_dir = prepare_run(args, data, n_test, arms, weights)
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
        except owl_gps_data.AwaitingLabels as waiting:
            print(waiting.instruction(sys.argv))
            return None
        for index, member in enumerate(learner.members):
            atomic.save_keras(member, arm_dir / (f"model_member{index}.keras" if index else "model.keras"))
        all_rows += [{"strategy": strategy, "seed": seed, **row} for row in rows]

    # ---- evaluate ----
    metrics = owl_gps_data.write_results(args, run_dir, all_rows, ROUND_FIELDS, seeds)
    print(owl_gps_data.summary_line(metrics))
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
