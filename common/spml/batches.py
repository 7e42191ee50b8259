"""(images, row index) batches for SPML training and evaluation: parallel reads, epoch orders, augmentation.

Every SPML batch carries the row index of each image next to it, because the label state that several
methods keep per training image (the observed-label matrix that LL-Cp and EM+APL rewrite, ROLE's
estimator) is gathered by row inside the compiled step. `make_dataset` reads rows in order (validation,
test, prediction passes); `TrainBatches` shuffles and augments them, the same way for a given seed and
epoch whether a run was resumed or not.
"""

import os

import numpy as np
import tensorflow as tf

from common import pipelines


def augment_batch(images, seed):
    """Random flips and 90-degree rotations per image (stateless: the same for a given epoch and batch)."""
    count = tf.shape(images)[0]
    draws = tf.random.stateless_uniform(tf.stack([count, 3]), seed)
    images = tf.where((draws[:, 0] < 0.5)[:, None, None, None], tf.reverse(images, [2]), images)
    images = tf.where((draws[:, 1] < 0.5)[:, None, None, None], tf.reverse(images, [1]), images)
    rotations = tf.stack([tf.image.rot90(images, k) for k in range(4)])
    return tf.gather_nd(rotations, tf.stack([tf.cast(draws[:, 2] * 4, tf.int32), tf.range(count)], axis=1))


def load_batches(indices, sources, loader, batch_size: int, reader_threads: int | None = None):
    """Map a dataset of row indices to (images, indices) batches with parallel reads.

    Args:
        indices: a `tf.data.Dataset` of int64 row indices into `sources`.
        sources: one entry per row (image paths, LMDB keys or feature vectors).
        loader: maps one source to an image, or a batch of sources to images when it is marked `.batched`.
        batch_size: rows per batch.
        reader_threads: parallel calls of the loader (default: AUTOTUNE, or one per core up to 4 for a
            batched loader).

    Returns:
        A `tf.data.Dataset` of `(images (B, ...), indices (B,))`.
    """
    batched, sources = getattr(loader, "batched", False), tf.constant(np.asarray(sources))
    loader = tf.autograph.experimental.do_not_convert(loader)

    def load(index):
        return loader(tf.gather(sources, index)), index

    if batched:
        # A batched reader holds the GIL only between its NumPy copies: one thread per core (up to 4)
        # overlaps them; more only contend (measured by bench/multilabel_input_speed.py).
        threads = reader_threads or min(4, os.cpu_count() or 1)
        return indices.batch(batch_size).map(load, num_parallel_calls=threads)
    return indices.map(load, num_parallel_calls=reader_threads or tf.data.AUTOTUNE).batch(batch_size)


def make_dataset(sources, loader, batch_size: int, reader_threads: int | None = None):
    """(images, row indices) batches in row order, for validation, test and prediction."""
    indices = tf.data.Dataset.range(len(sources))
    dataset = load_batches(indices, sources, loader, batch_size, reader_threads).prefetch(tf.data.AUTOTUNE)
    return pipelines.without_autotune(dataset)  # a new iterator per pass: no end-of-pass wait


class TrainBatches:
    """Shuffled, augmented training batches; built once, re-ordered per epoch through two small variables.

    `for_epoch(e)` sets the order to `pipelines.epoch_order(count, seed, e)` and the augmentation seeds to
    e, so an epoch's batches are the same whether the run was resumed or not, and the map functions are
    traced once instead of once per epoch.
    """

    def __init__(self, sources, loader, batch_size: int, seed: int, augment_images: bool):
        self.seed, self.count = seed, len(sources)
        self.order = tf.Variable(np.arange(self.count, dtype=np.int64), trainable=False)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        indices = tf.data.Dataset.range(self.count).map(lambda position: tf.gather(self.order, position))
        dataset = load_batches(indices, sources, loader, batch_size)
        if augment_images:

            def augment(images, index):
                seed = tf.stack([tf.cast(self.seed, tf.int64) * 1000 + self.epoch, index[0]])
                return augment_batch(images, seed), index

            dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        # Iterated afresh every epoch: without autotune no pass ends waiting (bench/pass_end_idle.py).
        self.dataset = pipelines.without_autotune(dataset.prefetch(tf.data.AUTOTUNE))

    def for_epoch(self, epoch: int):
        """The training dataset, ordered and augmented for `epoch`."""
        self.order.assign(pipelines.epoch_order(self.count, self.seed, epoch))
        self.epoch.assign(epoch)
        return self.dataset
