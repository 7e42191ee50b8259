"""Benchmark of train_owl_gps.py: seconds per active-learning round and pool-scoring memory.

1. Tutorial-sized data (500 patches of 32x32x4, 400 pool / 100 test): seconds per round (train 5
   epochs + test AUC + score the pool + Reptile) for our compiled loop against a baseline in the
   same run: the same loop written the way the tutorial's PyTorch code runs, eagerly, batch by batch.
2. A 100k-patch pool in images.npy on disk (1.6 GB of float32), scored with MC-dropout (20 passes):
   seconds and peak resident memory (VmHWM) of our batched, streamed scorer (the convolutional trunk
   run once per batch, only the dropout head T times). On the first `--baseline_pool_size` patches
   it is compared with a baseline that loads the pool into memory (as the tutorial does), runs T
   full forward passes and keeps the pool x T probabilities.

Each measurement runs in its own process so peak memory is not shared between them; each records
its wall and CPU time and the load (`bench.measure`; the round rows time the whole run, its first,
tracing round included). Run from the repository root:

    python -m bench.owl_gps_speed                     # both parts (writes a 1.6 GB temporary file)
    python -m bench.owl_gps_speed --pool_size 20000   # quicker part 2
    python -m bench.owl_gps_speed --rounds 1 --pool_size 256 --baseline_pool_size 128 --mc_passes 2

The last line is the ratios ours / baseline (> 1: ours is faster).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

import train_owl_gps as owl
from bench import measure
from common.owl_gps import datasets, patches

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb():
    """Peak resident set size of this process (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def script_args(**overrides):
    args = owl.get_args_parser().parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def round_ours(rounds):
    """Our loop: ActiveLearningRun.run on the tutorial data (seconds per round after the first)."""
    images, labels, concepts = datasets.synthetic_dataset()
    with tempfile.TemporaryDirectory() as folder:
        datasets.write_dataset(folder, images, labels, concepts)
        args = script_args(n_rounds=rounds + 1)
        data = datasets.load_npy_dataset(folder, ["urban", "near_industrial"], 0.3)
        learner = owl.Learner(args, 32)
        arm = owl.ActiveLearningRun(args, data, learner, Path(folder) / "run", "concept", 0)
        found = {}
        sample = measure.timed(lambda: found.update(rows=arm.run()))
    seconds = [row["seconds"] for row in found["rows"][1:]]  # round 1 includes tracing
    return {
        "seconds_per_round": float(np.mean(seconds)),
        "final_auc": found["rows"][-1]["test_auc"],
        "sample": vars(sample),
    }


def round_eager(rounds):
    """Baseline: the tutorial's loop run eagerly batch by batch (no compiled steps)."""
    import keras
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    images, labels, concepts = datasets.synthetic_dataset()
    channels_last = np.transpose(images, (0, 2, 3, 1))
    test_ids, pool_ids, labelled = owl.split_pool_test(500, 0.2, 20, 0)
    labelled = list(labelled)
    active = np.stack([concepts["urban"], concepts["near_industrial"]], 1).astype(bool)
    relevance = owl.concept_relevance(active, [2.0, 3.0])
    model, adapted = owl.build_simple_cnn(32), owl.build_simple_cnn(32)
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    times = []
    cpu_started = measure.cpu_seconds()
    measure.load_and_steal()  # the steal share is taken from here
    for _ in range(rounds + 1):
        started = time.perf_counter()
        ids = np.array(labelled)
        for _ in range(5):
            order = rng.permutation(len(ids))
            for start in range(0, len(ids), 16):
                batch = ids[order[start : start + 16]]
                with tf.GradientTape() as tape:
                    loss = loss_fn(labels[batch], model(channels_last[batch], training=True))
                gradients = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        p_test = np.concatenate(
            [
                tf.nn.softmax(model(channels_last[test_ids[s : s + 64]], training=False)).numpy()
                for s in range(0, len(test_ids), 64)
            ]
        )
        auc = roc_auc_score(labels[test_ids], p_test[:, 1])
        candidates = np.setdiff1d(pool_ids, ids)
        p_pool = np.concatenate(
            [
                tf.nn.softmax(model(channels_last[candidates[s : s + 64]], training=False)).numpy()
                for s in range(0, len(candidates), 64)
            ]
        )
        score = owl.acquisition_score(owl.entropy(p_pool), relevance[candidates], 0.5)
        # As the tutorial: ascending sort, the last 10 are queried, the first half of them is the support.
        new = candidates[np.argsort(score)[-10:]]
        labelled += list(new)
        adapted.set_weights(model.get_weights())
        sgd = keras.optimizers.SGD(0.01)
        support = new[:5]
        with tf.GradientTape() as tape:
            loss = loss_fn(labels[support], adapted(channels_last[support], training=True))
        sgd.apply_gradients(
            zip(tape.gradient(loss, adapted.trainable_variables), adapted.trainable_variables, strict=True)
        )
        model.set_weights(owl.reptile_update(model.get_weights(), adapted.get_weights(), 0.1))
        times.append(time.perf_counter() - started)
    sample = measure.Sample(sum(times), measure.cpu_seconds() - cpu_started, *measure.load_and_steal())
    return {"seconds_per_round": float(np.mean(times[1:])), "final_auc": float(auc), "sample": vars(sample)}


def write_pool(path, pool_size, image_size=32, chunk=4096):
    """A (pool_size, 4, H, W) float32 images.npy written chunk by chunk (never whole in memory)."""
    rng = np.random.default_rng(0)
    shape = (pool_size, 4, image_size, image_size)
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": shape})
        for start in range(0, pool_size, chunk):
            rng.random((min(chunk, pool_size - start), *shape[1:]), dtype=np.float32).tofile(file)


def pool_ours(path, passes, limit):
    """Our scorer: validate and stream images.npy from disk, MC-dropout moments per batch."""
    source = patches.open_images_npy(path)
    args = script_args(uncertainty="mc_dropout", mc_passes=passes)
    learner = owl.Learner(args, source.height)
    learner.initialise(0)
    learner.reseed_dropout(0, 1, 2)
    learner.pool_uncertainty(source, np.arange(8))  # trace the compiled steps outside the timing
    found = {}
    sample = measure.timed(
        lambda: found.update(scores=learner.pool_uncertainty(source, np.arange(min(limit, source.count))))
    )
    scores = found["scores"]
    return {
        "seconds": sample.wall,
        "sample": vars(sample),
        "reader": type(source).__name__,
        "mean_score": float(scores.mean()),
    }


def pool_in_memory(path, passes, limit):
    """Baseline: the pool loaded into memory, T full passes, every pass's probabilities kept."""
    import tensorflow as tf

    with open(path, "rb") as file:
        np.lib.format.read_magic(file)
        shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        count = min(limit, shape[0])
        images = np.fromfile(file, dtype=dtype, count=count * int(np.prod(shape[1:]))).reshape(
            count, *shape[1:]
        )
    images = np.transpose(images, (0, 2, 3, 1))
    args = script_args(uncertainty="mc_dropout", mc_passes=passes)
    learner = owl.Learner(args, images.shape[1])
    learner.initialise(0)
    model = learner.members[0]
    step = tf.function(lambda x: tf.nn.softmax(model(x, training=True)), reduce_retracing=True)
    step(images[:8])
    found = {}

    def score():
        probabilities = np.stack(
            [
                np.concatenate([step(images[s : s + 1024]).numpy() for s in range(0, len(images), 1024)])
                for _ in range(passes)
            ]
        )
        found["scores"] = owl.entropy(probabilities.mean(0))

    sample = measure.timed(score)
    return {"seconds": sample.wall, "sample": vars(sample), "mean_score": float(found["scores"].mean())}


def child(arguments):
    """Run one measurement in a fresh process; return its JSON result plus its peak memory."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.owl_gps_speed", *arguments], capture_output=True, text=True, cwd=ROOT
    )
    if result.returncode != 0:
        sys.exit(f"benchmark step {arguments} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="Timed rounds (after one warm-up round).")
    parser.add_argument("--pool_size", type=int, default=100_000, help="Patches in the large pool.")
    parser.add_argument("--mc_passes", type=int, default=20, help="MC-dropout passes.")
    parser.add_argument(
        "--baseline_pool_size",
        type=int,
        default=20_000,
        help="Patches for the in-memory baseline and the same-size comparison (0 skips it).",
    )
    measure.add_arguments(parser, rounds=None)
    parser.set_defaults(threads="1")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(args):
    threads = int(args.threads)
    if args.phase:
        measure.set_threads(threads)
        phases = {
            "round_ours": lambda: round_ours(args.rounds),
            "round_eager": lambda: round_eager(args.rounds),
            "pool_ours": lambda: pool_ours(args.path, args.mc_passes, args.limit),
            "pool_in_memory": lambda: pool_in_memory(args.path, args.mc_passes, args.limit),
        }
        result = phases[args.phase]()
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    common = [
        "--rounds",
        str(args.rounds),
        "--mc_passes",
        str(args.mc_passes),
        "--threads",
        str(args.threads),
    ]
    ours, eager = child(["--phase", "round_ours", *common]), child(["--phase", "round_eager", *common])
    print("tutorial data, seconds per round (train 5 epochs + test AUC + pool scoring + Reptile):")
    for name, result in (("ours (compiled steps)     ", ours), ("baseline (eager, tutorial)", eager)):
        print(f"  {name}   {result['seconds_per_round']:.3f} s   peak {result['peak_rss_mb']:.0f} MB")

    with tempfile.TemporaryDirectory(dir=ROOT / "results" if (ROOT / "results").is_dir() else None) as folder:
        path = Path(folder) / "images.npy"
        write_pool(path, args.pool_size)
        print(
            f"pool of {args.pool_size} patches ({path.stat().st_size / 2**30:.2f} GiB on disk), "
            f"MC-dropout {args.mc_passes} passes:"
        )
        streamed = child(
            ["--phase", "pool_ours", "--path", str(path), "--limit", str(args.pool_size), *common]
        )
        budget = "under" if streamed["peak_rss_mb"] < 2048 else "OVER"
        print(
            f"  ours, {args.pool_size} patches (streamed, {streamed['reader']})   "
            f"{streamed['seconds']:.1f} s   "
            f"peak {streamed['peak_rss_mb']:.0f} MB ({budget} the 2 GB budget)"
        )
        if args.baseline_pool_size:
            size = str(min(args.baseline_pool_size, args.pool_size))
            small = child(["--phase", "pool_ours", "--path", str(path), "--limit", size, *common])
            in_memory = child(["--phase", "pool_in_memory", "--path", str(path), "--limit", size, *common])
            print(
                f"  ours, {size} patches                        {small['seconds']:.1f} s   "
                f"peak {small['peak_rss_mb']:.0f} MB"
            )
            print(
                f"  baseline, {size} patches (in memory, T full passes)  {in_memory['seconds']:.1f} s   "
                f"peak {in_memory['peak_rss_mb']:.0f} MB"
            )
            memory = small["peak_rss_mb"] / in_memory["peak_rss_mb"]
            print(
                f"  {size} patches: peak memory ours / baseline {memory:.2f}, "
                f"time baseline / ours {in_memory['seconds'] / small['seconds']:.2f}"
            )
            pool_rows = [
                row_of(f"pool scoring {size}", name, int(size), "patches", result, threads)
                for name, result in (("ours", small), ("in memory", in_memory))
            ]
    rows = [
        row_of("AL rounds", "ours", args.rounds + 1, "rounds", ours, threads),
        row_of("AL rounds", "eager loop", args.rounds + 1, "rounds", eager, threads),
    ]
    measure.report(rows + (pool_rows if args.baseline_pool_size else []))


def row_of(task, name, items, unit, result, threads=1):
    return measure.Row(task, name, threads, items, unit, [measure.Sample(**result["sample"])])


if __name__ == "__main__":
    main(get_args_parser().parse_args())
