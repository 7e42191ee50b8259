"""Run a training script as one worker of a local cluster and record the samples its replica trains on.

    python tests/multiworker_worker.py RECORD.json SCRIPT.py [script arguments]

The worker's TF_CONFIG comes from the environment. The script is imported as a module and its `main`
runs on the script arguments, as `python SCRIPT.py [script arguments]` runs it; the script itself is
unchanged. The training step of its replica is wrapped so that each training sample is noted
(segmentation: a digest of the augmented image, through Keras's train step; multi-label: the row index,
through the script's own `SpmlTrainer._replica_step`), and the list is written to RECORD.json when the
script ends. The notes come from inside the compiled step, so they are what the replica really received
after tf.distribute sharded the input.
"""

import atexit
import hashlib
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

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
    # The multi-label trainer's step is a method of the script's own class: patch it in the imported module.
    module = importlib.import_module(Path(script).stem)
    trainer_class = getattr(module, "SpmlTrainer", None)
    if trainer_class is not None:
        trainer_class._replica_step = recorded(trainer_class._replica_step, note_indices, 1)
    atexit.register(lambda: Path(record).write_text(json.dumps(SEEN)))
    sys.argv = [script, *argv]
    module.main(module.get_args_parser().parse_args())


if __name__ == "__main__":
    main()
