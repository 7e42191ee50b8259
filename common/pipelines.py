"""tf.data helpers: epoch orders for exact resume, reader errors as one-line InputErrors, band statistics.

- `epoch_order(count, seed, epoch)`: the sample order of an epoch is a function of (seed, epoch)
  only, so a resumed run reads the same batches as an uninterrupted one.
- `ReaderErrors`: a reader called inside tf.data (numpy_function / py_function) records the first
  InputError it meets; `with errors.surface():` around the loop re-raises it as itself instead of
  TensorFlow's wrapped traceback.
- `band_statistics`: per-band mean and variance over batches, from a seeded sample of the data.
- `without_autotune`: fixed parallelism and buffers for a dataset iterated once per epoch, so a pass
  never ends waiting for tf.data's autotune thread (bench/pass_end_idle.py).
"""

import contextlib
import functools
from collections.abc import Iterable

import numpy as np

from common.errors import InputError


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of `range(count)` that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def sample_indices(count: int, limit: int, seed: int) -> np.ndarray:
    """Up to `limit` of `range(count)`, sorted, drawn with `seed`; all of them when count <= limit."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


class ReaderErrors:
    """Carries the first InputError raised by a reader inside tf.data out to the caller."""

    def __init__(self):
        self.error: InputError | None = None

    def wrap(self, reader):
        """`reader` that records the first InputError it raises (and re-raises it)."""

        @functools.wraps(reader)
        def recorded(*args, **kwargs):
            try:
                return reader(*args, **kwargs)
            except InputError as error:
                self.error = self.error or error
                raise

        return recorded

    @contextlib.contextmanager
    def surface(self):
        """Turn a tf.data failure caused by a recorded reader error back into that InputError."""
        import tensorflow as tf

        try:
            yield self
        except (tf.errors.OpError, InputError, ValueError):
            if self.error is not None:
                raise self.error from None
            raise


def band_statistics(batches: Iterable, floor: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (last axis) mean and variance over all pixels of `batches` (arrays or (images, ...))."""
    count, total, total_squares = 0, 0.0, 0.0
    for batch in batches:
        images = batch[0] if isinstance(batch, tuple | list) else batch
        pixels = np.asarray(images).reshape(-1, np.shape(images)[-1]).astype(np.float64)
        count += len(pixels)
        total = total + pixels.sum(axis=0)
        total_squares = total_squares + (pixels**2).sum(axis=0)
    if count == 0:
        raise ValueError("band_statistics got no pixels")
    mean = total / count
    return mean, np.maximum(total_squares / count - mean**2, floor)


def without_autotune(dataset):
    """The dataset with tf.data's autotuning off (AUTOTUNE parallelism and buffers take fixed values).

    A new iterator per epoch starts an autotune thread that wakes up 2.6, 5.1, 10.2, 20.5 and 41 s after
    the iterator's creation, then every 60 s; deleting the iterator at the end of a pass sometimes waits
    for that next wake-up (measured: 12 s of steps, then 8.5 s idle before the pass returned). With
    autotuning off there is no such thread and no wait (bench/pass_end_idle.py prints both).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
