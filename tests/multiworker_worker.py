"""Run a training script as one worker of a local cluster and record the samples its replica trains on.

    python tests/multiworker_worker.py RECORD.json SCRIPT.py [script arguments]

The worker's TF_CONFIG comes from the environment. The script runs unchanged as `__main__`; the
training step of its replica is wrapped so that each training sample is noted (segmentation: a
digest of the augmented image; multi-label: the row index), and the list is written to RECORD.json
when the script ends. The notes come from inside the compiled step, so they are what the replica
really received after tf.distribute sharded the input.
"""

import atexit
import hashlib
import json
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

from common import spml

SEEN = []


def note_images(images):
    SEEN.extend(hashlib.sha1(image.tobytes()).hexdigest() for image in images)
    return np.int64(len(SEEN))


def note_indices(indices):
    SEEN.extend(int(index) for index in indices)
    return np.int64(len(SEEN))


def recorded(method, note, position):
    """`method` with a stateful note of its argument `position` that runs before the step's ops."""

    def wrapper(self, *args):
        token = tf.numpy_function(note, [args[position]], tf.int64, stateful=True)
        with tf.control_dependencies([token]):
            return method(self, *args)

    return wrapper


def main():
    record, script, *argv = sys.argv[1:]
    original_train_step = TensorFlowTrainer.train_step

    def train_step(self, data):  # data = (images, masks)
        return recorded(lambda model, images: original_train_step(model, data), note_images, 0)(self, data[0])

    TensorFlowTrainer.train_step = train_step
    spml.SpmlTrainer._replica_step = recorded(spml.SpmlTrainer._replica_step, note_indices, 1)
    atexit.register(lambda: Path(record).write_text(json.dumps(SEEN)))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
