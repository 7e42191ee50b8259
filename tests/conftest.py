"""Shared test helpers: run a script as a user would, call its `main`, check a one-line error."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
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
