"""Fuzzing train_owl_gps.py, and its resume contract.

Each file argument gets an empty file, a truncated copy of a valid one and random bytes; each numeric
flag 0, -1 and 10**12. A run either finishes (exit 0, on 40 patches of 8x8 with 1 epoch and 2
rounds) or stops with exit 2, one `error:` line, no traceback and no new file under --results_dir.
Huge values are refused by an upper bound (FLAG_RANGES in the script) or are legal and fast:
--query_budget (a query takes at most the unlabelled pool), --reflectance_scale (a divisor) and
--near_industrial_threshold (any finite distance).
"""

import json
import shutil

import pytest
from conftest import (
    HUGE,
    assert_fuzz_outcome,
    call_main,
    files_under,
    fuzz_file_flag,
    fuzz_numeric_flags,
    no_temporary_files,
)

import train_owl_gps as owl
from common.owl_gps import datasets

BAD_NUMBERS = (0, -1, HUGE)
# Flags whose legal values change the loop's queries or updates (run with the simulated oracle).
LOOP_FLAGS = ("alpha", "query_budget")
NUMERIC_FLAGS = (*owl.FLAG_RANGES, "learning_rate", "reflectance_scale", "near_industrial_threshold")


def tiny_argv(data_dir, results, *extra):
    small = ["--n_rounds", "2", "--epochs", "1", "--initial_budget", "8", "--query_budget", "4"]
    small += ["--batch_size", "8", "--mc_passes", "2", "--ensemble_size", "2", "--inner_steps", "1"]
    return ["--data_dir", data_dir, "--results_dir", results, "--run_name", "fuzz", *small, *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("owl") / "data"
    images, labels, concepts = datasets.synthetic_dataset(40, 8, 0.3, 0)
    datasets.write_dataset(folder, images, labels, concepts)
    return folder


def test_numeric_flags_end_in_a_run_or_one_line(data_dir, capsys):
    # A legal value of a flag the loop itself uses runs the loop; the others stop at the first queue a
    # person labels (--oracle csv), after every check and the model are done: fast. Values that
    # check_arguments refuses run through main one by one; the accepted ones run together.
    loop = [f"--{flag}" for flag in LOOP_FLAGS]
    others = [f"--{flag}" for flag in NUMERIC_FLAGS if flag not in LOOP_FLAGS]
    stop_at_queue = lambda results: tiny_argv(data_dir, results, "--oracle", "csv")  # noqa: E731
    codes = fuzz_numeric_flags(capsys, owl, stop_at_queue, others, check=owl.check_arguments)
    run_loop = lambda results: tiny_argv(data_dir, results)  # noqa: E731
    codes |= fuzz_numeric_flags(capsys, owl, run_loop, loop, check=owl.check_arguments)
    for flag in ("epochs", "batch_size", "n_rounds", "seeds", "learning_rate", "image_size", "n_samples"):
        assert {codes[f"--{flag} {value}"] for value in BAD_NUMBERS} == {2}, flag
    assert codes[f"--query_budget {HUGE}"] == 0 and codes["--alpha 0"] == 0


def test_demo_with_a_budget_larger_than_its_pool_writes_nothing(tmp_path, capsys):
    argv = ["--demo", "--n_samples", "20", "--initial_budget", "19", "--results_dir", tmp_path / "r"]
    assert assert_fuzz_outcome(capsys, lambda: call_main(owl, argv), tmp_path / "r", "demo budget") == 2


@pytest.mark.parametrize("name", ["images.npy", "labels.npy", "concepts.csv"])
def test_damaged_data_dir_files_end_in_one_line(name, data_dir, tmp_path, capsys):
    results = tmp_path / "results"

    def data_dir_with(bad):
        folder = tmp_path / f"data_{bad.parent.name}"
        shutil.copytree(data_dir, folder)
        shutil.copyfile(bad, folder / name)
        return tiny_argv(folder, results)

    fuzz_file_flag(capsys, owl, data_dir_with, None, data_dir / name, tmp_path / "bad", results)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:rasterio.*")
def test_damaged_geotiff_inputs_end_in_one_line(tmp_path, capsys):
    import numpy as np

    from common.raster import write_geotiff

    rng = np.random.default_rng(0)
    write_geotiff(tmp_path / "scene.tif", rng.random((4, 64, 64)).astype(np.float32))
    grid = [(row, col) for row in range(4) for col in range(4)]
    (tmp_path / "concepts.csv").write_text(
        "row,col,land_cover,dist_industrial\n" + "".join(f"{r},{c},{(r + c) % 4},0.2\n" for r, c in grid)
    )
    (tmp_path / "labels.csv").write_text(
        "row,col,label\n" + "".join(f"{r},{c},{(r + c) % 2}\n" for r, c in grid)
    )
    files = {
        "geotiff": tmp_path / "scene.tif",
        "concepts_csv": tmp_path / "concepts.csv",
        "labels_csv": tmp_path / "labels.csv",
    }
    results = tmp_path / "results"
    small = ["--patch_size", "16", "--initial_budget", "4", "--query_budget", "2", "--n_rounds", "1"]
    base = [*(item for key, value in files.items() for item in (f"--{key}", value)), *small, "--epochs", "1"]
    base += ["--results_dir", results]
    for flag, valid in files.items():
        fuzz_file_flag(capsys, owl, base, f"--{flag}", valid, tmp_path / f"bad_{flag}", results)


def test_results_dir_that_is_a_file_is_refused_before_the_demo_writes(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    for place in (blocker, blocker / "results"):
        with pytest.raises(SystemExit) as exit_info:
            call_main(owl, ["--demo", "--results_dir", place])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "--results_dir" in error[0], error
    assert blocker.read_text() == "a file"


# ---- the resume contract ----


def test_interrupted_run_is_refused_without_resume_and_resume_leaves_no_temporary(data_dir, tmp_path, capsys):
    results = tmp_path / "results"
    call_main(owl, tiny_argv(data_dir, results))
    run_dir = results / "train_owl_gps" / "fuzz"
    (run_dir / "metrics.json").unlink()  # as if killed before the end
    (run_dir / ".rounds.csv.12345.tmp.csv").write_text("half a table")  # a killed atomic write
    with pytest.raises(SystemExit) as exit_info:
        call_main(owl, tiny_argv(data_dir, results))
    assert exit_info.value.code == 2
    assert "interrupted run" in capsys.readouterr().err
    call_main(owl, tiny_argv(data_dir, results, "--resume"))
    assert (run_dir / "metrics.json").exists() and no_temporary_files(run_dir)


def test_moved_results_tree_with_its_data_resumes(data_dir, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(data_dir, old / "data")
    call_main(owl, tiny_argv(old / "data", old / "results"))
    settings = json.loads((old / "results" / "train_owl_gps" / "fuzz" / "resume_settings.json").read_text())
    assert settings["data_dir"] == "../../../data"
    new = tmp_path / "new"
    shutil.move(old, new)
    before = files_under(new / "results")
    metrics = call_main(owl, tiny_argv(new / "data", new / "results", "--resume", "--n_rounds", "3"))
    assert metrics["n_rounds"] == 3 and before <= files_under(new / "results")
    # Moved without its data, the run is refused: the data folder is another one.
    shutil.copytree(new / "data", tmp_path / "elsewhere" / "data")
    with pytest.raises(SystemExit):
        call_main(
            owl, tiny_argv(tmp_path / "elsewhere" / "data", new / "results", "--resume", "--n_rounds", "4")
        )
    assert "data_dir" in capsys.readouterr().err
