"""train_owl_gps.py end to end: --help, the demo (documented files + learning check), strategy
comparison, exact resume, the CSV oracle round trip, the GeoTIFF path and bad inputs."""

import csv
import json
import re

import numpy as np
import pytest
from conftest import assert_main_error, assert_tensorboard_holds_log, call_main, run_script

import train_owl_gps as owl
from common import atomic
from common.owl_gps import datasets

SCRIPT = "train_owl_gps.py"
# Tiny settings for everything but the learning check: 16 px patches, 2 epochs.
TINY = (
    "--n_samples 120 --image_size 16 --epochs 2 --initial_budget 10 --query_budget 8 --deterministic".split()
)


def run_main(*arguments):
    return call_main(owl, [str(a) for a in arguments])


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def without_seconds(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def expect_input_error(capsys, arguments, fragment):
    """main() as the command line runs it: one `error: <file>: ...` line on stderr, exit code 2."""
    capsys.readouterr()
    return assert_main_error(capsys, lambda: run_main(*arguments), fragment)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default demo (tutorial sizes), run once as a user would."""
    results = tmp_path_factory.mktemp("owl_demo")
    completed = run_script(SCRIPT, "--demo", "--results_dir", results)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed, results, results / "train_owl_gps" / "demo"


def test_help():
    result = run_script(SCRIPT, "--help")
    assert result.returncode == 0
    for flag in (
        "--query_strategy",
        "--uncertainty",
        "--alpha_schedule",
        "--oracle",
        "--concept_weights",
        "--resume",
    ):
        assert flag in result.stdout


def test_demo_writes_documented_files(demo):
    _, results, run_dir = demo
    for name in (
        "config.json",
        "rounds.csv",
        "labels.csv",
        "auc_curve.png",
        "metrics.json",
        "model.keras",
        "checkpoints/state.json",
        "checkpoints/round_010.npz",
    ):
        assert (run_dir / name).is_file(), name
    for name in ("images.npy", "labels.npy", "concepts.csv"):
        assert (results / "demo_data" / "train_owl_gps" / name).is_file()


def test_demo_round_table_and_label_store(demo):
    _, _, run_dir = demo
    rounds = read_csv(run_dir / "rounds.csv")
    assert [int(r["n_labeled"]) for r in rounds] == list(range(20, 120, 10))
    assert rounds[-1]["meta_query_loss"] == "nan" and float(rounds[0]["meta_query_loss"]) > 0
    labels = read_csv(run_dir / "labels.csv")
    assert len(labels) == 110 == len({row["id"] for row in labels})
    assert sum(row["strategy"] == "initial" for row in labels) == 20


def test_demo_tensorboard_holds_the_round_table(demo):
    _, _, run_dir = demo
    scalars = assert_tensorboard_holds_log(run_dir, "rounds.csv", step_column="round")
    assert sorted(scalars["test_auc"]) == list(range(1, 11)) and "round" not in scalars


def test_demo_learns_and_prints_the_metrics(demo):
    """The concept AUC is clearly above chance, and the summary line shows metrics.json's figure."""
    completed, _, run_dir = demo
    rounds = read_csv(run_dir / "rounds.csv")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final_auc = metrics["final_test_auc"]["concept"]
    assert final_auc == pytest.approx(float(rounds[-1]["test_auc"]))
    assert final_auc > 0.7, final_auc
    summary = completed.stdout.strip().splitlines()[-1]
    assert summary.startswith("final:") and f"concept={final_auc:.4f}" in summary
    assert "round 10" in completed.stdout


def test_demo_hides_tensorflow_start_up_logs(demo):
    completed, _, _ = demo
    assert "cpu_feature_guard" not in completed.stderr


def test_strategy_all_with_seeds_plots_four_strategies(tmp_path):
    run_main(
        "--demo",
        *TINY,
        "--n_rounds",
        "2",
        "--query_strategy",
        "all",
        "--seeds",
        "2",
        "--results_dir",
        tmp_path,
    )
    run_dir = tmp_path / "train_owl_gps" / "demo"
    comparison = read_csv(run_dir / "strategy_comparison.csv")
    assert sorted({row["strategy"] for row in comparison}) == sorted(owl.STRATEGIES)
    assert all(row["n_seeds"] == "2" for row in comparison)
    rounds = read_csv(run_dir / "rounds.csv")
    assert len(rounds) == 4 * 2 * 2
    # Identical splits and initial labels across strategies for a given seed.
    initial = {
        strategy: sorted(
            r["id"]
            for r in read_csv(run_dir / f"{strategy}_seed1" / "labels.csv")
            if r["strategy"] == "initial"
        )
        for strategy in owl.STRATEGIES
    }
    assert len({tuple(ids) for ids in initial.values()}) == 1
    first_round = {r["test_auc"] for r in rounds if r["round"] == "1" and r["seed"] == "1"}
    assert len(first_round) == 1, "round 1 trains on the same labels with the same initial weights"
    assert (run_dir / "auc_curve.png").stat().st_size > 1000
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["final_test_auc"]) == set(owl.STRATEGIES)
    # The discovery rate per strategy, its plot and each strategy vs random paired over the 2 seeds.
    assert set(metrics["cumulative_discovery_rate"]) == set(owl.STRATEGIES)
    assert (run_dir / "discovery_curve.png").stat().st_size > 1000
    paired = (run_dir / "discovery_vs_random.md").read_text()
    assert all(f"| {s} vs random | cumulative discovery rate | 2 |" in paired for s in owl.STRATEGIES[:3])
    assert metrics["discovery_vs_random"] in paired


def test_resume_after_round_k_matches_uninterrupted(tmp_path, monkeypatch):
    common = ["--demo", *TINY, "--results_dir", tmp_path, "--uncertainty", "mc_dropout", "--mc_passes", "3"]
    run_main(*common, "--n_rounds", "4", "--run_name", "straight", "--no_tensorboard")
    # Extending a finished 2-round run to 4 rounds.
    run_main(*common, "--n_rounds", "2", "--run_name", "extended")
    run_main(*common, "--n_rounds", "4", "--run_name", "extended", "--resume")
    # A run interrupted in round 3's Reptile step, after round 3's labels reached the store.
    reptile, calls = owl.Learner.reptile, []

    def interrupted_reptile(self, *arguments):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return reptile(self, *arguments)

    monkeypatch.setattr(owl.Learner, "reptile", interrupted_reptile)
    with pytest.raises(SystemExit):
        run_main(*common, "--n_rounds", "4", "--run_name", "crashed")
    crashed = tmp_path / "train_owl_gps" / "crashed"
    assert {row["round"] for row in read_csv(crashed / "labels.csv")} == {"0", "1", "2", "3"}
    monkeypatch.setattr(owl.Learner, "reptile", reptile)
    run_main(*common, "--n_rounds", "4", "--run_name", "crashed", "--resume")
    straight = tmp_path / "train_owl_gps" / "straight"
    expected_rounds = without_seconds(read_csv(straight / "rounds.csv"))
    assert len(expected_rounds) == 4
    for other in ("extended", "crashed"):
        other = tmp_path / "train_owl_gps" / other
        assert without_seconds(read_csv(other / "rounds.csv")) == expected_rounds
        assert read_csv(other / "labels.csv") == read_csv(straight / "labels.csv")
        assert (other / "metrics.json").read_text() == (straight / "metrics.json").read_text()
        # TensorBoard keeps the newest value of a round: that of rounds.csv, redone rounds included.
        assert sorted(assert_tensorboard_holds_log(other, "rounds.csv", "round")["train_loss"]) == [
            1,
            2,
            3,
            4,
        ]
    assert not (straight / "tensorboard").exists()


def test_resume_with_changed_settings_is_refused(tmp_path, capsys):
    common = ["--demo", *TINY, "--n_rounds", "1", "--results_dir", tmp_path]
    run_main(*common)
    expect_input_error(capsys, [*common, "--resume", "--alpha", "0.7"], "alpha=0.5 (now 0.7)")


def test_ensemble_and_linear_schedule_run(tmp_path):
    run_main(
        "--demo",
        *TINY,
        "--n_rounds",
        "2",
        "--uncertainty",
        "ensemble",
        "--ensemble_size",
        "2",
        "--alpha_schedule",
        "linear",
        "--results_dir",
        tmp_path,
    )
    run_dir = tmp_path / "train_owl_gps" / "demo"
    assert (run_dir / "model.keras").is_file() and (run_dir / "model_member1.keras").is_file()
    assert [float(r["alpha"]) for r in read_csv(run_dir / "rounds.csv")] == pytest.approx([0.3, 0.8])


def test_progress_bar_of_rounds_on_stderr_only_with_progress(tmp_path, capsys):
    arguments = ["--demo", *TINY, "--n_rounds", "2", "--results_dir", tmp_path, "--no_tensorboard"]
    capsys.readouterr()
    run_main(*arguments, "--run_name", "quiet")
    quiet = capsys.readouterr()
    run_main(*arguments, "--run_name", "shown", "--progress")
    shown = capsys.readouterr()
    bar = re.compile(r"concept seed 0 rounds: +100%\|.*\| 2/2 \[\d\d:\d\d<00:00, +[\d.]+(s/round|round/s)\]")
    assert bar.search(shown.err) and "rounds:" not in quiet.err
    # Standard output (the log) is the same either way but for the run folder's name.
    assert "%|" not in shown.out and len(shown.out.splitlines()) == len(quiet.out.splitlines())


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    arguments = ["--demo", *TINY, "--n_rounds", "1", "--results_dir", tmp_path]
    run_main(*arguments)
    before = (tmp_path / "train_owl_gps" / "demo" / "metrics.json").read_bytes()
    expect_input_error(capsys, arguments, "a finished run with this name exists")
    assert (tmp_path / "train_owl_gps" / "demo" / "metrics.json").read_bytes() == before


def test_csv_oracle_round_trip_equals_simulated_run(tmp_path, capsys):
    """A person answering with the true labels reproduces the simulated run exactly."""
    common = ["--demo", *TINY, "--n_rounds", "3", "--results_dir", tmp_path]
    run_main(*common, "--run_name", "simulated")
    truth = np.load(tmp_path / "demo_data" / "train_owl_gps" / "labels.npy")
    run_dir = tmp_path / "train_owl_gps" / "human"
    assert run_main(*common, "--run_name", "human", "--oracle", "csv") is None
    for round_number in range(3):
        queue_path = run_dir / f"queue_round{round_number}.csv"
        assert (run_dir / f"queue_round{round_number}.png").stat().st_size > 1000
        rows = read_csv(queue_path)
        assert rows and all(row["label"] == "" for row in rows)
        if round_number == 1:
            # A blank answer is refused with one line and the label store is left as it was.
            store_before = (run_dir / "labels.csv").read_bytes()
            expect_input_error(
                capsys, [*common, "--run_name", "human", "--oracle", "csv", "--resume"], "blank label for id"
            )
            assert (run_dir / "labels.csv").read_bytes() == store_before
            bad = [{**row, "label": "2" if i == 0 else truth[int(row["id"])]} for i, row in enumerate(rows)]
            atomic.write_csv(queue_path, bad, list(rows[0]))
            expect_input_error(
                capsys, [*common, "--run_name", "human", "--oracle", "csv", "--resume"], "is not 0/1"
            )
            assert (run_dir / "labels.csv").read_bytes() == store_before
        filled = [{**row, "label": int(truth[int(row["id"])])} for row in rows]
        atomic.write_csv(queue_path, filled, list(rows[0]))
        result = run_main(*common, "--run_name", "human", "--oracle", "csv", "--resume")
        assert (result is None) == (round_number < 2)
    simulated = tmp_path / "train_owl_gps" / "simulated"
    assert without_seconds(read_csv(simulated / "rounds.csv")) == without_seconds(
        read_csv(run_dir / "rounds.csv")
    )
    assert read_csv(simulated / "labels.csv") == read_csv(run_dir / "labels.csv")
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:rasterio.*")
def test_geotiff_with_concepts_and_labels_csv(tmp_path):
    from common.raster import write_geotiff

    rng = np.random.default_rng(0)
    scene = rng.random((4, 16 * 8, 16 * 8)).astype(np.float32)  # an 8 x 8 grid of 16 px patches
    scene[:, 0:3, 16:19] = -9999.0  # patch (0, 1) touches nodata
    write_geotiff(tmp_path / "scene.tif", scene, nodata=-9999.0)
    grid = [(row, col) for row in range(8) for col in range(8)]
    with open(tmp_path / "concepts.csv", "w") as file:
        file.write("row,col,land_cover,dist_industrial\n")
        file.writelines(f"{r},{c},{(r + c) % 4},{rng.random():.3f}\n" for r, c in grid)
    with open(tmp_path / "labels.csv", "w") as file:
        file.write("row,col,label\n")
        file.writelines(f"{r},{c},{(r * 8 + c) % 3 == 0:d}\n" for r, c in grid)
    run_main(
        "--geotiff",
        tmp_path / "scene.tif",
        "--concepts_csv",
        tmp_path / "concepts.csv",
        "--labels_csv",
        tmp_path / "labels.csv",
        "--patch_size",
        "16",
        "--initial_budget",
        "10",
        "--query_budget",
        "6",
        "--n_rounds",
        "2",
        "--epochs",
        "1",
        "--results_dir",
        tmp_path / "out",
        "--run_name",
        "scene",
    )
    run_dir = tmp_path / "out" / "train_owl_gps" / "scene"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["derived"]["n_samples"] == 63  # the nodata patch is dropped
    labels = read_csv(run_dir / "labels.csv")
    assert len(labels) == 16 and all(row["row"] != "" and row["col"] != "" for row in labels)
    assert ("0", "1") not in {(row["row"], row["col"]) for row in labels}

    # Concepts computed from a land-cover raster (patch majority) and a distance raster (patch mean).
    land_cover = np.kron(np.arange(64).reshape(8, 8) % 4, np.ones((16, 16))).astype(np.uint8)
    write_geotiff(tmp_path / "land_cover.tif", land_cover)
    write_geotiff(tmp_path / "distance.tif", np.full((128, 128), 0.2, np.float32))
    run_main(
        "--geotiff",
        tmp_path / "scene.tif",
        "--land_cover_geotiff",
        tmp_path / "land_cover.tif",
        "--distance_geotiff",
        tmp_path / "distance.tif",
        "--labels_csv",
        tmp_path / "labels.csv",
        "--patch_size",
        "16",
        "--initial_budget",
        "10",
        "--n_rounds",
        "1",
        "--epochs",
        "1",
        "--results_dir",
        tmp_path / "out",
        "--run_name",
        "rasters",
    )
    assert (tmp_path / "out" / "train_owl_gps" / "rasters" / "metrics.json").is_file()
    data = datasets.load_geotiff_dataset(
        tmp_path / "scene.tif",
        ["urban", "near_industrial"],
        patch_size=16,
        land_cover_geotiff=tmp_path / "land_cover.tif",
        distance_geotiff=tmp_path / "distance.tif",
    )
    expected_urban = [(r * 8 + c) % 4 == 1 for r, c in data["locations"]]
    np.testing.assert_array_equal(data["active"][:, 0], expected_urban)
    assert data["active"][:, 1].all()  # mean distance 0.2 < 0.3


@pytest.fixture
def data_dir(tmp_path):
    images, labels, concepts = datasets.synthetic_dataset(40, 8, 0.3, 0)
    datasets.write_dataset(tmp_path / "data", images, labels, concepts)
    return tmp_path / "data"


@pytest.mark.parametrize(
    "problem, fragment",
    [
        ("rank", "rank 4"),
        ("bands", "has 3 bands in axis 1"),
        ("labels", "label 2 at index 5 is not 0/1"),
        ("fractional_labels", "label 0.5 at index 0 is not 0/1"),
        ("missing_id", "no row for id 7"),
        ("missing_column", "missing column(s) urban"),
        ("nan", "patch 3 contains NaN"),
    ],
)
def test_bad_data_gives_one_line_and_exit_2(data_dir, tmp_path, capsys, problem, fragment):
    images = np.load(data_dir / "images.npy")
    if problem == "rank":
        np.save(data_dir / "images.npy", images[:, 0])
    elif problem == "bands":
        np.save(data_dir / "images.npy", images[:, :3])
    elif problem == "nan":
        images[3, 1, 2, 2] = np.nan
        np.save(data_dir / "images.npy", images)
    elif problem == "labels":
        labels = np.load(data_dir / "labels.npy")
        labels[5] = 2
        np.save(data_dir / "labels.npy", labels)
    elif problem == "fractional_labels":
        np.save(data_dir / "labels.npy", np.full(40, 0.5))
    else:
        lines = (data_dir / "concepts.csv").read_text().splitlines()
        if problem == "missing_id":
            lines = [line for line in lines if not line.startswith("7,")]
        else:
            lines = [
                ",".join(part for i, part in enumerate(line.split(",")) if i not in (1, 3)) for line in lines
            ]
        (data_dir / "concepts.csv").write_text("\n".join(lines) + "\n")
    line = expect_input_error(
        capsys, ["--data_dir", data_dir, "--results_dir", tmp_path / "out", "--epochs", "1"], fragment
    )
    assert str(data_dir) in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("labels.csv"))


def test_csv_oracle_starts_from_an_unlabelled_pool(data_dir, tmp_path, capsys):
    """No labels.npy: the simulated oracle is refused, a person labels the queues, AUC stays unknown."""
    (data_dir / "labels.npy").unlink()
    base = [
        "--data_dir",
        data_dir,
        "--results_dir",
        tmp_path,
        "--epochs",
        "1",
        "--image_size",
        "8",
        "--initial_budget",
        "4",
        "--query_budget",
        "4",
        "--n_rounds",
        "2",
        "--run_name",
        "pool",
    ]
    expect_input_error(capsys, base, "labels.npy: missing")
    run_dir = tmp_path / "train_owl_gps" / "pool"
    for round_number in range(2):
        assert run_main(*base, "--oracle", "csv", *(["--resume"] if round_number else [])) is None
        queue_path = run_dir / f"queue_round{round_number}.csv"
        rows = read_csv(queue_path)
        atomic.write_csv(queue_path, [{**row, "label": int(row["id"]) % 2} for row in rows], list(rows[0]))
    metrics = run_main(*base, "--oracle", "csv", "--resume")
    assert np.isnan(metrics["final_test_auc"]["concept"]) and metrics["n_labeled"] == 8
    assert "final: test_auc unknown (no test labels)" in capsys.readouterr().out
    assert len(read_csv(run_dir / "labels.csv")) == 8


def test_discovery_counts_equal_the_labels_of_the_queried_patches(demo):
    """rounds.csv's discovery columns recount labels.csv: per round and cumulative, initial labels apart."""
    _, results, run_dir = demo
    rounds = read_csv(run_dir / "rounds.csv")
    labels = read_csv(run_dir / "labels.csv")
    all_labels = np.load(results / "demo_data" / "train_owl_gps" / "labels.npy")
    for row in rounds:
        query_round = int(row["round"]) - 1
        new = [int(r["label"]) for r in labels if int(r["round"]) == query_round]
        queried = [int(r["label"]) for r in labels if 1 <= int(r["round"]) <= query_round]
        assert [int(row["new_labels"]), int(row["new_positives"])] == [len(new), sum(new)]
        assert [int(row["queried"]), int(row["queried_positives"])] == [len(queried), sum(queried)]
        assert float(row["discovery_rate"]) == pytest.approx(sum(new) / len(new))
        if queried:
            assert float(row["cumulative_discovery_rate"]) == pytest.approx(sum(queried) / len(queried))
        else:
            assert row["cumulative_discovery_rate"] == "nan"
    # Each label in the store is the patch's true label (the simulated oracle).
    assert all(int(r["label"]) == all_labels[int(r["id"])] for r in labels)
    assert rounds[0]["new_labels"] == "20" and rounds[-1]["queried"] == "90"
    pool_rate = float(rounds[0]["pool_positive_rate"])
    assert 0 < pool_rate < 1 and {r["pool_positive_rate"] for r in rounds} == {
        rounds[0]["pool_positive_rate"]
    }


def test_discovery_counts_by_round():
    rows = [
        {"round": 0, "label": 1},
        {"round": 0, "label": 0},
        {"round": 1, "label": 1},
        {"round": 2, "label": 0},
    ]
    assert owl.discovery_counts(rows, 1) == {
        "new_labels": 2,
        "new_positives": 1,
        "discovery_rate": 0.5,
        "queried": 0,
        "queried_positives": 0,
        "cumulative_discovery_rate": pytest.approx(float("nan"), nan_ok=True),
    }
    counts = owl.discovery_counts(rows, 3)
    assert (counts["new_positives"], counts["queried"], counts["queried_positives"]) == (0, 2, 1)
    assert counts["cumulative_discovery_rate"] == 0.5
