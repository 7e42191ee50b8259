"""Unit tests of the small common/ modules: errors, atomic, runs, cli, checkpoints, pipelines, reports."""

import argparse
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from common import atomic, checkpoints, cli, parallel, pipelines, reports, runs
from common.errors import InputError, cli_entry, require, require_finite

# ---- errors ----


def test_input_error_is_one_line_with_expectation():
    error = InputError("data.npz", "missing key 'box_label'", "arrays class_label and box_label")
    assert str(error) == "data.npz: missing key 'box_label'; expected arrays class_label and box_label"


def test_cli_entry_turns_input_error_into_exit_2(capsys):
    @cli_entry
    def main():
        require(False, "x.csv", "row 3 is empty", "id,label")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: x.csv: row 3 is empty; expected id,label\n"


def test_require_finite_names_the_first_bad_index():
    with pytest.raises(InputError, match=r"first at index \(1, 2\)"):
        require_finite(np.array([[0.0, 1.0, 2.0], [3.0, 4.0, np.nan]]), "e.npy")


def test_input_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(InputError("a", "b", "c")))
    assert (error.path, error.problem, error.expected) == ("a", "b", "c")


# ---- atomic ----


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    atomic.write_json(path, {"a": np.float32(1.5), "b": np.arange(2)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1]}
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError
    assert json.loads(path.read_text())["a"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_atomic_npz_and_weights_keep_their_format(tmp_path):
    atomic.save_npz(tmp_path / "a.npz", {"x": np.ones(3)})
    with np.load(tmp_path / "a.npz") as stored:
        assert stored["x"].sum() == 3
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    atomic.save_weights(model, tmp_path / "m.weights.h5")
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    other.load_weights(tmp_path / "m.weights.h5")
    assert np.array_equal(other.get_weights()[0], model.get_weights()[0])


# ---- runs ----


def test_check_same_settings_refuses_a_changed_value(tmp_path):
    record = tmp_path / "config.json"
    atomic.write_json(record, {"args": {"margin": 0.1, "epochs": 5, "bands": [1, 2]}})
    same = runs.check_same_settings(record, {"margin": 0.1, "bands": (1, 2)}, section="args")
    assert same == {"margin": 0.1, "bands": (1, 2)}
    with pytest.raises(InputError, match=r"margin=0.1 \(now 0.2\)"):
        runs.check_same_settings(record, {"margin": 0.2}, section="args")
    with pytest.raises(InputError, match=r"seed=\(unset\) \(now 3\)"):
        runs.check_same_settings(record, {"seed": 3}, section="args")
    assert runs.check_same_settings(record, {"margin": 0.2}, overwrite=True, section="args") == {
        "margin": 0.2
    }


def test_prepare_run_dir_refuses_a_finished_run(tmp_path):
    run_dir = runs.prepare_run_dir(tmp_path, "script", "a")
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match="a finished run with this name exists"):
        runs.prepare_run_dir(tmp_path, "script", "a")
    assert runs.prepare_run_dir(tmp_path, "script", "a", resume=True) == run_dir
    runs.prepare_run_dir(tmp_path, "script", "a", overwrite=True)
    assert not (run_dir / "metrics.json").exists()


def test_prepare_run_dir_refuses_an_interrupted_run_and_cleans_on_resume(tmp_path):
    """An interrupted run is never restarted silently; --resume removes temporaries of killed writes."""
    run_dir = runs.prepare_run_dir(tmp_path, "script", "a")
    (run_dir / "checkpoint_epoch004.npz").write_bytes(b"state")
    (run_dir / ".log.csv.x1y2.tmp.csv").write_text("half a row")
    with pytest.raises(InputError, match=r"an interrupted run with this name exists \(no metrics.json\)"):
        runs.prepare_run_dir(tmp_path, "script", "a")
    assert (run_dir / "checkpoint_epoch004.npz").read_bytes() == b"state"
    assert runs.prepare_run_dir(tmp_path, "script", "a", resume=True) == run_dir
    assert (run_dir / "checkpoint_epoch004.npz").exists()
    assert not (run_dir / ".log.csv.x1y2.tmp.csv").exists()
    runs.prepare_run_dir(tmp_path, "script", "a", overwrite=True)
    assert not any(run_dir.iterdir())
    runs.prepare_run_dir(tmp_path, "script", "a")  # an empty folder is no interrupted run


def test_prepare_run_dir_names_a_file_or_unwritable_folder(tmp_path):
    (tmp_path / "script").mkdir()
    (tmp_path / "script" / "a").write_text("not a folder")
    with pytest.raises(InputError, match="is a file"):
        runs.prepare_run_dir(tmp_path, "script", "a")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the results tree should be")
    with pytest.raises(InputError, match="cannot write there"):
        runs.prepare_run_dir(blocker, "script", "b")


def test_input_paths_are_recorded_relative_to_the_run_folder(tmp_path):
    """A results tree moved together with its inputs records the same input settings."""
    args = argparse.Namespace(data_root=str(tmp_path / "old" / "chips"), epochs=3, weights="")
    before = runs.settings_of(
        args,
        ("data_root", "epochs", "weights"),
        tmp_path / "old" / "results" / "run",
        ("data_root", "weights"),
    )
    args.data_root = str(tmp_path / "new" / "chips")
    after = runs.settings_of(
        args,
        ("data_root", "epochs", "weights"),
        tmp_path / "new" / "results" / "run",
        ("data_root", "weights"),
    )
    assert before == after == {"data_root": "../../chips", "epochs": 3, "weights": ""}
    record = tmp_path / "config.json"
    record.write_text(json.dumps(before))
    runs.check_same_settings(record, after)
    moved_alone = runs.settings_of(
        args, ("data_root",), tmp_path / "elsewhere" / "deep" / "run", ("data_root",)
    )
    with pytest.raises(InputError, match="data_root"):
        runs.check_same_settings(record, moved_alone)


# ---- cli ----


def make_parser():
    parser = cli.Parser(config_flag=True)
    parser.add_argument("--epochs", type=int, default=20, help="Epochs.")
    parser.add_argument("--method", default="an", choices=("an", "adagc"), help="Loss.")
    parser.add_argument("--augment", type=cli.str2bool, default=True, help="Flips.")
    cli.add_demo_argument(parser)
    parser.demo_defaults(epochs=3)
    return parser


def test_demo_defaults_never_override_a_typed_flag():
    parser = make_parser()
    assert parser.parse_args([]).epochs == 20
    assert parser.parse_args(["--demo"]).epochs == 3
    typed = parser.parse_args("--demo --epochs 20".split())
    assert typed.epochs == 20 and cli.typed_flags(typed) == {"demo", "epochs"}
    assert "typed" not in vars(typed)


def test_help_shows_the_paper_default_and_the_demo_value():
    text = " ".join(make_parser().format_help().split())
    assert "Epochs. (--demo: 3) (default: 20)" in text


def test_yaml_overlay_sits_between_typed_flags_and_demo(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"epochs": 7, "method": "adagc", "augment": "false"}))
    parser = make_parser()
    args = parser.parse_args(["--config", str(config), "--demo"])
    assert (args.epochs, args.method, args.augment) == (7, "adagc", False)
    assert parser.parse_args(["--config", str(config), "--epochs", "2"]).epochs == 2


def test_bad_yaml_at_parse_time_is_one_line_and_exit_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("epochz: 3")
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse_args(["-c", str(config)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {config}: unknown key(s): epochz")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("epochz: 3", "unknown key"),
        ("method: xx", "unknown value 'xx' for method"),
        ("epochs: [", "not valid YAML"),
    ],
)
def test_bad_yaml_is_one_input_error(tmp_path, content, message):
    config = tmp_path / "c.yaml"
    config.write_text(content)
    parser = make_parser()
    with pytest.raises(InputError, match=message):
        cli.apply_yaml(parser.parse_args([]), parser, config)


# ---- checkpoints ----


def small_model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dense(1, name="out")]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.MeanSquaredError())
    model.fit(np.ones((8, 3)), np.ones((8, 1)), epochs=1, verbose=0)
    return model


def test_checkpoint_round_trip_by_variable_path(tmp_path):
    model = small_model(0)
    arrays = checkpoints.model_arrays(model)
    assert "model/hidden/kernel" in arrays and any(key.startswith("model_optimizer/") for key in arrays)
    checkpoints.save(tmp_path, "epoch001", arrays, {"epoch": 1})
    restored = small_model(1)
    state, stored = checkpoints.load(tmp_path)
    assert state["epoch"] == 1 and state["checkpoint"] == "epoch001"
    checkpoints.restore_model(restored, stored, tmp_path / "epoch001.npz")
    for mine, theirs in zip(model.variables, restored.variables, strict=True):
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations)


def test_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    checkpoints.save(tmp_path, "a", checkpoints.model_arrays(small_model(0)), {})
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="only")])
    _, stored = checkpoints.load(tmp_path)
    with pytest.raises(InputError, match="missing model/only/bias, model/only/kernel"):
        checkpoints.restore_model(other, stored, "a.npz", optimizer=False)


def test_checkpoints_keep_the_last_n_and_write_state_last(tmp_path):
    for step in range(4):
        checkpoints.save(tmp_path, f"step{step}", {"x": np.full(2, step)}, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["step2.npz", "step3.npz"]
    state, arrays = checkpoints.load(tmp_path)
    assert state["step"] == 3 and arrays["x"].tolist() == [3, 3]
    assert checkpoints.load(tmp_path / "none") is None


# ---- pipelines ----


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert np.array_equal(pipelines.epoch_order(10, 3, 2), pipelines.epoch_order(10, 3, 2))
    assert not np.array_equal(pipelines.epoch_order(10, 3, 2), pipelines.epoch_order(10, 3, 1))
    assert sorted(pipelines.epoch_order(10, 3, 2)) == list(range(10))
    assert pipelines.sample_indices(5, 10, 0).tolist() == [0, 1, 2, 3, 4]
    assert len(pipelines.sample_indices(50, 10, 0)) == 10


def test_reader_error_inside_tf_data_comes_back_as_itself():
    errors = pipelines.ReaderErrors()

    @errors.wrap
    def read(index):
        if int(index) == 2:
            raise InputError("chip_2.tif", "has 3 bands", "6 bands")
        return np.float32(index)

    dataset = tf.data.Dataset.range(4).map(lambda i: tf.numpy_function(read, [i], tf.float32))
    with pytest.raises(InputError, match=r"chip_2\.tif: has 3 bands"), errors.surface():
        list(dataset.as_numpy_iterator())


def test_band_statistics_equal_numpy():
    images = np.random.default_rng(0).normal(size=(10, 4, 4, 3)).astype(np.float32)
    mean, variance = pipelines.band_statistics([images[:6], (images[6:], None)])
    pixels = images.reshape(-1, 3).astype(np.float64)
    assert np.allclose(mean, pixels.mean(0)) and np.allclose(variance, pixels.var(0))


# ---- reports and parallel ----


def test_mean_std_and_tables(tmp_path):
    assert reports.mean_std([1.0, 3.0], ddof=0) == (2.0, 1.0)
    assert reports.mean_std([1.0, 3.0])[1] == pytest.approx(np.sqrt(2))  # sample std by default
    assert reports.mean_std([5.0], ddof=1) == (5.0, 0.0)
    assert reports.format_mean_std(0.5, 0.25, 2) == "0.50 +- 0.25"
    table = reports.markdown_table(["a", "b"], [[1, 2]])
    assert table == "| a | b |\n|---|---|\n| 1 | 2 |\n"
    reports.write_table(tmp_path / "summary", [{"a": 1, "b": 2}], ["a", "b"], table)
    assert (tmp_path / "summary.csv").read_text() == "a,b\n1,2\n"


def square(value):
    return value * value


def test_run_jobs_in_processes_equals_in_process():
    here, there = {}, {}
    parallel.run_jobs(square, [1, 2, 3], 1, on_result=here.__setitem__)
    parallel.run_jobs(square, [1, 2, 3], 2, on_result=there.__setitem__, in_order=True)
    assert here == there == {1: 1, 2: 4, 3: 9}


# ---- startup ----


def test_startup_keeps_tensorflow_start_up_lines_out_unless_a_level_is_set():
    import subprocess
    import sys

    code = "import common.startup, sys, tensorflow as tf; tf.ones(2); print('own', file=sys.stderr)"
    # As in a fresh shell: no level chosen, and not a worker process of a quiet parent.
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TF_CPP_MIN_LOG_LEVEL", "RSREPRO_QUIET_START_UP")
    }
    quiet = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    assert quiet.stderr == "own\n"
    chosen = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**environment, "TF_CPP_MIN_LOG_LEVEL": "0"},
    )
    assert "oneDNN" in chosen.stderr or "cpu_feature_guard" in chosen.stderr


def test_every_parser_takes_a_config_and_prints_one_it_reads_back(tmp_path, capsys):
    """--print_config writes the effective settings (demo values included) as YAML that -c reads back."""
    parser = cli.Parser()
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--splits", nargs="+", default=["train"])
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--flag", action="store_true")
    cli.add_demo_argument(parser)
    parser.demo_defaults(epochs=3)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args("--demo --splits train synth --rate 0.5 --print_config".split())
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed) == {
        "epochs": 3,
        "splits": ["train", "synth"],
        "rate": 0.5,
        "flag": False,
        "demo": True,
    }
    config = tmp_path / "effective.yaml"
    config.write_text(printed)
    again = parser.parse_args(["-c", str(config)])
    assert (again.epochs, again.splits, again.rate, again.flag, again.demo) == (
        3,
        ["train", "synth"],
        0.5,
        False,
        True,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["-c", str(config), "--print_config"])
    assert capsys.readouterr().out == printed  # the round trip is a fixed point


def test_fuzz_helpers_catch_tracebacks_and_half_written_results(tmp_path, capsys):
    from conftest import assert_fuzz_outcome, corrupted_copies

    valid = tmp_path / "data.npz"
    valid.write_bytes(b"0123456789" * 10)
    kinds = {kind: path.read_bytes() for kind, path in corrupted_copies(valid, tmp_path / "bad")}
    assert kinds["empty"] == b"" and kinds["truncated"] == b"0123456789" * 5 and len(kinds["random"]) == 100

    @cli_entry
    def clean_refusal():
        raise InputError(valid, "is truncated", "a complete archive")

    @cli_entry
    def writes_then_refuses():
        (tmp_path / "results" / "half.csv").parent.mkdir(exist_ok=True)
        (tmp_path / "results" / "half.csv").write_text("a")
        raise InputError(valid, "is truncated", "a complete archive")

    def crashes():
        raise EOFError("no data left in file")

    assert assert_fuzz_outcome(capsys, clean_refusal, tmp_path / "results", "clean") == 2
    with pytest.raises(AssertionError, match="files written before the error"):
        assert_fuzz_outcome(capsys, writes_then_refuses, tmp_path / "results", "half")
    with pytest.raises(EOFError):
        assert_fuzz_outcome(capsys, crashes, tmp_path / "results", "crash")


def test_renamed_flags_keep_working_with_a_note(capsys):
    parser = cli.Parser()
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--keep", action="store_true")
    parser.renamed("--out_dir", "--results_dir")
    parser.renamed("--keep_all", "--keep")
    args = parser.parse_args(["--out_dir", "elsewhere", "--keep_all"])
    assert (args.results_dir, args.keep) == ("elsewhere", True)
    assert capsys.readouterr().err.splitlines() == [
        "note: --out_dir is now --results_dir; the old name goes in a later release",
        "note: --keep_all is now --keep; the old name goes in a later release",
    ]
    assert parser.parse_args([]).results_dir == "results" and capsys.readouterr().err == ""
    assert "--out_dir" not in parser.format_help()
