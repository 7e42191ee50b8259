"""Run records: seeding, the run folder, config.json and the one "same settings" check on resume.

Every script that continues earlier work (`--resume`, sweeps that skip finished heads, extraction
checkpoints) refuses to mix in results made with other settings through `check_same_settings`.
"""

import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from common.atomic import write_json
from common.errors import InputError


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and TensorFlow; optionally turn on TF op determinism (slower, bit-exact).

    Keras's automatic layer names are reset too, so every run names its variables (and so its
    checkpoint keys) the same way, also when several runs share one process.
    """
    random.seed(seed)
    np.random.seed(seed)
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def git_commit() -> str | None:
    """The commit of the code that runs, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    """Python's and the numerical libraries' versions (those already imported)."""
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("tensorflow", "keras", "sklearn", "pandas", "torch", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return versions


def run_record(args) -> dict:
    """Everything needed to re-create a run: arguments, library versions, git commit, time, command."""
    return {
        "args": dict(sorted(vars(args).items())),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def print_args(args) -> None:
    """Print every argument, sorted, at start-up (so a log says exactly what ran)."""
    for key, value in sorted(vars(args).items()):
        print(f"{key}: {value}")


def prepare_run_dir(
    results_dir,
    script_stem: str,
    run_name: str,
    overwrite=False,
    resume=False,
    finished_marker="metrics.json",
) -> Path:
    """Create `results_dir/script_stem/run_name` under the one resume contract of every script.

    - A finished run (its `finished_marker` exists) is refused: --overwrite replaces it, --resume
      continues or extends it.
    - An interrupted run (the folder holds files but no `finished_marker`) is refused too: it is
      never restarted silently over its checkpoints. --resume continues it, --overwrite starts over.
    - --overwrite empties the folder first; --resume keeps it and removes the temporary files that
      an atomic write killed mid-way left behind (`.<name>.*.tmp*`), so none survives a resumed run.
    """
    run_dir = Path(results_dir) / script_stem / run_name
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(run_dir, "is a file", "a folder for the run's outputs (or another --run_name)")
    if run_dir.exists() and not resume:
        if overwrite:
            shutil.rmtree(run_dir)
        elif (run_dir / finished_marker).exists():
            raise InputError(
                run_dir,
                "a finished run with this name exists",
                "--overwrite to replace it, --resume to continue it, or another --run_name",
            )
        elif any(run_dir.iterdir()):
            raise InputError(
                run_dir,
                f"an interrupted run with this name exists (no {finished_marker})",
                "--resume to continue it, --overwrite to start over, or another --run_name",
            )
    if run_dir.exists() and resume:
        remove_stale_temporaries(run_dir)
    require_writable_folder(run_dir, "the run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def require_writable_folder(path, flag: str = "--results_dir") -> Path:
    """`path` is a folder that exists or can be made, and this user can write there; nothing is created.

    Checked before any output: a file in its place, a file on the way, or a folder without write
    permission (tried with a probe file: os.access says yes for root and on some network file systems)
    is an InputError naming the nearest existing folder and `flag`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, f"{flag} is a file", "a folder for the outputs")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(
            existing, f"{flag} lies under a file: cannot write there", "a folder for the outputs"
        )
    probe = existing / f".write_probe_{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        problem = f"{flag} is not writable: cannot write there ({error.strerror})"
        raise InputError(existing, problem, "a folder this user can write") from None
    return path


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary files of atomic writes that a killed process left under `folder`."""
    stale = [path for path in Path(folder).rglob(".*.tmp*") if path.is_file()]
    for path in stale:
        path.unlink()
    return stale


def input_path_record(path, run_dir) -> str:
    """How config.json records an input path: relative to the run folder where that is possible.

    A results tree moved together with its inputs (or both seen through another mount point) then
    still matches on --resume; an input on another drive stays absolute.
    """
    path, run_dir = Path(path).resolve(), Path(run_dir).resolve()
    try:
        return os.path.relpath(path, run_dir)
    except ValueError:
        return str(path)


def settings_of(args, keys, run_dir=None, input_paths=()) -> dict:
    """The values of `keys` in `args` (the arguments that change results), as a plain dict.

    Keys in `input_paths` (input files and folders) are recorded relative to `run_dir` through
    `input_path_record`, so a results tree moved together with its inputs still resumes; an empty
    path stays empty.
    """
    settings = {key: getattr(args, key) for key in keys}
    for key in input_paths:
        if settings.get(key):
            settings[key] = input_path_record(settings[key], run_dir)
    return settings


def _comparable(value):
    # JSON turns tuples into lists and Paths into strings; compare in that form.
    return json.loads(json.dumps(value, default=str))


def check_same_settings(
    record_path,
    current: Mapping,
    overwrite: bool = False,
    what: str = "existing results",
    section: str | None = None,
    hint: str = "the same arguments to resume, --overwrite to start over, or another --run_name",
) -> dict:
    """Refuse to mix outputs made with other settings into this run (unless `overwrite`).

    `record_path` is a JSON file written by an earlier run; its settings are the top level, or the
    mapping under `section` (e.g. "args" of a config.json). Only the keys of `current` are compared;
    a key the earlier record lacks counts as changed. Returns `current` as a dict so the caller can
    record it for the next run.
    """
    record_path = Path(record_path)
    current = dict(current)
    if record_path.exists() and not overwrite:
        try:
            previous = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            raise InputError(record_path, "is not valid JSON", "the record an earlier run wrote") from None
        if section is not None:
            previous = previous.get(section, {})
        missing = object()
        changed = {
            key: (previous.get(key, missing), value)
            for key, value in current.items()
            if key not in previous or _comparable(previous[key]) != _comparable(value)
        }
        if changed:
            described = ", ".join(
                f"{key}={'(unset)' if old is missing else old} (now {new})"
                for key, (old, new) in sorted(changed.items())
            )
            raise InputError(record_path, f"{what} were made with {described}", hint)
    return current


def write_config(run_dir, args, **derived) -> dict:
    """Write config.json: the run record plus derived values (data sizes, class order, ...)."""
    record = run_record(args)
    if derived:
        record["derived"] = derived
    write_json(Path(run_dir) / "config.json", record)
    return record


_MULTI_WORKER_STRATEGY = []  # TensorFlow allows one MultiWorkerMirroredStrategy per process


def make_strategy(name: str):
    """Map --strategy {default,mirrored,multiworker} to a tf.distribute strategy.

    multiworker reads the cluster from TF_CONFIG, or from SLURM's variables when TF_CONFIG is unset
    and the process runs in a SLURM job (README "Running on a cluster"). It must be made before the
    first TensorFlow op of the process; later calls return the same strategy.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        from common import distribute

        if not _MULTI_WORKER_STRATEGY:
            _MULTI_WORKER_STRATEGY.append(distribute.multi_worker_strategy())
        return _MULTI_WORKER_STRATEGY[0]
    raise InputError("--strategy", f"unknown strategy {name!r}", "default, mirrored or multiworker")


def chief_results_dir(strategy, results_dir: str) -> str:
    """`results_dir` on the chief (and without multi-worker training); a scratch folder elsewhere.

    Every worker of a multi-worker run executes the whole script; only the chief (task 0) keeps
    what it writes, the others write into a temporary folder removed when the process ends.
    """
    if strategy.extended.should_checkpoint:
        return results_dir
    import atexit
    import tempfile

    scratch = tempfile.mkdtemp(prefix=f"worker{strategy.cluster_resolver.task_id}_")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return scratch
