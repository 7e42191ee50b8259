"""`python <script>.py --help` prints the flags without loading TensorFlow, torch or transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path.name for path in ROOT.glob("*.py"))
HEAVY = ("tensorflow", "keras", "torch", "transformers")

# Runs one script as __main__ with --help and reports its exit code and which heavy modules it loaded.
PROBE = """
import contextlib, io, json, runpy, sys
heavy_names = set(sys.argv[2:])
sys.argv = [sys.argv[1], "--help"]
out = io.StringIO()
code = 0
try:
    with contextlib.redirect_stdout(out):
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code or 0
heavy = sorted({name.split(".")[0] for name in sys.modules} & heavy_names)
print(json.dumps({"code": code, "heavy": heavy, "help": out.getvalue()}))
"""


def test_every_script_is_probed():
    assert len(SCRIPTS) == 24, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_loads_no_deep_learning_framework(script):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, script, *HEAVY], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert report["help"].startswith("usage:") and "--demo" in report["help"], report["help"][:500]
    assert report["heavy"] == [], f"{script} --help imported {report['heavy']}"
