"""TensorBoard scalars: a run folder's log rows as event files under <run folder>/tensorboard/.

TensorFlow alone writes the event files (`tf.summary.create_file_writer` and `tf.summary.write` with
the scalars plugin's metadata), so the `tensorboard` package is needed only to look at them:

    pip install tensorboard
    tensorboard --logdir results/<script>/<run_name>

Every numeric column of a row becomes one scalar (a tag per column) at the row's step (epoch or
round); text columns and the step column itself are left out. A resumed run writes its steps again
from where it continues, and TensorBoard shows the newest value of a step.
"""

import argparse
import math
from collections.abc import Mapping
from numbers import Real
from pathlib import Path

import numpy as np

# Columns that name the step itself: the step axis already shows them.
STEP_COLUMNS = ("epoch", "round", "step")


def add_argument(parser: argparse.ArgumentParser) -> None:
    """--no_tensorboard: the flag that turns the event files off (written by default)."""
    parser.add_argument(
        "--no_tensorboard",
        action="store_true",
        help="Write no TensorBoard event files (by default the log's scalars go to <run>/tensorboard/).",
    )


def _scalar_metadata() -> bytes:
    import tensorflow as tf

    metadata = tf.compat.v1.SummaryMetadata()
    # TensorBoard's scalars plugin reads rank-0 float tensors with this plugin name (content: version 0).
    metadata.plugin_data.plugin_name = "scalars"
    return metadata.SerializeToString()


def numeric_columns(row: Mapping) -> dict:
    """{column: float} of the row's numeric values (booleans and the STEP_COLUMNS left out)."""
    values = {}
    for key, value in row.items():
        if key in STEP_COLUMNS or isinstance(value, bool | np.bool_):
            continue
        if isinstance(value, Real | np.number):
            values[str(key)] = float(value)
    return values


class ScalarLog:
    """One event-file writer for `<run_dir>/<subdir>`; every method is a no-op when `enabled` is false."""

    def __init__(self, run_dir, enabled: bool = True, subdir: str = "tensorboard"):
        self.folder = Path(run_dir) / subdir
        self._writer, self._metadata, self._series = None, None, None
        if enabled:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(str(self.folder))
            self._metadata = _scalar_metadata()

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def write(self, step: int, row: Mapping, prefix: str = "") -> None:
        """Write every numeric column of `row` at `step` (tag `prefix + column`) and flush."""
        if self._writer is None:
            return
        import tensorflow as tf

        with self._writer.as_default():
            for key, value in numeric_columns(row).items():
                tf.summary.write(
                    prefix + key, tf.constant(value, tf.float32), step=int(step), metadata=self._metadata
                )
        self._writer.flush()

    def write_series(self, tag: str, values, first_step: int = 1) -> None:
        """Write `values` (1-D) as the scalar `tag` at steps first_step, first_step + 1, ..., then flush.

        One compiled loop writes the whole series: a long history (thousands of epochs) costs
        microseconds per value instead of an eager call each. The loop is traced once per ScalarLog
        (a compiled function keeps the writer it was traced with), so keep one ScalarLog per folder.
        """
        if self._writer is None:
            return
        import tensorflow as tf

        values = np.asarray(values, np.float32).reshape(-1)
        if not len(values):
            return
        if self._series is None:
            self._series = tf.function(_write_series, reduce_retracing=True)
        with self._writer.as_default():
            self._series(
                tf.constant(tag), tf.constant(values), tf.constant(int(first_step), tf.int64), self._metadata
            )
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _write_series(tag, values, first_step, metadata):
    import tensorflow as tf

    for index in tf.range(tf.shape(values, out_type=tf.int64)[0]):
        tf.summary.write(tag, values[index], step=first_step + index, metadata=metadata)


def read_scalars(folder) -> dict:
    """{tag: {step: value}} of every scalar in the event files under `folder` (newest value per step)."""
    import tensorflow as tf

    scalars: dict = {}
    for path in sorted(Path(folder).rglob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = (
                    float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                )
                scalars.setdefault(value.tag, {})[int(event.step)] = number
    return scalars


def same_value(logged, written: float) -> bool:
    """Whether a logged value (CSV text or number) equals a float32 event value (both NaN counts)."""
    logged = float(logged)
    if math.isnan(logged):
        return math.isnan(written)
    return math.isclose(float(np.float32(logged)), written, rel_tol=1e-6, abs_tol=1e-12)
