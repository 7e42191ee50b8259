"""Fuzzing the SPML tools: every file argument empty, truncated and random, every number 0, -1 and huge.

Each case ends with exit 0, or with exit 2, one error line, no traceback and nothing new in the results
folder (conftest's `assert_fuzz_outcome`).
"""

import shutil

import pytest
from conftest import HUGE, assert_fuzz_outcome, call_main, corrupted_copies

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


@pytest.mark.xfail(
    strict=True,
    raises=UnicodeDecodeError,
    reason="common/cli.apply_yaml reads a -c file that is not UTF-8 without catching UnicodeDecodeError",
)
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
    for kind, path in corrupted_copies(answers, tmp_path / "answers"):
        call = lambda path=path: call_main(at, [*base, "--out", path])  # noqa: E731
        assert assert_fuzz_outcome(capsys, call, results, f"--out {kind}") == 2
    for kind, path in config_copies(write_config(tmp_path), tmp_path / "config"):
        call = lambda path=path: call_main(at, [*base, "--out", tmp_path / "new.csv", "-c", path])  # noqa: E731
        assert_fuzz_outcome(capsys, call, results, f"-c {kind}")
    image = sorted((data / "images_tr").rglob("*.jpg"))[2]
    original = image.read_bytes()
    for kind, path in corrupted_copies(image, tmp_path / "image"):
        image.write_bytes(path.read_bytes())
        call = lambda: call_main(at, [*base, "--out", tmp_path / "new.csv"])  # noqa: E731
        assert assert_fuzz_outcome(capsys, call, results, f"image {kind}") == 2
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
