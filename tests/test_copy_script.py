"""common.copy_script: a copied script runs in a host project that has a `common` package of its own."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

from common import copy_script

# One script of four papers; the exp1 sweep brings its experiment script, the test script the trainer.
COPIED = ("train_owl_gps.py", "igarss_exp1_sweep.py", "test_multilabel_model.py", "caption_stats.py")
DEMOS = {
    "train_owl_gps.py": "--demo --n_samples 120 --image_size 16 --epochs 2 --initial_budget 10 --n_rounds 1",
    "caption_stats.py": "--demo",
}


def run_in(folder, *arguments, timeout=900):
    return subprocess.run(
        [sys.executable, *map(str, arguments)], cwd=folder, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def host_project(tmp_path_factory):
    """A project with its own `common` package (no `startup`, no `errors`) and the four scripts copied in."""
    host = tmp_path_factory.mktemp("host")
    (host / "common").mkdir()
    (host / "common" / "__init__.py").write_text('"""The host project\'s own shared code."""\nHOST = True\n')
    (host / "common" / "utils.py").write_text("def helper():\n    return 1\n")
    completed = run_in(REPO, "-m", "common.copy_script", *COPIED, host)
    assert completed.returncode == 0, completed.stderr
    return host, completed.stdout


def test_copies_exactly_the_imported_modules(host_project):
    host, listing = host_project
    written = set(listing.splitlines()[:-1])
    assert {"train_owl_gps.py", "igarss_exp1.py", "train_multilabel_model.py", "requirements.txt"} <= written
    assert "rsrepro_common/errors.py" in written and "rsrepro_common/startup.py" in written
    # Modules no copied script imports stay behind (the LUCAS code, the copy tool itself).
    assert not any("lucas" in path or "copy_script" in path or "demos" in path for path in written)
    assert (host / "configs").is_dir()  # test_multilabel_model.py reads -c configs/<name>.yaml
    assert (host / "common" / "utils.py").read_text() == "def helper():\n    return 1\n"
    for path in host.rglob("*.py"):
        if "rsrepro_common" in path.parts or path.parent == host:
            text = path.read_text()
            assert not re.search(r"^\s*(from|import) common\b", text, flags=re.MULTILINE), path


def test_needed_files_follow_nested_imports():
    files = {str(path) for path in copy_script.needed_files(["igarss_exp1_sweep.py"])}
    assert "igarss_exp1.py" in files and "common/__init__.py" in files
    assert not any("owl_gps" in path or "spml" in path for path in files)


@pytest.mark.parametrize("script", COPIED)
def test_copied_script_answers_help(host_project, script):
    host, _ = host_project
    completed = run_in(host, script, "--help", timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "usage:" in completed.stdout


@pytest.mark.parametrize("script", sorted(DEMOS))
def test_copied_script_runs_its_demo(host_project, script):
    host, _ = host_project
    completed = run_in(host, script, *DEMOS[script].split())
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (host / "results").is_dir()


def test_refuses_to_replace_a_different_file(tmp_path):
    (tmp_path / "requirements.txt").write_text("numpy\n")
    completed = run_in(REPO, "-m", "common.copy_script", "train_owl_gps.py", tmp_path)
    assert completed.returncode == 2
    expected = f"error: {tmp_path / 'requirements.txt'}: exists with other content; expected a new file"
    assert completed.stderr.strip().splitlines() == [f"{expected} (or --overwrite)"]
    assert (tmp_path / "requirements.txt").read_text() == "numpy\n"
    assert not (tmp_path / "train_owl_gps.py").exists()  # nothing written before the check
