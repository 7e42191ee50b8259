"""Shared test helpers: run a script as a user would, call its `main`, check a one-line error."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


def run_script(script, *arguments, cwd=REPO, timeout=900, env=None):
    """Run `python <script> <arguments>` (a subprocess, as a user would) and return the completed process.

    TensorFlow's log level is left to the script (as for a user who set none), unless `env` sets it.
    """
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, arguments)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=environment,
    )


def parse(script_module, argv):
    """The script's parsed arguments for `argv` (a string is split on whitespace)."""
    if isinstance(script_module, str):
        script_module = importlib.import_module(script_module)
    if isinstance(argv, str):
        argv = argv.split()
    return script_module.get_args_parser().parse_args([str(item) for item in argv])


def call_main(script_module, argv):
    """Parse `argv` with the script's parser and call its `main` in this process."""
    if isinstance(script_module, str):
        script_module = importlib.import_module(script_module)
    return script_module.main(parse(script_module, argv))


def one_line_error(stderr: str, *fragments) -> str:
    """Check that `stderr` is one `error: ...` line holding every fragment; return the line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in lines[0], lines[0]
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def assert_process_error(completed, *fragments) -> str:
    """A finished subprocess ended with exit 2 and one error line holding every fragment."""
    assert completed.returncode == 2, (completed.returncode, completed.stderr[-3000:])
    return one_line_error(completed.stderr, *fragments)


def assert_main_error(capsys, call, *fragments) -> str:
    """`call()` (a script's main) exits 2 with one error line on stderr holding every fragment."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    return one_line_error(capsys.readouterr().err, *fragments)


def no_temporary_files(folder) -> bool:
    """True when no `*.tmp*` file of an atomic write was left behind under `folder`."""
    return not list(Path(folder).rglob("*.tmp*"))


# ---- fuzzing: bad files and bad numbers end in exit 0 or one error line, nothing left behind ----

HUGE = 10**12


def corrupted_copies(valid_file, folder) -> list[tuple[str, Path]]:
    """Three bad versions of `valid_file` under `folder`, each keeping its name: empty, truncated to
    half its bytes, and random bytes of the same length (seeded). Returns [(kind, path)]."""
    valid_file = Path(valid_file)
    data = valid_file.read_bytes()
    rng = np.random.default_rng(0)
    versions = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": rng.integers(0, 256, max(len(data), 64), dtype=np.uint8).tobytes(),
    }
    copies = []
    for kind, content in versions.items():
        path = Path(folder) / kind / valid_file.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        copies.append((kind, path))
    return copies


# The test files that take longest on 2 cores, longest first. pyproject runs each file whole in one
# worker process (--dist loadfile) in collection order (--no-loadscope-reorder); starting these first
# lets the processes finish together instead of one waiting while the other runs a long file last.
LONGEST_FILES = (
    "test_benches.py",
    "test_segmentation_train.py",
    "test_bench_aras400k_synthetic.py",
    "test_igarss_exp2.py",
    "test_igarss_exp1.py",
    "test_extract_terramind_embeddings.py",
    "test_train_multilabel_model.py",
    "test_extract_embeddings.py",
    "test_train_owl_gps.py",
    "test_multiworker.py",
    "test_train_lucas_classifier.py",
    "test_fuzz_segmentation.py",
    "test_fuzz_lucas.py",
    "test_fuzz_multilabel_training.py",
    "test_generative_trainer_unet_spade_gan.py",
    "test_spml_features.py",
    "test_optimizers.py",
    "test_fuzz_owl_gps.py",
    "test_segformer_vis.py",
    "test_fuzz_gan.py",
    "test_fuzz_spml.py",
)


def pytest_collection_modifyitems(config, items):
    """Run the files of LONGEST_FILES first, in that order; every file's own order is kept."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def float32_policy_after_each_test():
    """A script run in this process with --mixed_precision sets Keras's global dtype policy; the next
    test starts from float32 again, as a new process would."""
    yield
    keras = sys.modules.get("keras")
    if keras is not None and keras.mixed_precision.global_policy().name != "float32":
        keras.mixed_precision.set_global_policy("float32")


def files_under(folder) -> set:
    """Every file under `folder` (relative paths); empty when the folder does not exist."""
    folder = Path(folder)
    return (
        {path.relative_to(folder) for path in folder.rglob("*") if path.is_file()}
        if folder.exists()
        else set()
    )


def assert_fuzz_outcome(capsys, call, results_dir, case: str) -> int:
    """`call()` (a script's main on a fuzzed argument) exits 0, or exits 2 with one error line, no
    traceback, and no new file under `results_dir`. Any other exception fails the test. Returns the code."""
    before = files_under(results_dir)
    capsys.readouterr()
    try:
        call()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code or 0
    error = capsys.readouterr().err
    assert code in (0, 2), f"{case}: exit {code}\n{error[-2000:]}"
    if code == 2:
        one_line_error(error)
        assert files_under(results_dir) == before, (
            f"{case}: files written before the error: {files_under(results_dir) - before}"
        )
    return code


def assert_tensorboard_holds_log(run_dir, log_name="log.csv", step_column="epoch") -> dict:
    """run_dir/tensorboard holds every numeric column of every row of run_dir/log_name at its step.

    Returns the scalars read back ({tag: {step: value}}).
    """
    import csv

    from common import tensorboard

    scalars = tensorboard.read_scalars(Path(run_dir) / "tensorboard")
    with open(Path(run_dir) / log_name, newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows and scalars
    for row in rows:
        step = int(float(row[step_column]))
        for column, text in row.items():
            if column in tensorboard.STEP_COLUMNS or not _is_number(text):
                continue
            assert step in scalars[column], (column, step)
            assert tensorboard.same_value(text, scalars[column][step]), (column, step, text)
    return scalars


def _is_number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def with_flag(argv, flag: str, *values) -> list[str]:
    """`argv` (strings) with `flag` set to `values`, replacing its earlier values (a list flag's too)."""
    argv = [str(item) for item in argv]
    if flag in argv:
        start = end = argv.index(flag)
        end += 1
        while end < len(argv) and not argv[end].startswith("--"):
            end += 1
        argv = argv[:start] + argv[end:]
    return [*argv, flag, *map(str, values)]


def fuzz_file_flag(capsys, script_module, base_argv, flag, valid_file, folder, results, refused=True) -> dict:
    """Run `script_module` with `flag` set to each of `corrupted_copies(valid_file, folder)` in `base_argv`.

    Every case must pass `assert_fuzz_outcome` (writing under `results`); with `refused`, each must end in
    exit 2. For a file inside a folder argument, give `flag=None` and a `base_argv` callable that takes the
    bad file and returns the argv. Returns {kind: exit code}.
    """
    codes = {}
    for kind, bad in corrupted_copies(valid_file, folder):
        argv = base_argv(bad) if flag is None else with_flag(base_argv, flag, bad)
        case = f"{flag or Path(valid_file).name} {kind}"
        codes[kind] = assert_fuzz_outcome(
            capsys, lambda argv=argv: call_main(script_module, argv), results, case
        )
        assert not refused or codes[kind] == 2, f"{case} was accepted"
    return codes


def swapped_in(valid_file, argv):
    """For `fuzz_file_flag(flag=None)`: write each bad file's bytes over `valid_file` (a file inside a
    folder argument) and run `argv`. The caller restores `valid_file` afterwards."""

    def argv_with(bad):
        Path(valid_file).write_bytes(Path(bad).read_bytes())
        return argv

    return argv_with


def fuzz_numeric_flags(capsys, script_module, make_argv, flags, check=None, values=(0, -1, HUGE)) -> dict:
    """Each numeric flag of `flags` set to each of `values`; returns {"--flag value": exit code}.

    `make_argv(results_dir)` is a valid argv on tiny data; every case passes `assert_fuzz_outcome`. With
    `check` (the script's own argument check, called on the parsed arguments), the cases it refuses run
    through `main` one by one (cheap: refused before anything is read or written), and the values it
    accepts run together, each flag at most once per run, so a tiny training runs once or twice instead
    of once per value. A combined run that is refused (a combination that no single value makes) is run
    again one value at a time.
    """
    import shutil
    import tempfile

    from common.errors import InputError

    root = Path(tempfile.mkdtemp(prefix="fuzz_numbers_"))
    codes, packs = {}, []

    def run(changes):
        results = root / f"run{len(list(root.iterdir()))}"
        argv = make_argv(results)
        for flag, value in changes:
            argv = with_flag(argv, flag, value)
        case = ", ".join(f"{flag} {value}" for flag, value in changes)
        return assert_fuzz_outcome(capsys, lambda: call_main(script_module, argv), results, case)

    try:
        for flag in flags:
            accepted = []
            for value in values:
                if check is not None:
                    try:
                        check(parse(script_module, with_flag(make_argv(root / "parse"), flag, value)))
                        accepted.append(value)
                        continue
                    except InputError:
                        pass
                codes[f"{flag} {value}"] = run([(flag, value)])
            for number, value in enumerate(accepted):
                packs += [[]] * (number + 1 - len(packs))
                packs[number] = [*packs[number], (flag, value)]
        for pack in packs:
            code = run(pack)
            if code == 2 and len(pack) > 1:
                codes.update({f"{flag} {value}": run([(flag, value)]) for flag, value in pack})
            else:
                codes.update({f"{flag} {value}": code for flag, value in pack})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return codes
