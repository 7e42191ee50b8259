"""Worker processes: one spawn-based job runner for every script with `--workers N`."""

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait


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
