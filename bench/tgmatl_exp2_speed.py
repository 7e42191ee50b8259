"""Speed of igarss_exp2.py's stacked task heads against one Keras `model.fit` per head.

Both sides train the paper's task heads (Dense 128-64-32-16 with ReLU + BatchNorm, Adam 1e-4,
batch 32, shuffled, best validation weights kept) on AWIR-sized synthetic data (240 samples, fold
of 63 train / 9 val):

- baseline: one head at a time, `model.fit(..., validation_data=...)` with a callback that keeps the
  best-validation weights in memory (the ModelCheckpoint(save_best_only) of the reference, minus
  the disk writes). Measured on a 768-d base classifier and a 64-d projection box-feature regressor
  for a few epochs; the steady per-epoch cost is the median epoch after the first.
- ours: the real `igarss_exp2` plan for one 768-d embedding (24 base heads + 96 projection heads,
  the stacks spread over the cores side by side), trained in three compiled chunks of epochs: the
  first includes XLA compilation, the later ones give the steady per-epoch cost.

Prints per model-epoch costs and projected wall times of the full protocol (360 heads x 5000 epochs)
for both.

Wall and CPU time and the load are recorded by `bench.measure`; the last line is its ratio line
(baseline / ours per model-epoch, > 1: ours is faster), the CPU-time ratio on a loaded machine.

    python -m bench.tgmatl_exp2_speed            # from the repo root; ~3-5 minutes on a 2-core laptop
    python -m bench.tgmatl_exp2_speed --baseline_epochs 3 --chunk_epochs 2 --workers 1
"""

import argparse
import functools
import itertools
import os
import tempfile
import time
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

import igarss_exp2
from bench import measure
from common.tgmatl import awir, stacked_training

FULL_EPOCHS = 5000
FULL_HEADS = 360


def baseline_epoch_seconds(x, targets, kind, train, val, epochs, seed):
    """One head with model.fit: (setup + first epoch seconds, [Sample] of the later epochs)."""
    import keras

    class KeepBest(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best, self.weights, self.stamps = np.inf, None, []

        def on_epoch_end(self, epoch, logs=None):
            self.stamps.append((time.perf_counter(), measure.cpu_seconds(), *measure.load_and_steal()))
            if logs["val_loss"] < self.best:
                self.best, self.weights = logs["val_loss"], self.model.get_weights()

    keras.utils.set_random_seed(seed)
    units = igarss_exp2.HEAD_KINDS[kind]["units"]
    started = time.perf_counter()
    model = igarss_exp2.build_task_head(x.shape[1], kind)
    keep_best = KeepBest()
    model.fit(
        x[train],
        targets[train, :units],
        batch_size=32,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        validation_data=(x[val], targets[val, :units]),
        callbacks=[keep_best],
    )
    model.set_weights(keep_best.weights)
    stamps = keep_best.stamps
    epochs = [
        measure.Sample(now[0] - before[0], now[1] - before[1], now[2], now[3])
        for before, now in itertools.pairwise(stamps)
    ]
    return stamps[0][0] - started, epochs


def train_job(job, data, args, chunk_epochs):
    """One stack's training; its result carries the wall seconds at the end of each chunk of epochs."""
    marks = []
    result = igarss_exp2.train_task_heads(
        job["heads"],
        job["inputs"],
        data,
        args,
        chunk_epochs=chunk_epochs,
        progress=lambda done, total, seconds, *_: marks.append((seconds, time.process_time())),
    )
    return {"chunk_seconds": marks, "heads": len(result["heads"])}


def stacked_epoch_seconds(units, inputs, data, args, chunk_epochs, chunks=3):
    """The real igarss_exp2 plan (stacks side by side), `chunks` compiled chunks of `chunk_epochs`.

    The first chunk includes XLA compilation; later chunks reuse it, so their time is the steady
    per-epoch cost, measured inside one run (robust to load changing between runs). Returns
    (compile seconds, steady seconds per epoch) summed over stacks, and the number of stacks.
    """
    args.epochs = chunks * chunk_epochs
    jobs = igarss_exp2.plan_jobs(units, inputs, args.workers)
    for job in jobs:
        job["inputs"] = {head["input"]: inputs[head["input"]] for head in job["heads"]}
    timings = []
    cpu_started = measure.cpu_seconds()
    wall = stacked_training.run_side_by_side(
        jobs,
        functools.partial(train_job, data=data, args=args, chunk_epochs=chunk_epochs),
        lambda job, result: timings.append(result["chunk_seconds"]),
        args.workers,
    )
    steady_epochs = (chunks - 1) * chunk_epochs
    per_epoch = sum((t[-1][0] - t[0][0]) / steady_epochs for t in timings)
    cpu_per_epoch = sum((t[-1][1] - t[0][1]) / steady_epochs for t in timings)
    compile_seconds = sum(
        max(t[0][0] - chunk_epochs * (t[-1][0] - t[0][0]) / steady_epochs, 0.0) for t in timings
    )
    # Cores this process actually got (the machine may be shared): CPU seconds per wall second.
    cores_used = (measure.cpu_seconds() - cpu_started) / wall
    return compile_seconds, per_epoch, cpu_per_epoch, len(jobs), cores_used


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--baseline_epochs", type=int, default=12)
    parser.add_argument("--chunk_epochs", type=int, default=40)
    measure.add_arguments(parser, rounds=None)
    parser.set_defaults(threads="1")
    return parser


def measure_rows(bench_args, threads):

    with tempfile.TemporaryDirectory() as folder:
        data_path, embeddings_dir = awir.make_demo_data(Path(folder) / "data", seed=0)
        data = awir.load_awir(data_path, embeddings_dir, ["dinov2"], Path(folder) / "results", 0.7)
    embedding = data["embeddings"]["dinov2"]
    rng = np.random.default_rng(0)
    inputs, units = {}, []
    for source_index, method in enumerate(igarss_exp2.METHODS):
        for fold in range(1, awir.NUM_FOLDS + 1):
            if method == "base":
                inputs[("dinov2", method, fold)] = embedding
            else:  # A random linear projection stands in for the exp1 head: speed does not depend on it.
                inputs[("dinov2", method, fold)] = (
                    embedding @ rng.normal(0, 0.05, (embedding.shape[1], 64))
                ).astype(np.float32)
            units.append(
                {
                    "embedding": "dinov2",
                    "method": method,
                    "fold": fold,
                    "input": ("dinov2", method, fold),
                    "key": source_index * 100 + fold,
                }
            )
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"workers {bench_args.workers}"
    )

    # ---- baseline: one model.fit per head ----
    train, val = data["folds"][0]
    class_target = igarss_exp2.head_targets(data, 1, "class")
    feature_target = igarss_exp2.head_targets(data, 1, "boxfeat")
    base_setup, base_epochs = baseline_epoch_seconds(
        embedding, class_target, "class", train, val, bench_args.baseline_epochs, 0
    )
    projected = inputs[("dinov2", "dtl", 1)]
    proj_setup, proj_epochs = baseline_epoch_seconds(
        projected, feature_target, "boxfeat", train, val, bench_args.baseline_epochs, 1
    )
    base_epoch = float(np.median([sample.wall for sample in base_epochs]))
    proj_epoch = float(np.median([sample.wall for sample in proj_epochs]))
    # The protocol's mix: 1 of 5 inputs is a raw embedding, 4 of 5 are 64-d projections.
    baseline_epoch = 0.2 * base_epoch + 0.8 * proj_epoch
    mixed = [
        measure.Sample(
            *(0.2 * getattr(b, name) + 0.8 * getattr(p, name) for name in ("wall", "cpu", "load", "steal"))
        )
        for b, p in zip(base_epochs, proj_epochs, strict=False)
    ]
    baseline_setup = 0.2 * base_setup + 0.8 * proj_setup
    print(
        f"baseline model.fit: 768-d head {1e3 * base_epoch:.2f} ms/epoch "
        f"(setup + first epoch {base_setup:.2f}s), "
        f"64-d head {1e3 * proj_epoch:.2f} ms/epoch (setup + first epoch {proj_setup:.2f}s)"
    )

    # ---- ours: the real plan for one embedding ----
    args = argparse.Namespace(seed=0, learning_rate=1e-4, batch_size=32, workers=bench_args.workers, epochs=0)
    compile_seconds, stack_epoch_seconds, stack_epoch_cpu, num_stacks, cores_used = stacked_epoch_seconds(
        units, inputs, data, args, bench_args.chunk_epochs
    )
    heads = 3 * len(units)
    # Stacks run side by side on `workers` threads: the wall time per epoch is the summed cost / workers.
    per_epoch = stack_epoch_seconds / bench_args.workers
    fixed = compile_seconds / bench_args.workers
    ours_model_epoch = per_epoch / heads
    print(
        f"stacked: {heads} heads in {num_stacks} stacks, "
        f"{1e3 * per_epoch:.1f} ms wall per epoch of all {heads} "
        f"heads ({1e3 * ours_model_epoch:.3f} ms per model-epoch), compile {fixed:.1f}s wall, "
        f"{cores_used:.2f} of {bench_args.workers} cores used"
    )

    # ---- projections of the full protocol (3 embeddings x 5 inputs x 8 folds x 3 heads, 5000 epochs) ----
    baseline_full = FULL_HEADS * (baseline_setup + FULL_EPOCHS * baseline_epoch)
    # Three embeddings like this one (CLIP's 512-d inputs are cheaper, so this is an upper bound).
    ours_full = 3 * (fixed + FULL_EPOCHS * per_epoch)
    print(
        f"projected full protocol ({FULL_HEADS} heads x {FULL_EPOCHS} epochs): per-model fit "
        f"{baseline_full / 3600:.1f} h, stacked {ours_full / 60:.1f} min"
    )
    # On a shared machine the stacks got fewer cores than workers; with all of them free the same CPU
    # work takes cores_used / workers of the wall time.
    idle_share = min(cores_used / bench_args.workers, 1.0)
    print(
        f"stacked full protocol with all {bench_args.workers} cores free (from CPU time): "
        f"{ours_full * idle_share / 60:.1f} min"
    )
    load, steal = measure.load_and_steal()
    ours_sample = measure.Sample(per_epoch, stack_epoch_cpu, load, steal)
    return [
        measure.Row("TG-MATL exp2 heads", "ours", threads, heads, "model-epochs", [ours_sample]),
        measure.Row("TG-MATL exp2 heads", "model.fit per head", threads, 1, "model-epochs", mixed),
    ]


def main(options):
    return measure.run(options, measure_rows, "bench.tgmatl_exp2_speed")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
