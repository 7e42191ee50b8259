"""The measuring helper of every speed bench: contenders in one process, alternating rounds, the machine.

What it does for a bench:
- `alternate` runs the contenders of one comparison in the same process, in alternating rounds, after
  `warmup` untimed rounds of each (tracing, compilation, caches), and records per round the wall
  seconds, the CPU seconds of this process (all its threads, plus child processes that finished in
  the round), the 1-minute load average and the share of CPU time stolen by the hypervisor (from
  /proc/stat, over the round).
- `Row` keeps one contender's rounds: medians with min-max of wall and CPU time, throughput per wall
  second and per CPU second, the load average, cores and steal time next to it. A row measured while
  the load average exceeded the core count is marked `loaded`.
- `report` prints the rows as a markdown table and, on the LAST line, the ratios of every contender
  to the reference (`ours` by default), as time per item of the peer / ours (> 1: ours is faster).
  The ratio is the wall-time ratio on an unloaded machine and the CPU-time ratio (work per CPU
  second) where either row was loaded: on an oversubscribed machine the wall time measures the share
  of the cores a process got, and thread pools that spin while waiting for descheduled partners
  (OpenMP's) burn CPU time without progress, so the wall ratio follows the load, not the code.
- Thread counts: TensorFlow fixes its thread pools when it starts, so `run` measures each count of
  `--threads` (default `1,<cores>`) in a child process of the same bench (`python -m bench.NAME
  --threads T`), both frameworks set to T threads, and prints all rows together.

    python -m bench.peer_speed --threads 1,2     # how a bench uses it
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS_PREFIX = "BENCH_ROWS_JSON "
RATIO_PREFIX = "ratios"


# ---- the machine's state and one timed round ----


def cpu_seconds():
    """CPU seconds (user + system) of this process's threads and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def stat_times():
    """(steal, total) jiffies of all CPUs from /proc/stat, or (0, 0) where there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0, 0
    values = [int(value) for value in fields[:8]]
    return (values[7] if len(values) > 7 else 0), sum(values)


def cores():
    return os.cpu_count() or 1


@dataclass
class Sample:
    """One timed round: wall and CPU seconds, load average at its end, stolen share of CPU time."""

    wall: float
    cpu: float
    load: float
    steal: float


_last_stat = [stat_times()]


def load_and_steal():
    """(1-minute load average, share of CPU time stolen since the previous call)."""
    (steal_before, total_before), (steal, total) = _last_stat[0], stat_times()
    _last_stat[0] = (steal, total)
    return os.getloadavg()[0], (steal - steal_before) / max(total - total_before, 1)


def timed(function):
    """Run `function()` once and return its `Sample`."""
    load_and_steal()
    cpu_before, started = cpu_seconds(), time.perf_counter()
    function()
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
    return Sample(wall, cpu, *load_and_steal())


def alternate(contenders, rounds, warmup=1):
    """{name: [Sample] * rounds}: `warmup` untimed calls of each, then `rounds` alternating rounds."""
    for _ in range(warmup):
        for function in contenders.values():
            function()
    samples = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, function in contenders.items():
            samples[name].append(timed(function))
    return samples


# ---- rows, table and ratios ----


@dataclass
class Row:
    """One contender of one task at one thread count: its rounds and the machine's state."""

    task: str
    name: str
    threads: int
    items: float  # work per round (images, steps, ...), in `unit`
    unit: str
    samples: list = field(default_factory=list)
    cores: int = field(default_factory=cores)

    @property
    def wall(self):
        return statistics.median(sample.wall for sample in self.samples)

    @property
    def cpu(self):
        return statistics.median(sample.cpu for sample in self.samples)

    @property
    def load(self):
        return statistics.mean(sample.load for sample in self.samples)

    @property
    def loaded(self):
        return max(sample.load for sample in self.samples) > self.cores

    def cells(self):
        walls = [sample.wall for sample in self.samples]
        cpus = [sample.cpu for sample in self.samples]
        steal = 100 * statistics.mean(sample.steal for sample in self.samples)
        return [
            self.task,
            self.name,
            self.threads,
            f"{self.items / self.wall:.3g}",
            f"{self.items / max(self.cpu, 1e-9):.3g}",
            f"{self.wall:.3g} ({min(walls):.3g}-{max(walls):.3g})",
            f"{self.cpu:.3g} ({min(cpus):.3g}-{max(cpus):.3g})",
            f"{self.load:.1f} / {self.cores}",
            f"{steal:.1f}",
            "loaded" if self.loaded else "",
        ]


HEADER = [
    "task",
    "contender",
    "threads",
    "units/s",
    "units/CPU-s",
    "wall s (min-max)",
    "CPU s (min-max)",
    "load / cores",
    "steal %",
    "marked",
]


def rows_for(task, samples, items, threads, unit="images"):
    """`Row`s of `alternate`'s samples, all with `items` units of work per round."""
    return [Row(task, name, threads, items, unit, values) for name, values in samples.items()]


def ratios(rows, reference="ours", basis="auto"):
    """[(task, contender, threads, ratio, 'wall' or 'cpu')]: peer time per item / reference's.

    `basis` "auto" takes CPU time where either row is loaded and wall time elsewhere; "wall" always
    takes wall time (for contenders that wait, e.g. on a sleep, rather than compute).
    """
    found = []
    for row in rows:
        if row.name == reference:
            continue
        base = next(
            (r for r in rows if r.name == reference and r.task == row.task and r.threads == row.threads), None
        )
        if base is None:
            continue
        kind = "cpu" if basis == "auto" and (row.loaded or base.loaded) else "wall"
        peer, ours = (row.cpu, base.cpu) if kind == "cpu" else (row.wall, base.wall)
        found.append((row.task, row.name, row.threads, (peer / row.items) / (ours / base.items), kind))
    return found


def ratio_line(rows, reference="ours", basis="auto"):
    """`ratios <reference>/peer (> 1: <reference> faster): <task> vs <peer> @<T>t <x>x[wall|cpu]; ...`."""
    parts = [
        f"{task} vs {name} @{threads}t {value:.2f}x[{kind}]"
        for task, name, threads, value, kind in ratios(rows, reference, basis)
    ]
    return f"{RATIO_PREFIX} {reference}/peer (> 1: {reference} faster): " + "; ".join(parts)


def parse_ratio_line(line):
    """The ratio line back as [(task, contender, threads, ratio, basis)] (for tests and docs)."""
    if not line.startswith(RATIO_PREFIX):
        raise ValueError(f"not a ratio line: {line!r}")
    found = []
    for part in line.split(" faster): ", 1)[1].split("; "):
        comparison, threads, value = part.rsplit(" ", 2)
        task, name = comparison.split(" vs ", 1)
        number, kind = value.rstrip("]").split("x[")
        found.append((task, name, int(threads.strip("@t")), float(number), kind))
    return found


def machine_line():
    steal, total = stat_times()
    return (
        f"machine: {cores()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, "
        f"steal since boot {100 * steal / max(total, 1):.1f} %, TF_ENABLE_ONEDNN_OPTS="
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')} (unset: TensorFlow's default for this CPU)"
    )


def report(rows, reference="ours", basis="auto", notes=()):
    """Print the table (markdown), `notes`, and last the ratio line."""
    from common.reports import markdown_table

    print(machine_line())
    print(markdown_table(HEADER, [row.cells() for row in rows]), end="")
    print(
        "units/s: per wall second; units/CPU-s: per second of this process's CPU time; medians of the "
        "rounds; 'loaded': load average above the core count, the ratio is then CPU time's."
    )
    for note in notes:
        print(note)
    print(ratio_line(rows, reference, basis), flush=True)


# ---- thread counts, each in a child process ----


def add_arguments(parser, rounds=3):
    """--threads (comma-separated counts, default 1 and all cores) and --rounds (unless `rounds` is
    None: the bench has its own), plus the child's flag."""
    parser.add_argument(
        "--threads",
        default=f"1,{cores()}" if cores() > 1 else "1",
        help="Comma-separated thread counts; each runs in a child process, both sides on that many threads.",
    )
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds, help="Alternating timed rounds (medians).")
    parser.add_argument("--rows_json", action="store_true", help=argparse.SUPPRESS)
    return parser


def thread_counts(options):
    return [int(value) for value in str(options.threads).split(",") if value.strip()]


def set_threads(threads):
    """TensorFlow's intra- and inter-op pools (before it starts) and torch's pool to `threads`.

    torch sizes its pool from OMP_NUM_THREADS when it is first imported, so a bench that imports torch
    later (inside a function) gets `threads` too.
    """
    import tensorflow as tf

    os.environ["OMP_NUM_THREADS"] = str(threads)

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already started in this process (a test calling several benches)
        print(f"note: TensorFlow had started; its thread pools keep their size, not {threads}")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def run(options, measure, module, reference="ours", basis="auto", notes=()):
    """Measure `measure(options, threads) -> [Row]` at every count of `options.threads` and report.

    One count runs here; several run one child process each (`python -m <module> ... --threads T`),
    whose rows come back as a JSON line. Returns the rows.
    """
    counts = thread_counts(options)
    if len(counts) == 1:
        set_threads(counts[0])
        rows = measure(options, counts[0])
        if options.rows_json:  # a child: its own table first (kept if the parent is stopped), then the rows
            report(rows, reference, basis, notes)
            print(ROWS_PREFIX + json.dumps([asdict(row) for row in rows]), flush=True)
            return rows
    else:
        rows = []
        for threads in counts:
            rows += child_rows(module, threads)
    report(rows, reference, basis, notes)
    return rows


def child_rows(module, threads):
    """Run the bench with `--threads <threads>` in a child process, echo its output (its own table and
    ratio line included), return its rows."""
    argv, skip = [], False
    for argument in sys.argv[1:]:
        if skip:
            skip = False
        elif argument == "--threads":
            skip = True
        elif not argument.startswith("--threads="):
            argv.append(argument)
    command = [sys.executable, "-m", module, *argv, "--threads", str(threads), "--rows_json"]
    print(f"# ---- {threads} thread(s): {' '.join(command[1:])} ----", flush=True)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    rows = None
    for line in process.stdout:
        if line.startswith(ROWS_PREFIX):
            rows = json.loads(line[len(ROWS_PREFIX) :])
        else:
            print(line, end="", flush=True)
    if process.wait() != 0 or rows is None:
        raise SystemExit(f"{' '.join(command)} failed (exit {process.returncode})")
    return [Row(**dict(row, samples=[Sample(**s) for s in row["samples"]])) for row in rows]


# ---- FLOPs of a TensorFlow graph ----


def graph_flops(function, *specs):
    """Float operations of one call of `function` (a tf.function) traced at `specs` (TF's profiler)."""
    import tensorflow as tf

    graph = function.get_concrete_function(*specs).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops


def model_flops(model, input_shape, training):
    """FLOPs per example of `model`: forward only, or forward and all gradients (`training`)."""
    import tensorflow as tf

    @tf.function
    def forward(x):
        return model(x, training=False)

    @tf.function
    def train(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    return graph_flops(train if training else forward, tf.TensorSpec((1, *input_shape), tf.float32))


# ---- fraction of peak ----


def matmul_gflops(size=2048, repeats=3):
    """GFLOP/s of a float32 (size x size) matmul in TensorFlow on this process's threads (best of
    `repeats`) and per CPU second, the reference for a model's fraction of peak."""
    import numpy as np
    import tensorflow as tf

    a = tf.constant(np.random.default_rng(0).normal(size=(size, size)).astype(np.float32))
    tf.linalg.matmul(a, a).numpy()
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        sample = timed(lambda: tf.linalg.matmul(a, a).numpy())
        best_wall, best_cpu = min(best_wall, sample.wall), min(best_cpu, sample.cpu)
    flops = 2.0 * size**3
    return flops / best_wall / 1e9, flops / max(best_cpu, 1e-9) / 1e9


def peak_line(row, flops_per_item, matmul):
    """`<task> <contender>: <G> GFLOP per <unit>, <x> GFLOP/s per core-second (<p> % of the matmul's)`."""
    achieved = flops_per_item * row.items / max(row.cpu, 1e-9) / 1e9
    return (
        f"{row.task} {row.name} @{row.threads}t: {flops_per_item / 1e9:.3g} GFLOP per "
        f"{row.unit.rstrip('s')}, {achieved:.1f} GFLOP/s per core-second, "
        f"{100 * achieved / matmul[1]:.0f} % of a float32 matmul's {matmul[1]:.1f} GFLOP/s per core-second"
    )


def print_fraction_of_peak(rows, flops, reference="ours"):
    """Measure the matmul here and print, for each `reference` row whose task is in `flops` ({task:
    FLOPs per unit}), its FLOPs and achieved GFLOP/s per core-second next to the matmul's."""
    matmul = matmul_gflops()
    threads = rows[0].threads if rows else 1
    print(
        f"float32 2048 x 2048 matmul, {threads} threads: {matmul[0]:.1f} GFLOP/s wall, "
        f"{matmul[1]:.1f} per core-second"
    )
    for row in rows:
        if row.name == reference and row.task in flops:
            print(peak_line(row, flops[row.task], matmul))
