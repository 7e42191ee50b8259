"""Fuzzing the SPML tools: every file argument empty, truncated and random, every number 0, -1 and huge.

Each case ends with exit 0, or with exit 2, one error line, no traceback and nothing new in the results
folder (conftest's `assert_fuzz_outcome`).
"""

import shutil

import pytest
from conftest import HUGE, assert_fuzz_outcome, call_main, corrupted_copies, fuzz_file_flag, swapped_in

import annotation_tool as at
import make_benv2_lmdb as mk
from common.spml import aid_multilabel

BAD_NUMBERS = (0, -1, HUGE)


def write_config(folder, text="seed: 3\n"):
    path = folder / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_copies(valid_file, folder):
    """The empty and truncated -c files (random bytes: see the expected failure below)."""
    return [(kind, path) for kind, path in corrupted_copies(valid_file, folder) if kind != "random"]


def test_a_config_file_of_random_bytes_is_one_line(tmp_path, capsys):
    path = dict(corrupted_copies(write_config(tmp_path), tmp_path / "config"))["random"]
    call = lambda: call_main(mk, ["--s2_dir", tmp_path, "-c", path])  # noqa: E731
    assert_fuzz_outcome(capsys, call, tmp_path / "results", "-c random")


# ---- annotation_tool.py ----


@pytest.fixture
def annotation_inputs(tmp_path, monkeypatch):
    """An AID tree, a valid answers CSV, and a server that stops at once instead of serving."""

    def stop_at_once(self, *args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl+C does: the tool prints where the answers are and ends

    monkeypatch.setattr(at.AnnotationServer, "serve_forever", stop_at_once)
    data = aid_multilabel.write_demo(tmp_path / "aid", num_images=8, seed=1, image_size=32)
    return data, data / aid_multilabel.MANUAL_CSV, tmp_path / "results"


def test_annotation_tool_fuzzed_files(annotation_inputs, tmp_path, capsys):
    data, answers, results = annotation_inputs
    base = ["--data_dir", data, "--port", "0", "--results_dir", results]
    fuzz_file_flag(capsys, at, [*base, "--out", answers], "--out", answers, tmp_path / "answers", results)
    for kind, path in config_copies(write_config(tmp_path), tmp_path / "config"):
        call = lambda path=path: call_main(at, [*base, "--out", tmp_path / "new.csv", "-c", path])  # noqa: E731
        assert_fuzz_outcome(capsys, call, results, f"-c {kind}")
    image = sorted((data / "images_tr").rglob("*.jpg"))[2]
    original = image.read_bytes()
    try:
        argv = swapped_in(image, [*base, "--out", tmp_path / "new.csv"])
        fuzz_file_flag(capsys, at, argv, None, image, tmp_path / "image", results)
    finally:
        image.write_bytes(original)
    assert not (tmp_path / "new.csv").exists()


@pytest.mark.parametrize("flag", ["--port", "--seed"])
def test_annotation_tool_fuzzed_numbers(annotation_inputs, tmp_path, capsys, flag):
    data, _, results = annotation_inputs
    base = ["--data_dir", data, "--port", "0", "--out", tmp_path / "new.csv", "--results_dir", results]
    for value in BAD_NUMBERS:
        call = lambda value=value: call_main(at, [*base, flag, value])  # noqa: E731
        code = assert_fuzz_outcome(capsys, call, results, f"{flag} {value}")
        assert code == (2 if flag == "--port" and value != 0 else 0)


# ---- make_benv2_lmdb.py ----


@pytest.fixture(scope="module")
def benv2_tiffs(tmp_path_factory):
    return mk.write_demo_tiffs(tmp_path_factory.mktemp("benv2_fuzz") / "tiffs", 3, seed=0)


def benv2_argv(tiffs, results, metadata=None):
    return [
        "--s2_dir",
        tiffs / "BigEarthNet-S2",
        "--reference_maps_dir",
        tiffs / "Reference_Maps",
        "--metadata",
        metadata or tiffs / "metadata.parquet",
        "--split_lmdbs",
        "--out",
        results / "BigEarthNetV2",
        "--results_dir",
        results,
    ]


def test_make_benv2_lmdb_fuzzed_files(benv2_tiffs, tmp_path, capsys):
    results = tmp_path / "results"
    assert (
        assert_fuzz_outcome(capsys, lambda: call_main(mk, benv2_argv(benv2_tiffs, results)), results, "ok")
        == 0
    )
    shutil.rmtree(results)
    for kind, path in corrupted_copies(benv2_tiffs / "metadata.parquet", tmp_path / "metadata"):
        call = lambda path=path: call_main(mk, benv2_argv(benv2_tiffs, results, path))  # noqa: E731
        assert assert_fuzz_outcome(capsys, call, results, f"--metadata {kind}") == 2
    for kind, path in config_copies(write_config(tmp_path, "overwrite: true\n"), tmp_path / "config"):
        call = lambda path=path: call_main(mk, [*benv2_argv(benv2_tiffs, results), "-c", path])  # noqa: E731
        if assert_fuzz_outcome(capsys, call, results, f"-c {kind}") == 0:
            shutil.rmtree(results)
    band = next((benv2_tiffs / "BigEarthNet-S2").rglob("*_B05.tif"))
    reference = next((benv2_tiffs / "Reference_Maps").rglob("*_reference_map.tif"))
    for original in (band, reference):
        saved = original.read_bytes()
        try:
            for kind, path in corrupted_copies(original, tmp_path / original.stem):
                original.write_bytes(path.read_bytes())
                call = lambda: call_main(mk, benv2_argv(benv2_tiffs, results))  # noqa: E731
                assert assert_fuzz_outcome(capsys, call, results, f"{original.name} {kind}") == 2
        finally:
            original.write_bytes(saved)


# ---- test_multilabel_model.py (on a one-epoch run of the trainer's demo) ----


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import train_multilabel_model as tm

    results = tmp_path_factory.mktemp("spml_fuzz") / "results"
    tiny = ["--demo_images", "48", "--image_size", "24", "--batch_size", "16"]
    call_main(tm, ["--demo", "--method", "an", "--epochs", "1", "--results_dir", results, *tiny])
    base = ["--demo", "--method", "an", "--results_dir", results, *tiny]
    return results, results / "train_multilabel_model" / "demo_an", base


def run_files(results, run_dir):
    data = results / "demo_data" / "train_multilabel_model" / "aid"
    return {
        "labels CSV": data / aid_multilabel.LABELS_CSV,
        "single positives CSV": data / "single_positive_labels_random_seed0.csv",
        "test image": sorted((data / "images_test").rglob("*.jpg"))[0],
    }


def fuzz_run_file(capsys, tmp_path, trained_run, name, original):
    import test_multilabel_model as tmm

    results, _, base = trained_run
    saved = original.read_bytes()
    try:
        folder = tmp_path / name.replace(" ", "_")
        fuzz_file_flag(capsys, tmm, swapped_in(original, base), None, original, folder, results)
    finally:
        original.write_bytes(saved)


def test_test_multilabel_model_fuzzed_files(trained_run, tmp_path, capsys):
    import test_multilabel_model as tmm

    results, run_dir, base = trained_run
    for name, original in run_files(results, run_dir).items():
        fuzz_run_file(capsys, tmp_path, trained_run, name, original)
    for kind, path in config_copies(write_config(tmp_path), tmp_path / "config"):
        call = lambda path=path: call_main(tmm, [*base, "-c", path])  # noqa: E731
        assert_fuzz_outcome(capsys, call, results, f"-c {kind}")


@pytest.mark.parametrize("flag", ["--batch_size", "--image_size", "--seed"])
def test_test_multilabel_model_fuzzed_numbers(trained_run, capsys, flag):
    import test_multilabel_model as tmm

    results, _, base = trained_run
    for value in BAD_NUMBERS:
        call = lambda value=value: call_main(tmm, [*base, flag, value])  # noqa: E731
        assert_fuzz_outcome(capsys, call, results, f"{flag} {value}")


def test_test_multilabel_model_fuzzed_run_config(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    fuzz_run_file(capsys, tmp_path, trained_run, "config.json", run_dir / "config.json")


def test_test_multilabel_model_fuzzed_best_model(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    fuzz_run_file(capsys, tmp_path, trained_run, "best_model.keras", run_dir / "best_model.keras")
