"""segformer_vis.py: --help, the demo, the analysis of a saved SegFormer's encoder (plots, embedding
table, silhouette scores) and a bad input (one error line, exit 2)."""

import csv
import json
from pathlib import Path

import pytest
from conftest import assert_main_error, call_main, run_script

import segformer_vis as vis
import segmentation_train as st
from common import atomic
from common.aras400k import demo_data

SCRIPT = "segformer_vis.py"


def read_csv(path):
    return list(csv.DictReader(Path(path).read_text().splitlines()))


def test_help():
    completed = run_script(SCRIPT, "--help")
    assert completed.returncode == 0
    for flag in ("--image_dirs", "--model", "--samples", "--embeddings", "--demo"):
        assert flag in completed.stdout


@pytest.fixture(scope="module")
def saved_model_run(tmp_path_factory):
    # In-process and t-SNE only: UMAP's numba compilation alone costs about half a minute of CPU.
    results = tmp_path_factory.mktemp("results")
    data = demo_data.write_demo_patches(results / "data", 32, 24, seed=0)
    model_path = results / "best_model.keras"
    atomic.save_keras(st.build_segformer("efficientnetb0", 32, decoder_width=16), model_path)
    folders = f"{data / 'train' / 'images'} {data / 'val' / 'images'}"
    argv = f"""--image_dirs {folders} --model {model_path} --samples 8 --embeddings tsne --batch_size 8
        --run_name analysis --results_dir {results}"""
    return results / "segformer_vis" / "analysis", call_main(vis, argv)


def test_analysis_writes_plots_and_embedding_table(saved_model_run):
    run_dir, _ = saved_model_run
    assert (run_dir / "tsne.png").is_file()
    rows = read_csv(run_dir / "embedding.csv")
    assert len(rows) == 16 and set(rows[0]) == {"file", "folder", "tsne_x", "tsne_y"}


def test_analysis_scores_folders(saved_model_run, capsys):
    run_dir, returned = saved_model_run
    scores = json.loads((run_dir / "silhouette.json").read_text())
    assert scores == returned
    assert set(scores["overall"]) == {"features", "tsne"}
    assert -1 <= scores["overall"]["features"] <= 1
    assert list(scores["pairwise"]) == ["train vs val"]
    assert scores["images_per_folder"] == {"train": 8, "val": 8}


def test_demo_prints_the_summary(tmp_path):
    completed = run_script(SCRIPT, "--demo", "--samples", 8, "--results_dir", tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    scores = json.loads((tmp_path / "segformer_vis" / "demo" / "silhouette.json").read_text())
    assert completed.stdout.strip().splitlines()[-1] == scores["summary"]
    assert list(scores["pairwise"]) == ["real vs synthetic"]


def test_one_folder_is_an_error(tmp_path, capsys):
    argv = ["--image_dirs", tmp_path, "--results_dir", tmp_path / "results"]
    assert_main_error(capsys, lambda: call_main(vis, argv), "--image_dirs", "two or more")
    assert not (tmp_path / "results").exists()


def test_labels_are_distinct_before_any_work(tmp_path, capsys):
    real, synth = tmp_path / "real" / "train" / "images", tmp_path / "synth" / "train" / "images"
    assert vis.folder_labels([real, synth], []) == ["real/train", "synth/train"]
    assert vis.folder_labels([real, synth], ["Real", "Synthetic"]) == ["Real", "Synthetic"]
    for folder in (real, synth):
        folder.mkdir(parents=True)
    argv = ["--image_dirs", real, synth, "--labels", "a", "a", "--results_dir", tmp_path / "results"]
    assert_main_error(capsys, lambda: call_main(vis, argv), "--labels", "distinct names")
    assert not (tmp_path / "results").exists()


def test_defaults_are_the_reference_values():
    args = vis.get_args_parser().parse_args([])
    assert (args.samples, args.seed) == (50000, 42)
