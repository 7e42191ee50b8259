"""Start-up: keeps TensorFlow's C++ start-up lines out of the output unless the user chose a log level.

Import it before any module that loads TensorFlow: each script that uses TensorFlow does, as
`import common.startup` between its standard-library and third-party imports. When
`TF_CPP_MIN_LOG_LEVEL` is unset it is set to 2 (warnings and errors of TensorFlow's C++ code after
start-up still show), and TensorFlow is loaded here with the standard-error file descriptor
captured: the lines it prints before its logging is set up (oneDNN, CUDA stub, CPU features,
cuInit on machines without a GPU driver) ignore that level, so the known ones are dropped and
every other captured line is written back. Spawned worker processes do the same.
"""

import contextlib
import os
import re
import sys
import tempfile

# The known start-up lines: the absl notice and TensorFlow's informational and GPU-probe messages.
_START_UP_LINE = re.compile(
    r"All log messages before absl::InitializeLog"
    r"|^[IW]\d{4} "
    r"|cuda_platform\.cc.*cuInit"
    r"|rebuild TensorFlow with the appropriate compiler flags"
)


@contextlib.contextmanager
def _start_up_lines_filtered():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if not _START_UP_LINE.search(line):
                    print(line, file=sys.stderr)


def _load_tensorflow_quietly() -> None:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # Marks the level as ours, so spawned worker processes filter their start-up lines too.
    os.environ["RSREPRO_QUIET_START_UP"] = "1"
    with _start_up_lines_filtered():
        import tensorflow as tf

        # The GPU probe prints its own start-up error (no driver) the first time it runs.
        tf.config.list_physical_devices("GPU")


if "TF_CPP_MIN_LOG_LEVEL" not in os.environ or os.environ.get("RSREPRO_QUIET_START_UP") == "1":
    _load_tensorflow_quietly()
