"""Fuzzing the TG-MATL scripts: bad files and bad numbers end in exit 0 or one error line, nothing written.

Each file argument gets an empty file, a truncated copy of a valid one and random bytes; each numeric
flag 0, -1 and 10**12. A run either finishes (exit 0, on tiny data with 1-2 epochs) or stops with
exit 2, one `error:` line, no traceback and no new file under --results_dir. Huge values are refused
by an upper bound (epochs, batch size = at most the samples, workers, seed, learning rate, shares,
test size) or are legal and fast (the margin: a larger triplet margin costs nothing).
"""

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    HUGE,
    assert_fuzz_outcome,
    call_main,
    corrupted_copies,
    files_under,
    fuzz_file_flag,
    with_flag,
)

import extract_embeddings
import igarss_exp1
import igarss_exp1_sweep
import igarss_exp2
import igarss_exp2_sweep
from common.tgmatl import awir

BAD_NUMBERS = (0, -1, HUGE)
# The numeric flags of each script (--folds of the exp2 scripts is a list of fold numbers, fuzzed too).
EXP1_FLAGS = (
    "margin",
    "box_weight",
    "top_percent",
    "random_percent",
    "batch_size",
    "test_size",
    "epochs",
    "learning_rate",
    "workers",
    "seed",
    "calibration_epochs",
)
SWEEP_GRID_FLAGS = ("top_percents", "random_percents")
EXP1_SWEEP_FLAGS = (*(f for f in EXP1_FLAGS if f != "calibration_epochs"), *SWEEP_GRID_FLAGS)
EXP2_FLAGS = (
    "batch_size",
    "test_size",
    "epochs",
    "learning_rate",
    "workers",
    "seed",
    "calibration_epochs",
    "margin",
    "top_percent",
    "random_percent",
    "folds",
)
EXP2_SWEEP_FLAGS = (
    "batch_size",
    "test_size",
    "epochs",
    "learning_rate",
    "workers",
    "seed",
    "folds",
    "top_percents",
    "random_percents",
)


@pytest.fixture(scope="module")
def tiny_awir(tmp_path_factory):
    """A 48-sample AWIR-like data.npz with 8-d embeddings (valid inputs to corrupt)."""
    folder = tmp_path_factory.mktemp("awir")
    widths = dict.fromkeys(awir.EMBEDDING_NAMES, 8)
    data, embeddings = awir.make_demo_data(folder, num_samples=48, seed=0, widths=widths)
    return data, embeddings


def common_argv(data, embeddings, results):
    return [
        "--data",
        data,
        "--embeddings_dir",
        embeddings,
        "--results_dir",
        results,
        "--embeddings",
        "clip",
        "--test_size",
        "0.5",
        "--batch_size",
        "8",
        "--workers",
        "1",
    ]


def exp1_argv(data, embeddings, results):
    quick = ["--methods", "dtl", "--epochs", "1", "--calibration_epochs", "0", "--views"]
    return [*common_argv(data, embeddings, results), *quick]


def exp1_sweep_argv(data, embeddings, results):
    grid = ["--top_percents", "0.5", "--random_percents", "0.1"]
    return [*common_argv(data, embeddings, results), "--epochs", "1", *grid]


def exp2_argv(data, embeddings, results):
    extra = ["--methods", "base", "--folds", "1", "2", "--epochs", "1", "--calibration_epochs", "0"]
    return [*common_argv(data, embeddings, results), *extra]


def exp2_sweep_argv(data, embeddings, results):
    grid = ["--top_percents", "0.5", "--random_percents", "0.1", "--folds", "1"]
    return [*common_argv(data, embeddings, results), "--epochs", "1", *grid]


SCRIPTS = {
    "igarss_exp1": (igarss_exp1, exp1_argv, EXP1_FLAGS),
    "igarss_exp1_sweep": (igarss_exp1_sweep, exp1_sweep_argv, EXP1_SWEEP_FLAGS),
    "igarss_exp2": (igarss_exp2, exp2_argv, EXP2_FLAGS),
    "igarss_exp2_sweep": (igarss_exp2_sweep, exp2_sweep_argv, EXP2_SWEEP_FLAGS),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_numeric_flags_end_in_a_run_or_one_line(script, tiny_awir, tmp_path, capsys):
    module, make_argv, flags = SCRIPTS[script]
    data, embeddings = tiny_awir
    codes = {}
    for flag in flags:
        for value in BAD_NUMBERS:
            results = tmp_path / f"{flag}_{value}"
            argv = with_flag(make_argv(data, embeddings, results), f"--{flag}", value)
            case = f"{script} --{flag} {value}"
            codes[case] = assert_fuzz_outcome(
                capsys, lambda argv=argv: call_main(module, argv), results, case
            )
    # The slips the bad-input report named are refused (exit 2), never run.
    for flag in ("epochs", "batch_size", "test_size", "workers", "learning_rate"):
        if flag in flags:
            assert codes[f"{script} --{flag} 0"] == 2 and codes[f"{script} --{flag} -1"] == 2
            assert codes[f"{script} --{flag} {HUGE}"] == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_damaged_data_and_embeddings_end_in_one_line(script, tiny_awir, tmp_path, capsys):
    module, make_argv, _ = SCRIPTS[script]
    data, embeddings = tiny_awir
    results = tmp_path / "results"
    base = make_argv(data, embeddings, results)
    fuzz_file_flag(capsys, module, base, "--data", data, tmp_path / "data", results)
    clip = awir.embedding_path(embeddings, "clip")
    in_folder = lambda bad: make_argv(data, bad.parent, results)  # noqa: E731
    fuzz_file_flag(capsys, module, in_folder, None, clip, tmp_path / "embeddings", results)


def test_empty_and_truncated_data_name_the_file(tiny_awir, tmp_path, capsys):
    """The two archives that ended in EOFError / BadZipFile tracebacks now end in one line naming the file."""
    data, embeddings = tiny_awir
    copies = dict(corrupted_copies(data, tmp_path / "data"))
    for kind in ("empty", "truncated"):
        argv = exp1_argv(copies[kind], embeddings, tmp_path / "results")
        with pytest.raises(SystemExit) as exit_info:
            call_main(igarss_exp1, argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: {copies[kind]}: cannot be read as .npz"), error
    assert not files_under(tmp_path / "results")


def unwritable_places(tmp_path):
    """A results dir that is a file, one under a file, and (where it can be made) a read-only folder."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    places = {"a file": blocker, "under a file": blocker / "results"}
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if not os.access(locked, os.W_OK):
        places["read-only"] = locked / "results"
    elif Path("/proc").is_dir():
        places["read-only"] = Path("/proc") / "rsrepro_results"  # root writes anywhere but there
    return places


@pytest.mark.parametrize("script", SCRIPTS)
def test_results_dir_that_cannot_be_written_is_refused_first(script, tiny_awir, tmp_path, capsys):
    module, make_argv, _ = SCRIPTS[script]
    data, embeddings = tiny_awir
    for kind, place in unwritable_places(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            call_main(module, make_argv(data, embeddings, place))
        assert exit_info.value.code == 2, kind
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "--results_dir" in error[0], (kind, error)


def test_extract_embeddings_fuzz(tmp_path, capsys):
    """extract_embeddings.py: a damaged data.npz and bad numbers end in one line; output folder untouched."""
    data = tmp_path / "data.npz"
    extract_embeddings.make_demo_data(data, 8, np.random.default_rng(0))
    models = extract_embeddings.make_demo_models(tmp_path / "models")
    output = tmp_path / "embeddings"
    base = ["--model", "clip", "--model_path", models["clip"], "--embeddings_dir", output, "--device", "cpu"]
    fuzz_file_flag(
        capsys, extract_embeddings, ["--data", data, *base], "--data", data, tmp_path / "bad", output
    )
    for flag in ("batch_size", "checkpoint_every", "seed"):
        for value in BAD_NUMBERS:
            argv = ["--data", data, *base, "--overwrite", f"--{flag}", value]
            case = f"--{flag} {value}"
            assert_fuzz_outcome(capsys, lambda argv=argv: call_main(extract_embeddings, argv), output, case)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    argv = ["--data", data, *base[:4], "--embeddings_dir", blocker, "--device", "cpu"]
    assert_fuzz_outcome(capsys, lambda: call_main(extract_embeddings, argv), blocker.parent / "none", "file")
