"""Worker processes and shards: one spawn-based job runner (`--workers N`), one `--shard K/N` layout.

A job too big for one process is split into N independent runs (one per GPU, node or SLURM array
task) with `--shard K/N`: shard K takes every N-th batch of the one-process run, from the K-th
(`shard_batches`), so each batch holds exactly the items it would hold in one process and the
merged output equals a one-process run's. Shard K of an output `<path>` is written to
`<path>.shards/<K>_of_<N><suffix>` (`shard_path`); `--merge` finds the parts (`shard_parts`) and
refuses to merge while one is missing or unfinished.
"""

import multiprocessing
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from common.errors import require


def run_jobs(
    function: Callable,
    jobs: Sequence,
    workers: int,
    on_result: Callable | None = None,
    initializer: Callable | None = None,
    initargs: tuple = (),
    in_order: bool = False,
    stop: Callable[[], bool] | None = None,
) -> float:
    """Run `function(job)` for every job on `workers` processes; returns the wall seconds.

    `on_result(job, result)` is called in this process as each job finishes (in job order with
    `in_order`). With one worker (or one job) the jobs run here, one after another, and
    `initializer` is not called. Several workers are spawned, not forked: TensorFlow and GDAL are
    already running in this process and forking them is unsafe; `function` and the jobs are pickled,
    so `function` must be a module-level function (or a functools.partial of one). When `stop()`
    turns true after a result, the jobs not yet started are cancelled.
    """
    started = time.perf_counter()
    on_result = on_result or (lambda job, result: None)
    stop = stop or (lambda: False)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_result(job, function(job))
            if stop():
                break
        return time.perf_counter() - started
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=context, initializer=initializer, initargs=initargs
    ) as pool:
        futures = {pool.submit(function, job): job for job in jobs}
        pending = list(futures) if in_order else set(futures)
        while pending:
            if in_order:
                done, pending = [pending[0]], pending[1:]
            else:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_result(futures[future], future.result())
            if stop():
                pool.shutdown(cancel_futures=True)
                break
    return time.perf_counter() - started


# ---- shards: --shard K/N and --merge ----


def parse_shard(text: str) -> tuple[int, int] | None:
    """`--shard K/N` -> (K, N) with 1 <= K <= N; '' -> None. Anything else is one error line."""
    if not text:
        return None
    try:
        index, count = (int(value) for value in str(text).split("/"))
    except ValueError:
        index = count = 0
    require(1 <= index <= count, "--shard", f"got {text!r}", "K/N with 1 <= K <= N, e.g. 2/8")
    return index, count


def shard_of(args) -> tuple[int, int] | None:
    """`args.shard` read by `parse_shard`; `--shard` together with `--merge` is one error line."""
    require(not (args.merge and args.shard), "--merge", "was given with --shard", "one of them")
    return parse_shard(args.shard)


def shard_batches(total: int, batch_size: int, shard: tuple[int, int]) -> list[range]:
    """The item ranges shard K of N takes: every N-th batch of a one-process run, from the K-th.

    The batches are those of one process over `total` items (`batch_size` each, the last one
    shorter), so every batch keeps its items and a shard's batches end where the run's do. A shard
    left without a batch (N above the number of batches) is one error line.
    """
    index, count = shard
    starts = range(0, total, batch_size)[index - 1 :: count]
    batches = len(range(0, total, batch_size))
    require(
        starts,
        "--shard",
        f"{index}/{count} leaves shard {index} no work ({total} items, {batches} batches of {batch_size})",
        f"at most {batches} shards",
    )
    return [range(start, min(start + batch_size, total)) for start in starts]


def shard_rows(total: int, batch_size: int, shard: tuple[int, int]) -> list[int]:
    """The indices of the items of shard K of N (`shard_batches`), in the one-process order."""
    return [row for batch in shard_batches(total, batch_size, shard) for row in batch]


def shard_path(path, shard: tuple[int, int], suffix: str = "") -> Path:
    """Where shard K of N of the output `path` is written: `<path>.shards/<K>_of_<N><suffix>`."""
    path = Path(path)
    return path.with_name(path.name + ".shards") / f"{shard[0]}_of_{shard[1]}{suffix}"


def shard_parts(path, suffix: str = "", finished: Callable[[Path], bool] = Path.exists) -> list[Path]:
    """The parts `--shard K/N` runs wrote for the output `path`, in K order, every one `finished`.

    N is read from the part names; a missing or unfinished part, or parts of several counts N, is
    one error line naming it.
    """
    folder = Path(path).with_name(Path(path).name + ".shards")
    pattern = re.compile(r"(\d+)_of_(\d+)" + re.escape(suffix))
    found = [pattern.fullmatch(item.name) for item in folder.iterdir()] if folder.is_dir() else []
    counts = sorted({int(match[2]) for match in found if match})
    require(counts, folder, "holds no shard parts", "the outputs of --shard K/N runs before --merge")
    require(
        len(counts) == 1, folder, f"holds parts of several shard counts {counts}", "one --shard K/N series"
    )
    parts = [shard_path(path, (index, counts[0]), suffix) for index in range(1, counts[0] + 1)]
    for part in parts:
        require(
            finished(part),
            part,
            "is missing or unfinished",
            f"all {counts[0]} shards finished before --merge",
        )
    return parts
