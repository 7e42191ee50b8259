"""Run plumbing shared by every script: clean CLI errors, seeding, atomic writes and run folders.

A user mistake (missing file, wrong shape, NaN, unknown class) raises `InputError`; the `cli_entry`
decorator on each script's `main` turns it into one line on stderr,
`error: <file>: <what is wrong>; expected <what>`, and exit code 2, with no traceback. Bugs in our
own code still raise normally.

Everything a script writes goes through `atomic_*`: the bytes land in a temporary file in the same
folder, which is then renamed over the final name, so a crash never leaves a half-written file that
looks finished.
"""

import contextlib
import csv
import datetime
import functools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


class InputError(Exception):
    """A problem with the user's input, reported as one line: file, what is wrong, what was expected."""

    def __init__(self, path, problem, expected=None):
        self.path = str(path)
        self.problem = problem
        self.expected = expected
        message = f"{self.path}: {problem}"
        if expected:
            message += f"; expected {expected}"
        super().__init__(message)


def require(condition, path, problem, expected=None):
    """Raise `InputError(path, problem, expected)` unless `condition` holds."""
    if not condition:
        raise InputError(path, problem, expected)


def require_file(path, expected="an existing file"):
    """Return `path` as a Path if it is an existing file, else raise InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a regular file", expected)
    return path


def require_dir(path, expected="an existing folder"):
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "folder not found" if not path.exists() else "not a folder", expected)
    return path


def require_finite(array, path, what="values"):
    """Raise InputError naming the first non-finite entry of `array`."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        first_bad = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        index = first_bad[0] if len(first_bad) == 1 else first_bad
        raise InputError(path, f"{what} contain NaN or Inf (first at index {index})", "finite numbers")


def cli_entry(main_function):
    """Decorate a script's `main(args)`: InputError -> one line on stderr and exit 2, no traceback."""

    @functools.wraps(main_function)
    def wrapper(*args, **kwargs):
        try:
            return main_function(*args, **kwargs)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted; finished outputs are kept, re-run (with --resume where the "
                  "script has it) to continue", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper


# ---- seeding ----

def seed_everything(seed, deterministic=False):
    """Seed Python, NumPy and TensorFlow; optionally turn on TF op determinism (slower, bit-exact)."""
    random.seed(seed)
    np.random.seed(seed)
    import keras

    keras.utils.set_random_seed(seed)
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


# ---- atomic writes ----

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path` (same suffix); rename it over `path` on success.

    The suffix is kept because some writers pick the format from it (Keras `.h5` / `.keras`,
    OpenCV `.png`). On an exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    # mkstemp creates the file private (0600); results should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_bytes(path, data):
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def to_json(data):
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"


def atomic_write_json(path, data):
    atomic_write_text(path, to_json(data))


def atomic_save_npy(path, array, allow_pickle=False):
    """np.save through a temporary file. `allow_pickle` only for the paper repos' dict files."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            np.save(file, array, allow_pickle=allow_pickle)


def atomic_write_csv(path, rows, fieldnames):
    """Write a list of dicts as CSV in one atomic step."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def _not_the_hdf5_notice(record):
    return "HDF5 file via `model.save()`" not in record.getMessage()


def atomic_save_keras(model, path):
    """model.save through a temporary file with the same extension (.h5 or .keras).

    Keras logs a legacy-format notice for every .h5 save; the papers' layouts need .h5, so it is muted.
    """
    if str(path).endswith(".h5"):
        import logging

        absl_logger = logging.getLogger("absl")
        if _not_the_hdf5_notice not in absl_logger.filters:
            absl_logger.addFilter(_not_the_hdf5_notice)
    with atomic_path(path) as temporary:
        model.save(temporary)


def atomic_save_figure(figure, path, dpi=120):
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, bbox_inches="tight")


def append_jsonl(path, record):
    """Append one JSON line (a log is append-only, so a crash loses at most the line being written)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")


# ---- run records ----

def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions():
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("tensorflow", "keras", "sklearn", "pandas"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return versions


def run_record(args):
    """Everything needed to re-create a run: arguments, library versions, git commit, time, command."""
    return {
        "args": dict(sorted(vars(args).items())),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def print_args(args):
    """Print every argument, sorted, at start-up (so a log says exactly what ran)."""
    for key, value in sorted(vars(args).items()):
        print(f"{key}: {value}")


def add_run_arguments(parser, run_name=True):
    """The flags every non-TG-MATL script shares: results tree, run name, seed, overwrite/resume."""
    parser.add_argument("--results_dir", default="results",
                        help="Root of the output tree (relative to the current directory).")
    if run_name:
        parser.add_argument("--run_name", default=None,
                            help="Name of the run folder under results/<script>/; derived from the "
                                 "configuration when omitted.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds Python, NumPy and TensorFlow.")
    parser.add_argument("--deterministic", action="store_true",
                        help="Turn on TensorFlow op determinism (bit-exact re-runs, slower).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace a finished run of the same name instead of stopping.")
    parser.add_argument("--resume", action="store_true",
                        help="Continue an interrupted (or extend a finished) run from its checkpoint.")


def prepare_run_dir(results_dir, script_stem, run_name, overwrite=False, resume=False,
                    finished_marker="metrics.json"):
    """Create `results_dir/script_stem/run_name`, refusing to clobber a finished run.

    A run is finished when `finished_marker` exists. Without --overwrite or --resume a finished run
    is an error; --overwrite empties the folder first; --resume keeps it.
    """
    import shutil

    run_dir = Path(results_dir) / script_stem / run_name
    if run_dir.exists() and not resume:
        if overwrite:
            shutil.rmtree(run_dir)
        elif (run_dir / finished_marker).exists():
            raise InputError(run_dir, "a finished run with this name exists",
                             "--overwrite to replace it, --resume to continue it, or another --run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def require_same_arguments(config_path, current, overwrite, what="existing results"):
    """Refuse to mix outputs made with other arguments into this run (unless `overwrite`).

    `current` maps the arguments that change results to their values; it is returned so the caller
    can record it for the next run.
    """
    config_path = Path(config_path)
    if config_path.exists() and not overwrite:
        previous = json.loads(config_path.read_text())
        changed = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
        if changed:
            described = ", ".join(f"{k}={old} (now {new})" for k, (old, new) in sorted(changed.items()))
            raise InputError(config_path, f"{what} were trained with {described}",
                             "the same arguments to resume, --overwrite to retrain, or another --results_dir")
    return current


def write_config(run_dir, args, **derived):
    """Write config.json: the run record plus derived values (data sizes, class order, ...)."""
    record = run_record(args)
    if derived:
        record["derived"] = derived
    atomic_write_json(Path(run_dir) / "config.json", record)
    return record


# ---- distribution ----

def make_strategy(name):
    """Map --strategy {default,mirrored,multiworker} to a tf.distribute strategy."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise InputError("--strategy", f"unknown strategy {name!r}", "default, mirrored or multiworker")
