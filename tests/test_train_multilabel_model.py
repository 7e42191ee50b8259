"""train_multilabel_model.py: --help, --demo end to end, --test_only, the readers and bad inputs."""

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest
import yaml
from conftest import (
    REPO,
    assert_main_error,
    assert_tensorboard_holds_log,
    call_main,
    no_temporary_files,
    parse,
    run_script,
)

import train_multilabel_model as tm
from common import pipelines
from common.spml import aid_multilabel, bigearthnet

SCRIPT = "train_multilabel_model.py"
RUN_FILES = (
    "config.json",
    "log.csv",
    "best_model.keras",
    "metrics.json",
    "per_class.csv",
    "training_dynamics.png",
)
TINY = ["--demo_images", "64", "--image_size", "24", "--batch_size", "16"]


def main_error(capsys, argv, *fragments):
    """main(argv) ends with exit 2 and one error line holding every fragment."""
    return assert_main_error(capsys, lambda: call_main(tm, argv), *fragments)


def test_resume_settings_are_every_flag_but_where_the_run_lives_and_how_far_it_goes():
    flags = set(vars(parse(tm, [])))
    resumable = {"config", "demo", "epochs", "overwrite", "print_config", "resume", "results_dir", "run_name"}
    resumable.update({"strategy", "no_tensorboard", "progress"})
    assert len(set(tm.RESUME_SETTINGS)) == len(tm.RESUME_SETTINGS)
    assert set(tm.RESUME_SETTINGS) == flags - resumable


def test_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as exit_:
        tm.get_args_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--method" in text and "ll_cp" in text and "--test_only" in text


def test_demo_adagc_mirrored_writes_every_file_and_test_only_reproduces_it(tmp_path):
    results = tmp_path / "results"
    command = "--demo --method adagc --strategy mirrored --epochs 4 --gc_start_epoch 2".split()
    done = run_script(SCRIPT, *command, *TINY, "--results_dir", str(results), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = results / "train_multilabel_model" / "demo_adagc"
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert (
        results / "demo_data" / "train_multilabel_model" / "aid" / "multilabel_correct_final.csv"
    ).is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last_line = done.stdout.strip().splitlines()[-1]
    assert last_line.startswith(f"test mAP {metrics['mAP']:.4f}") and "trigger epoch 2" in last_line
    assert metrics["trigger_epoch"] == 2 and 0 <= metrics["mAP"] <= 1 and len(metrics["per_class"]) == 17
    log = (run_dir / "log.csv").read_text().splitlines()
    assert len(log) == 5 and ",gc," in log[-1]
    # The decays that acted: the mean-teacher ramp at the epoch's last iteration (A) and at its end (B).
    header, last = log[0].split(","), dict(zip(log[0].split(","), log[-1].split(","), strict=True))
    assert header[-5:] == [
        "teacher_a_decay",
        "teacher_b_decay",
        "pseudo_precision",
        "pseudo_recall",
        "seconds",
    ]
    assert 0 <= float(last["pseudo_precision"]) <= 1 and 0 <= float(last["pseudo_recall"]) <= 1
    steps = 4 * -(-json.loads((run_dir / "config.json").read_text())["derived"]["num_train"] // 16)
    assert float(last["teacher_a_decay"]) == pytest.approx(min(0.99, steps / (steps + 9)))
    assert float(last["teacher_b_decay"]) == pytest.approx(5 / 14)
    assert metrics["last_epoch"]["epoch"] == 4 and metrics["last_epoch"]["phase"] == "gc"

    # --test_only re-evaluates the saved best model and must reproduce metrics.json exactly.
    call_main(tm, ["--demo", "--method", "adagc", "--test_only", "--results_dir", str(results)])
    again = json.loads((run_dir / "test_only_metrics.json").read_text())
    assert again["matches_saved_metrics"] is True
    assert again["mAP"] == metrics["mAP"] and again["per_class"] == metrics["per_class"]

    assert no_temporary_files(run_dir)


def test_a_finished_run_is_never_overwritten_silently(tmp_path, capsys):
    results = str(tmp_path / "results")
    call_main(
        tm, ["--demo", "--method", "an", "--epochs", "1", "--results_dir", results, "--no_tensorboard", *TINY]
    )
    capsys.readouterr()
    assert not (tmp_path / "results" / "train_multilabel_model" / "demo_an" / "tensorboard").exists()
    argv = ["--demo", "--method", "an", "--epochs", "1", "--results_dir", results, *TINY]
    main_error(capsys, argv, "a finished run with this name exists", "--overwrite")


def test_no_validation_split_reports_the_last_epoch(tmp_path, capsys):
    argv = "--demo --method adagc --gc_start_epoch 2 --epochs 3 --val_fraction 0".split()
    metrics = call_main(tm, [*argv, "--results_dir", str(tmp_path), *TINY])
    out = capsys.readouterr().out.strip().splitlines()
    assert "no validation images: the last epoch is the reported model" in out
    assert (metrics["best_epoch"], metrics["best_phase"]) == (3, "gc")
    assert metrics["last_epoch"]["mAP"] == metrics["mAP"]
    assert f"| epoch 3 (gc) | last epoch mAP {metrics['mAP']:.4f}" in out[-1]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "aid").mkdir()
    (tmp_path / "aid" / aid_multilabel.LABELS_CSV).write_text("image,airplane\n")
    argv = ["--demo", "--data_dir", str(tmp_path / "aid"), "--results_dir", str(tmp_path / "results")]
    main_error(capsys, argv, "holds other data", "delete the folder to regenerate it")
    assert not (tmp_path / "aid" / "images_tr").exists()


def test_demo_an_and_resume(tmp_path, capsys):
    results = str(tmp_path / "results")
    call_main(tm, ["--demo", "--method", "an", "--epochs", "1", "--results_dir", results, *TINY])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("test mAP ") and "method an" in out[-1]
    run_dir = tmp_path / "results" / "train_multilabel_model" / "demo_an"
    assert (run_dir / "checkpoints" / "epoch_001.npz").is_file()
    # --resume continues from the last checkpoint to the new epoch count.
    call_main(tm, ["--demo", "--method", "an", "--epochs", "2", "--resume", "--results_dir", results, *TINY])
    assert "resumed from epoch 1" in capsys.readouterr().out
    assert len((run_dir / "log.csv").read_text().splitlines()) == 3
    # The TensorBoard scalars hold log.csv's numbers, both epochs, the resumed one included.
    scalars = assert_tensorboard_holds_log(run_dir)
    assert sorted(scalars["train_loss"]) == [1, 2] and "phase" not in scalars


def test_resume_refuses_changed_settings(tmp_path, capsys):
    results = str(tmp_path / "results")
    call_main(tm, ["--demo", "--method", "an", "--epochs", "1", "--results_dir", results, *TINY])
    capsys.readouterr()
    run_dir = tmp_path / "results" / "train_multilabel_model" / "demo_an"
    before = (run_dir / "config.json").read_text()
    argv = ["--demo", "--method", "an", "--epochs", "2", "--resume", "--learning_rate", "0.01"]
    main_error(
        capsys, [*argv, "--results_dir", results, *TINY], "config.json", "learning_rate=0.003 (now 0.01)"
    )
    assert (run_dir / "config.json").read_text() == before
    assert len((run_dir / "log.csv").read_text().splitlines()) == 2


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    adagc = ["--demo", "--method", "adagc", "--gc_start_epoch", "1", *TINY]
    call_main(tm, [*adagc, "--epochs", "3", "--results_dir", whole])
    call_main(tm, [*adagc, "--epochs", "2", "--results_dir", parts])
    call_main(tm, [*adagc, "--epochs", "3", "--resume", "--results_dir", parts])
    capsys.readouterr()

    def outcome(results):
        run_dir = Path(results) / "train_multilabel_model" / "demo_adagc"
        log = [line.rsplit(",", 1)[0] for line in (run_dir / "log.csv").read_text().splitlines()]
        return log, json.loads((run_dir / "metrics.json").read_text())["per_class"]

    assert outcome(parts) == outcome(whole)


def test_benv2_lmdb_reader_round_trips_records_and_trains(tmp_path):
    from safetensors.numpy import load as load_safetensors

    root = bigearthnet.write_demo(tmp_path / "ben", num_patches=30, seed=1)
    args = parse(tm, f"--dataset benv2 --data_dir {root} --image_size 120 --bands B04,B03,B02,B08,B11")
    data = tm.load_data(args)
    patch_id = data["train"]["sources"][0]
    with bigearthnet.open_lmdb(
        root / "lmdb"
    ).begin() as transaction:  # LMDB allows one environment per process
        stored = load_safetensors(transaction.get(patch_id.encode()))
    loader = tm.make_loader(data, 120, pipelines.ReaderErrors())
    image = loader(np.array([patch_id]))[0].numpy()
    assert image.shape == (120, 120, 5)
    np.testing.assert_allclose(image[..., 0], stored["B04"] / 10000.0, rtol=1e-6)
    np.testing.assert_allclose(image[..., 3], stored["B08"] / 10000.0, rtol=1e-6)
    # The 20 m band is resampled from 60 to 120 px: block means are preserved.
    assert image[..., 4].reshape(60, 2, 60, 2).mean((1, 3)).mean() == pytest.approx(
        stored["B11"].mean() / 1e4, rel=1e-2
    )
    assert (root / "train_random_single_labels.npy").is_file()
    observed = np.load(root / "train_random_single_labels.npy")
    assert observed.shape == (len(data["train"]["sources"]), 19) and (observed.sum(1) <= 1).all()
    assert ((observed == 1) <= (data["train"]["full"] == 1)).all()

    # Dominant single positives come from the class-fraction table.
    args.single_positive = "dominant"
    dominant = tm.load_data(args)["train"]["observed"]
    fractions = bigearthnet.read_class_fractions(root / "class_fractions.csv", data["train"]["sources"])
    assert (np.argmax(dominant, 1) == np.argmax(np.where(data["train"]["full"] > 0, fractions, -1), 1)).all()

    # One epoch through the LMDB tf.data pipeline and the real training loop.
    results = tmp_path / "results"
    argv = f"--demo --dataset benv2 --method wan --epochs 1 --results_dir {results} --demo_images 40"
    call_main(tm, argv + " --image_size 24")
    assert (results / "train_multilabel_model" / "demo_wan_benv2" / "metrics.json").is_file()


# ---- bad inputs: one line, exit 2, nothing half-written ----


def write_config(tmp_path, **keys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(keys))
    return str(path)


def test_config_with_unknown_key(tmp_path, capsys):
    # The YAML file is read while parsing: a bad key ends there in one line and exit 2.
    argv = [
        "--config",
        write_config(tmp_path, method="an", learning_rat=0.1),
        "--results_dir",
        str(tmp_path / "r"),
    ]
    assert_main_error(capsys, lambda: call_main(tm, argv), "bad.yaml", "unknown key(s): learning_rat")
    assert not (tmp_path / "r").exists()


def test_config_with_unknown_method(tmp_path, capsys):
    config = write_config(tmp_path, method="magic")
    assert_main_error(
        capsys,
        lambda: parse(tm, ["--config", config, "--results_dir", str(tmp_path / "results")]),
        "bad.yaml: unknown value 'magic' for method; expected one of",
        "adagc",
    )
    assert not (tmp_path / "results").exists()


def test_config_values_are_applied_and_command_line_wins(tmp_path):
    config = write_config(tmp_path, method="ll_cp", batch_size=8, augment=False, bands=["B02", "B03"])
    args = parse(tm, ["--config", config, "--batch_size", "4"])
    assert (args.method, args.batch_size, args.augment, args.bands) == ("ll_cp", 4, False, "B02,B03")


def test_every_shipped_config_is_valid():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 26
    for config in configs:
        args = parse(tm, ["--config", str(config)])
        assert args.method in tm.METHODS and args.dataset in ("aid", "benv2")


def test_aid_image_missing_for_a_csv_row(tmp_path, capsys):
    root = aid_multilabel.write_demo(tmp_path / "aid", num_images=24, seed=3, image_size=32)
    victim = sorted((root / "images_test").glob("*/*.jpg"))[0]
    victim.unlink()
    argv = ["--data_dir", str(root), "--backbone", "small_cnn", "--results_dir", str(tmp_path / "r")]
    main_error(capsys, argv, "multilabel_correct_final.csv", "1 row(s) have no image", victim.stem)
    assert not (tmp_path / "r").exists()


def test_aid_file_that_is_not_a_jpeg(tmp_path, capsys):
    root = aid_multilabel.write_demo(tmp_path / "aid", num_images=24, seed=3, image_size=32)
    victim = sorted((root / "images_tr").glob("*/*.jpg"))[0]
    victim.write_bytes(b"not an image")
    main_error(
        capsys, ["--data_dir", str(root), "--results_dir", str(tmp_path / "r")], victim.name, "not a JPEG"
    )


@pytest.fixture()
def ben_root(tmp_path):
    return bigearthnet.write_demo(tmp_path / "ben", num_patches=20, seed=2)


def ben_argv(root, tmp_path):
    return f"--dataset benv2 --data_dir {root} --image_size 24 --results_dir {tmp_path / 'r'}".split()


def test_lmdb_key_missing(ben_root, tmp_path, capsys):
    environment = lmdb.open(str(ben_root / "lmdb"))
    with environment.begin(write=True) as transaction:
        transaction.delete(b"S2A_MSIL2A_DEMO_00003")
    environment.close()
    main_error(capsys, ben_argv(ben_root, tmp_path), "lmdb", "1 patch id(s) missing", "S2A_MSIL2A_DEMO_00003")
    assert not (tmp_path / "r").exists()


def test_lmdb_value_undecodable(ben_root, tmp_path, capsys):
    environment = lmdb.open(str(ben_root / "lmdb"))
    with environment.begin(write=True) as transaction:
        transaction.put(b"S2A_MSIL2A_DEMO_00001", b"\x00garbage")
    environment.close()
    main_error(
        capsys, ben_argv(ben_root, tmp_path), "lmdb", "S2A_MSIL2A_DEMO_00001 is undecodable", "safetensors"
    )
    assert not (tmp_path / "r").exists()


def test_single_label_file_of_the_wrong_shape(ben_root, tmp_path, capsys):
    np.save(ben_root / "train_random_single_labels.npy", np.zeros((5, 19), np.uint8))
    main_error(
        capsys,
        ben_argv(ben_root, tmp_path),
        "train_random_single_labels.npy",
        "shape (5, 19)",
        "patches x 19",
    )
    assert not (tmp_path / "r").exists()
