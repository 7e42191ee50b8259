"""Multi-worker training with tf.distribute: the strategy behind `--strategy multiworker`.

Imported by `runs.make_strategy` only when that strategy is asked for (it imports TensorFlow).
"""

import tensorflow as tf

# Dtypes that collective all-reduce accepts; others are reduced as int32 and cast back.
_COLLECTIVE_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.int32, tf.int64)


class NestedReduceMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose `reduce` also takes nested values and uint8 tensors.

    Keras 3's `fit` on this strategy makes two calls the parent class refuses: it reduces a whole
    distributed `(images, masks)` batch at once to learn its shapes (the collective reduction takes
    one tensor, of a float or int32/int64 dtype), and it averages each replica's scalar loss with
    `axis=0`. Here each tensor is reduced on its own, narrow integers as int32, and a scalar's
    `axis=0` is the mean over replicas that Keras asks for on one worker.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def reduce_one(item):
            local = self.experimental_local_results(item)[0]
            item_axis = None if local.shape.rank == 0 else axis
            if local.dtype in _COLLECTIVE_DTYPES:
                return parent.reduce(reduce_op, item, item_axis)
            widened = self.run(lambda tensor: tf.cast(tensor, tf.int32), args=(item,))
            return tf.cast(parent.reduce(reduce_op, widened, item_axis), local.dtype)

        return tf.nest.map_structure(reduce_one, value)


def multi_worker_strategy() -> tf.distribute.Strategy:
    """The strategy of the cluster in TF_CONFIG, or of the SLURM job when TF_CONFIG is unset."""
    import os

    resolver = None
    if not os.environ.get("TF_CONFIG") and os.environ.get("SLURM_JOB_ID"):
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
    return NestedReduceMultiWorkerStrategy(cluster_resolver=resolver)
