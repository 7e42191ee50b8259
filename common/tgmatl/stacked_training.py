"""Train many small independent models at once, as if each were trained alone with `model.fit`.

The TG-MATL protocol trains hundreds of tiny heads (a 64-unit linear layer or a 4-layer MLP) for
5000 epochs each. One `model.fit` per head spends nearly all its time on Python and dispatch
overhead. Here M models share one compiled TensorFlow graph: every parameter has a leading model
axis, and per model the engine keeps

- its own parameters and Adam moments (Keras 3 Adam update, bias-corrected step size),
- its own shuffled batches: a NumPy generator seeded by (seed, model key) draws each epoch's
  permutation, so a model's batches do not depend on which other models share the stack,
- its own step count (a model with fewer samples can have fewer steps per epoch),
- its own best-validation weights (strict improvement, like ModelCheckpoint(save_best_only)).

Gradients of the summed per-model losses are exactly the per-model gradients because no parameter
is shared, so the result equals training the models one by one (up to float rounding of batched
matrix products). The epoch loop runs inside one XLA-compiled tf.function per chunk of epochs.

Also here: the Keras initialisers drawn from each model's own generator, BatchNorm over the valid
samples of each model's batch, the split of many heads into stacks for worker processes, and
the per-group cost calibration that splits a stack's wall time over its heads.
"""

import csv
import functools
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from common import atomic, parallel, progress, tensorboard

ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7


def _start_worker_process(deterministic):
    # One worker process per core, each running its XLA programs on one thread of its own.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def run_side_by_side(jobs, run, finished, workers, deterministic=False, show_progress=False):
    """Run `run(job)` for every job on `workers` workers, largest first (jobs arrive sorted);
    `finished(job, result)` is called in the calling process as results come in. Returns the wall
    seconds.

    With one worker the jobs run here, one after another. With several, each worker is a process of
    its own with a single TensorFlow thread: stacks run as threads of one process share its thread
    pools and measured about 1.4x slower per epoch on two cores than in separate processes. `run`
    and the jobs are then pickled, so `run` must be a module-level function (or a functools.partial
    of one). A bar of finished heads (rate, ETA) goes to stderr on a terminal or with `show_progress`.
    """
    heads = progress.bar(total=sum(len(job["heads"]) for job in jobs), desc="heads", enabled=show_progress)

    def finished_and_counted(job, result):
        finished(job, result)
        heads.update(len(job["heads"]))

    with heads:
        return parallel.run_jobs(
            run,
            jobs,
            workers,
            on_result=finished_and_counted,
            initializer=_start_worker_process,
            initargs=(deterministic,),
        )


def model_generator(seed: int, model_key: int) -> np.random.Generator:
    """The per-model random stream (initialisation and batch order)."""
    return np.random.default_rng([int(seed), int(model_key)])


# ---- Keras initialisers and layers with a leading model axis ----


def glorot_uniform(generator: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """Keras GlorotUniform: uniform in +-sqrt(6 / (fan_in + fan_out))."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return generator.uniform(-limit, limit, (fan_in, fan_out))


def glorot_normal(generator: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """Keras GlorotNormal: truncated normal (redraw beyond 2 sd), sd = sqrt(2/(in+out)) / 0.8796."""
    scale = np.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978
    values = generator.standard_normal((fan_in, fan_out))
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = generator.standard_normal(outside.sum())
        outside = np.abs(values) > 2
    return values * scale


def batch_norm_initial(num_models: int, width: int) -> tuple[dict, dict]:
    """Keras BatchNormalization's initial values per model: (gamma 1, beta 0), (moving mean 0, variance 1)."""
    params = {"gamma": np.ones((num_models, width)), "beta": np.zeros((num_models, width))}
    state = {"moving_mean": np.zeros((num_models, width)), "moving_variance": np.ones((num_models, width))}
    return params, state


def masked_batch_norm(hidden, weight, count, moving, gamma, beta, training, momentum, epsilon):
    """Keras BatchNormalization of `hidden` `(M, B, E)` using only the valid samples of each model's batch.

    `weight` `(M, B, 1)` is 1 for valid samples, `count` `(M, 1, 1)` their number; `moving` is the pair
    (moving mean, moving variance) `(M, E)`. Training mode normalises with the mean and biased variance
    of the valid samples and moves the statistics like Keras; inference uses the moving statistics.
    Returns the normalised values and the (updated) moving pair.
    """
    moving_mean, moving_variance = moving
    if training:
        mean = tf.reduce_sum(hidden * weight, axis=1, keepdims=True) / count
        variance = tf.reduce_sum(tf.square(hidden - mean) * weight, axis=1, keepdims=True) / count
        moving = (
            moving_mean * momentum + mean[:, 0] * (1 - momentum),
            moving_variance * momentum + variance[:, 0] * (1 - momentum),
        )
    else:
        mean, variance = moving_mean[:, None, :], moving_variance[:, None, :]
    normalised = (hidden - mean) * tf.math.rsqrt(variance + epsilon) * gamma[:, None, :] + beta[:, None, :]
    return normalised, moving


# ---- planning: which heads share a stack ----


def split_into_stacks(groups, workers: int, cost, label) -> list[dict]:
    """Split the heads of each group (heads that can share a graph) into stacks, largest work first.

    `groups` maps a key to heads (dicts with a "fold"); the folds of a group are dealt round-robin to
    at most `workers` stacks. `cost(key)` is the work of one head, `label(key)` names the stack in
    progress lines. Each job holds "group", "heads", "label" and "cost".
    """
    jobs = []
    for key, heads in groups.items():
        folds = sorted({head["fold"] for head in heads})
        parts = max(1, min(workers, len(folds)))
        for part in range(parts):
            members = [head for head in heads if folds.index(head["fold"]) % parts == part]
            name = f"{label(key)}[{part + 1}/{parts}]"
            jobs.append({"group": key, "heads": members, "label": name, "cost": cost(key) * len(members)})
    return sorted(jobs, key=lambda job: -job["cost"])


def progress_printer(label: str):
    """A `progress` callback for `StackedModels.fit` printing one line per chunk of epochs."""

    def progress(done, total, seconds, train_loss, val_loss):
        print(
            f"  {label} epoch {done}/{total}  {seconds:6.1f}s  mean train loss "
            f"{train_loss.mean():.4f}  mean val loss {val_loss.mean():.4f}",
            flush=True,
        )

    return progress


def write_loss_histories(result: dict, folder, tag_of, enabled: bool = True) -> None:
    """TensorBoard scalars of a finished stack: each head's train and validation loss at every epoch.

    `result` holds `heads` and the (epochs, M) `train_history` and `val_history` of `StackedModels.fit`;
    head i's curves go to the TensorBoard run `folder` as the tags `tag_of(head, "train_loss")` and
    `tag_of(head, "val_loss")`, steps 1..epochs. Written in the process that gathers the stacks, so
    worker processes never write event files; one writer per folder serves every stack.
    """
    if not enabled:
        return
    log = _scalar_log(Path(folder))
    for index, head in enumerate(result["heads"]):
        log.write_series(tag_of(head, "train_loss"), result["train_history"][:, index])
        log.write_series(tag_of(head, "val_loss"), result["val_history"][:, index])


@functools.cache
def _scalar_log(folder: Path) -> tensorboard.ScalarLog:
    # One writer (and one traced series loop) per folder for the whole process.
    return tensorboard.ScalarLog(folder, subdir="")


def fold_index_lists(folds, heads) -> tuple[list, list]:
    """Each head's training and validation indices, from `folds` [(train, val)] and the head's fold."""
    return [folds[head["fold"] - 1][0] for head in heads], [folds[head["fold"] - 1][1] for head in heads]


def finished_line(job: dict, result: dict, epochs: int) -> str:
    """`  <stack>: <n> heads in <s>s (<ms> ms per head-epoch)`, printed as each stack finishes."""
    heads, seconds = len(result["heads"]), result["seconds"]
    per_head_epoch = 1e3 * seconds / (heads * epochs)
    return f"  {job['label']}: {heads} heads in {seconds:.1f}s ({per_head_epoch:.3f} ms per head-epoch)"


# ---- timings: each group of heads charged its own cost ----


def calibrate_costs(groups: dict, train, epochs: int) -> dict:
    """{key: seconds per head-epoch of the heads of `groups[key]` trained in a stack of their own}.

    A stack's wall time covers all its heads at once; to say what each kind of head costs, every
    group (e.g. the heads of one method) is trained alone: `train(key, heads, chunk_epochs, progress)`
    must train `heads` for 3 chunks of `epochs` epochs and pass `progress` to `StackedModels.fit`. The
    first chunk pays the compilation; the quicker of the two later ones counts.
    """
    print(f"# ---- timing calibration: {3 * epochs} epochs per method and embedding ----")
    costs = {}
    # Each short stack compiles its own graph; TensorFlow's retracing warning about that is noise here.
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")
    try:
        for key, heads in groups.items():
            marks = []
            train(key, heads, epochs, lambda done, total, seconds, *_, marks=marks: marks.append(seconds))
            if len(marks) < 3:
                raise ValueError(f"calibration of {key} ran {len(marks)} chunks, expected 3")
            costs[key] = float(min(np.diff(marks))) / epochs / len(heads)
    finally:
        logger.setLevel(level)
    return costs


def head_seconds(seconds: float, heads: list, costs: dict, group_of) -> np.ndarray:
    """A stack's wall `seconds` split over its heads in proportion to `costs[group_of(head)]`
    (evenly without costs): the heads' times sum to the stack's."""
    cost = np.array([costs.get(group_of(head), 1.0) for head in heads], np.float64)
    return seconds * cost / cost.sum()


def write_costs(costs: dict, path) -> list[dict]:
    """Print and write (CSV: experiment, method, ms_per_head_epoch) costs keyed (embedding, method).

    Rows of an earlier run for other keys are kept, so a resumed run does not lose them.
    """
    columns = ["experiment", "method", "ms_per_head_epoch"]
    rows = {}
    if Path(path).exists():
        with open(path, newline="") as file:
            rows = {(row["experiment"], row["method"]): row for row in csv.DictReader(file)}
    for (name, method), cost in costs.items():
        rows[(name, method)] = {
            "experiment": name,
            "method": method,
            "ms_per_head_epoch": round(1e3 * cost, 4),
        }
        print(f"  {name} {method}: {1e3 * cost:.3f} ms per head-epoch")
    atomic.write_csv(path, list(rows.values()), columns)
    return list(rows.values())


def epoch_permutations(generators, train_counts, num_epochs, padded_length):
    """(num_epochs, M, padded_length) positions into each model's training list; padding repeats 0."""
    permutations = np.zeros((num_epochs, len(generators), padded_length), dtype=np.int32)
    for model, (generator, count) in enumerate(zip(generators, train_counts, strict=True)):
        for epoch in range(num_epochs):
            permutations[epoch, model, :count] = generator.permutation(count)
    return permutations


def pad_index_lists(index_lists, multiple):
    """Stack variable-length index lists into (M, L) with L a multiple of `multiple`; return counts."""
    counts = np.array([len(indices) for indices in index_lists], dtype=np.int32)
    length = int(np.ceil(max(counts.max(), 1) / multiple) * multiple)
    padded = np.zeros((len(index_lists), length), dtype=np.int32)
    for model, indices in enumerate(index_lists):
        padded[model, : len(indices)] = indices
    return padded, counts


# ---- the engine ----


class StackedModels:
    """M independent models trained together; see the module docstring.

    forward(params, state, x, valid, training) -> (outputs, new_state): x is (M, B, ...) and every
        params/state tensor has a leading model axis.
    loss(outputs, batch, valid) -> (M,) per-model loss; batch holds the gathered per-sample arrays.
    validation_loss: the same signature, the loss that selects the best epoch on the validation
        lists (default: `loss`, as Keras's val_loss).
    shared_arrays: {name: (N, ...)} per-sample arrays common to all models (inputs named "x").
    per_model_arrays: {name: (M, N, ...)} per-sample arrays that differ between models.
    """

    # Validation lists are padded to a multiple of this. Default: a list of at most one batch is
    # padded only to the longest list (a 9-sample validation split is one batch of 9, as in Keras);
    # longer lists to a multiple of the batch size, as _mean_loss needs.
    validation_padding = None

    def __init__(
        self,
        params,
        forward,
        loss,
        shared_arrays,
        per_model_arrays=None,
        state=None,
        learning_rate=1e-4,
        batch_size=32,
        model_keys=None,
        jit_compile=True,
        validation_loss=None,
    ):
        self.names = sorted(params)
        self.params = {n: tf.Variable(np.asarray(params[n], np.float32), name=n) for n in self.names}
        self.state_names = sorted(state or {})
        self.state = {n: tf.Variable(np.asarray(state[n], np.float32), name=n) for n in self.state_names}
        self.first_moment = {n: tf.Variable(tf.zeros_like(v)) for n, v in self.params.items()}
        self.second_moment = {n: tf.Variable(tf.zeros_like(v)) for n, v in self.params.items()}
        self.best_params = {n: tf.Variable(v) for n, v in self.params.items()}
        self.best_state = {n: tf.Variable(v) for n, v in self.state.items()}
        self.num_models = int(next(iter(params.values())).shape[0])
        self.steps_taken = tf.Variable(tf.zeros([self.num_models], tf.float32))
        self.best_val_loss = tf.Variable(tf.fill([self.num_models], np.float32(np.inf)))
        self.best_epoch = tf.Variable(tf.fill([self.num_models], -1))
        self.forward, self.loss = forward, loss
        self.validation_loss = validation_loss or loss
        self.shared = {k: tf.constant(v) for k, v in shared_arrays.items()}
        self.per_model = {k: tf.constant(v) for k, v in (per_model_arrays or {}).items()}
        # Each model's key and step count reach the loss, for per-model random draws.
        self.model_keys = tf.constant(
            np.asarray(model_keys if model_keys is not None else range(self.num_models), np.int64)
        )
        self.learning_rate = float(learning_rate)
        self.batch_size = int(batch_size)
        self._run_chunk = tf.function(self._run_chunk_graph, jit_compile=jit_compile, autograph=False)

    # ---- pieces of one step ----

    def _gather(self, sample_index):
        batch = {k: tf.gather(v, sample_index) for k, v in self.shared.items()}
        batch.update({k: tf.gather(v, sample_index, batch_dims=1) for k, v in self.per_model.items()})
        batch["model_key"] = self.model_keys
        batch["model_step"] = tf.cast(self.steps_taken, tf.int64)
        return batch

    def _adam_update(self, gradients, active):
        """Keras 3 Adam on each model whose step is active (others keep parameters and moments)."""
        steps = self.steps_taken + tf.cast(active, tf.float32)
        step_size = self.learning_rate * tf.sqrt(1.0 - ADAM_BETA_2**steps) / (1.0 - ADAM_BETA_1**steps)
        for name in self.names:
            variable, gradient = self.params[name], gradients[name]
            shape = [-1] + [1] * (len(variable.shape) - 1)
            mask = tf.reshape(tf.cast(active, tf.float32), shape)
            first = self.first_moment[name] + mask * (gradient - self.first_moment[name]) * (1 - ADAM_BETA_1)
            second = self.second_moment[name] + mask * (tf.square(gradient) - self.second_moment[name]) * (
                1 - ADAM_BETA_2
            )
            self.first_moment[name].assign(first)
            self.second_moment[name].assign(second)
            variable.assign_sub(
                mask * tf.reshape(step_size, shape) * first / (tf.sqrt(second) + ADAM_EPSILON)
            )
        self.steps_taken.assign(steps)

    def _train_step(self, sample_index, valid):
        batch = self._gather(sample_index)
        with tf.GradientTape() as tape:
            outputs, new_state = self.forward(self.params, self.state, batch["x"], valid, True)
            losses = self.loss(outputs, batch, valid)
            total_loss = tf.reduce_sum(losses)
        gradients = tape.gradient(total_loss, [self.params[n] for n in self.names])
        active = tf.reduce_any(valid, axis=1)
        self._adam_update(dict(zip(self.names, gradients, strict=True)), active)
        for name in self.state_names:
            mask = tf.reshape(tf.cast(active, tf.float32), [-1] + [1] * (len(new_state[name].shape) - 1))
            self.state[name].assign(mask * new_state[name] + (1 - mask) * self.state[name])
        return losses, tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)

    def _mean_loss(self, index, counts, params, state):
        """Loss over an index list in fixed order, batch by batch, weighted by batch size (Keras)."""
        width = min(self.batch_size, index.shape[1])
        # Reshaping to (M, batches, width) keeps every batch's shape static, which XLA needs.
        batches = tf.reshape(index, [self.num_models, -1, width])

        def add_batch(batch_number, total, seen):
            positions = batch_number * width + tf.range(width)
            valid = positions[None, :] < counts[:, None]
            batch = self._gather(tf.gather(batches, batch_number, axis=1))
            outputs, _ = self.forward(params, state, batch["x"], valid, False)
            size = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)
            loss = self.validation_loss(outputs, batch, valid)
            return batch_number + 1, total + loss * size, seen + size

        zeros = tf.zeros([self.num_models])
        _, total, seen = tf.while_loop(
            lambda batch_number, *_: batch_number < batches.shape[1],
            add_batch,
            (tf.constant(0), zeros, zeros),
        )
        return total / tf.maximum(seen, 1.0)

    def _keep_if_improved(self, val_loss, epoch):
        improved = val_loss < self.best_val_loss

        def copy_improved():
            for current, best in [(self.params, self.best_params), (self.state, self.best_state)]:
                for name in current:
                    shape = [-1] + [1] * (len(current[name].shape) - 1)
                    best[name].assign(tf.where(tf.reshape(improved, shape), current[name], best[name]))
            return tf.constant(True)

        # Late in training most epochs improve no model: skip the copy of every parameter then.
        tf.cond(tf.reduce_any(improved), copy_improved, lambda: tf.constant(False))
        self.best_val_loss.assign(tf.where(improved, val_loss, self.best_val_loss))
        self.best_epoch.assign(tf.where(improved, epoch, self.best_epoch))

    def _run_chunk_graph(
        self, permutations, num_epochs, train_index, train_counts, val_index, val_counts, first_epoch
    ):
        # Built with explicit while loops (no autograph: converting the loss code costs seconds per
        # stack). `permutations` always holds a full chunk, so the last, shorter chunk reuses the
        # compiled graph; only the first `num_epochs` epochs are run, the rest of the history is 0.
        chunk_size, _, padded_length = permutations.shape
        steps_per_epoch = padded_length // self.batch_size
        zeros = tf.zeros([self.num_models])

        def run_epoch(epoch, train_history, val_history):
            order = tf.gather(train_index, tf.gather(permutations, epoch), batch_dims=1)
            order = tf.reshape(order, [self.num_models, steps_per_epoch, self.batch_size])

            def run_step(step, epoch_loss, epoch_seen):
                positions = step * self.batch_size + tf.range(self.batch_size)
                valid = positions[None, :] < train_counts[:, None]
                losses, size = self._train_step(tf.gather(order, step, axis=1), valid)
                return step + 1, epoch_loss + losses * size, epoch_seen + size

            _, epoch_loss, epoch_seen = tf.while_loop(
                lambda step, *_: step < steps_per_epoch, run_step, (tf.constant(0), zeros, zeros)
            )
            val_loss = self._mean_loss(val_index, val_counts, self.params, self.state)
            self._keep_if_improved(val_loss, first_epoch + epoch)
            row = tf.reshape(epoch, [1, 1])
            train_history = tf.tensor_scatter_nd_update(
                train_history, row, (epoch_loss / tf.maximum(epoch_seen, 1.0))[None]
            )
            val_history = tf.tensor_scatter_nd_update(val_history, row, val_loss[None])
            return epoch + 1, train_history, val_history

        history = tf.zeros([chunk_size, self.num_models])
        _, train_history, val_history = tf.while_loop(
            lambda epoch, *_: epoch < num_epochs, run_epoch, (tf.constant(0), history, history)
        )
        return train_history, val_history

    # ---- public ----

    def fit(self, train_lists, val_lists, epochs, generators, chunk_epochs=250, progress=None):
        """Train for `epochs`; returns (train_loss, val_loss) histories of shape (epochs, M)."""
        train_index, train_counts = pad_index_lists(train_lists, self.batch_size)
        longest_val = max(len(indices) for indices in val_lists)
        val_index, val_counts = pad_index_lists(
            val_lists,
            self.validation_padding
            or (max(longest_val, 1) if longest_val <= self.batch_size else self.batch_size),
        )
        train_histories, val_histories = [], []
        started = time.perf_counter()
        for first_epoch in range(0, epochs, chunk_epochs):
            num_epochs = min(chunk_epochs, epochs - first_epoch)
            permutations = np.zeros((chunk_epochs, self.num_models, train_index.shape[1]), np.int32)
            permutations[:num_epochs] = epoch_permutations(
                generators, train_counts, num_epochs, train_index.shape[1]
            )
            train_loss, val_loss = self._run_chunk(
                tf.constant(permutations),
                tf.constant(num_epochs, tf.int32),
                tf.constant(train_index),
                tf.constant(train_counts),
                tf.constant(val_index),
                tf.constant(val_counts),
                tf.constant(first_epoch, tf.int32),
            )
            train_histories.append(train_loss.numpy()[:num_epochs])
            val_histories.append(val_loss.numpy()[:num_epochs])
            if progress is not None:
                progress(
                    first_epoch + num_epochs,
                    epochs,
                    time.perf_counter() - started,
                    train_histories[-1][-1],
                    val_histories[-1][-1],
                )
        return np.concatenate(train_histories), np.concatenate(val_histories)

    def last(self):
        """Parameters and state after the last epoch as NumPy arrays (leading model axis)."""
        return (
            {n: v.numpy() for n, v in self.params.items()},
            {n: v.numpy() for n, v in self.state.items()},
        )

    def best(self):
        """Best-validation parameters and state as NumPy arrays (leading model axis)."""
        return (
            {n: v.numpy() for n, v in self.best_params.items()},
            {n: v.numpy() for n, v in self.best_state.items()},
        )

    def predict(self, x, use_best=True, batch_size=1024):
        """Outputs of every model on the same inputs x (N, ...) or per-model inputs (M, N, ...)."""
        params = self.best_params if use_best else self.params
        state = self.best_state if use_best else self.state
        x = np.asarray(x, np.float32)
        outputs = []
        for start in range(
            0, x.shape[-2] if x.ndim == 3 and x.shape[0] == self.num_models else len(x), batch_size
        ):
            if x.ndim == 3 and x.shape[0] == self.num_models:
                chunk = x[:, start : start + batch_size]
            else:
                chunk = np.broadcast_to(
                    x[start : start + batch_size], (self.num_models, *x[start : start + batch_size].shape)
                )
            valid = tf.ones(chunk.shape[:2], tf.bool)
            out, _ = self.forward(params, state, tf.constant(chunk), valid, False)
            outputs.append(out.numpy())
        return np.concatenate(outputs, axis=1)


class OnePassValidationStack(StackedModels):
    """StackedModels whose validation pass is one forward over each model's whole validation list.

    For a per-sample loss in inference mode (no BatchNorm batch statistics, no triplets) the mean
    over the list equals Keras's batch-weighted mean over 32-sample batches; one pass avoids padding
    9 validation samples to 32.
    """

    validation_padding = 1

    def _mean_loss(self, index, counts, params, state):
        valid = tf.range(tf.shape(index)[1])[None, :] < counts[:, None]
        batch = self._gather(index)
        outputs, _ = self.forward(params, state, batch["x"], valid, False)
        return self.validation_loss(outputs, batch, valid)
