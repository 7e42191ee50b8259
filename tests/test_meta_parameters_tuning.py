"""meta_parameters_tuning.py: observed labels only, resumable study, outputs; test_multilabel_model.py."""

import json

import numpy as np
import pytest
import yaml
from conftest import call_main, parse

import meta_parameters_tuning as mt
import test_multilabel_model as tmm
import train_multilabel_model as tm

TINY = "--demo --method ll_r --n_trials 2 --tune_epochs 1 --epochs 1 --demo_images 48 --image_size 16"


class Hidden:
    """Stands in for a full-label matrix: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"full labels were read ({name})")

    def __array__(self, *args, **kwargs):
        raise AssertionError("full labels were read (as an array)")

    def __getitem__(self, key):
        raise AssertionError("full labels were read (indexed)")

    def __len__(self):
        raise AssertionError("full labels were read (len)")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    results = tmp_path_factory.mktemp("tuning") / "results"
    summary = call_main(mt, f"{TINY} --results_dir {results}")
    return results, summary


def test_the_objective_never_reads_full_training_or_validation_labels(study, tmp_path):
    results, _ = study
    args = tm.resolve_derived(parse(mt, f"{TINY} --results_dir {results}"), mt.SCRIPT_STEM)
    data = tm.load_data(args)
    for part in ("train", "val"):
        data[part]["full"] = Hidden()
    hidden = mt.observed_only(data)
    statistics = (np.zeros(3, np.float32), np.ones(3, np.float32))
    trial_args = mt.trial_arguments(args, {"delta_rel": 0.2, "learning_rate": 1e-3})
    value = mt.run_trial(trial_args, hidden, statistics, tmp_path / "trial")
    assert 0 <= value <= 1 and trial_args.selection_labels == "observed"
    assert hidden["test"]["full"] is data["test"]["full"]  # only the final run's test uses full labels


def test_study_writes_its_outputs_and_the_best_config_trains(study):
    # Its demo data (64 images) live apart from the trainer's demo data (480), so both demos run in turn.
    results, summary = study
    trainer_demo = tm.resolve_derived(parse(tm, f"--demo --results_dir {results}"))
    assert (results / "demo_data" / "meta_parameters_tuning" / "aid").is_dir()
    assert "meta_parameters_tuning" not in trainer_demo.data_dir
    run_dir = results / "meta_parameters_tuning" / "demo_ll_r"
    for name in ("study.db", "trials.csv", "best_config.yaml", "optimization_history.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    trials = (run_dir / "trials.csv").read_text().splitlines()
    assert trials[0].startswith("number,state,objective,seconds,delta_rel,learning_rate") and len(trials) == 3
    config = yaml.safe_load((run_dir / "best_config.yaml").read_text())
    assert config["delta_rel"] == pytest.approx(summary["best_params"]["delta_rel"])
    assert tm.get_args_parser().parse_args(["-c", str(run_dir / "best_config.yaml")]).method == "ll_r"
    final = json.loads((run_dir / "train_multilabel_model" / "best" / "metrics.json").read_text())
    assert summary["test"]["mAP"] == final["mAP"] and 0 <= summary["objective"] <= 1


def test_a_rerun_resumes_the_study_and_a_changed_one_is_refused(study, capsys):
    results, summary = study
    again = call_main(mt, f"{TINY} --results_dir {results}")  # 2 trials done: nothing new to run
    assert again["best_trial"] == summary["best_trial"] and again["test"]["mAP"] == summary["test"]["mAP"]
    with pytest.raises(SystemExit):
        call_main(mt, f"{TINY} --results_dir {results} --learning_rate 0.5")
    assert "the study's trials were made with learning_rate" in capsys.readouterr().err


def test_a_resumed_study_compares_every_flag_but_the_trial_count_and_overwrite():
    flags = set(vars(parse(mt, [])))
    assert len(set(mt.RESUME_SETTINGS)) == len(mt.RESUME_SETTINGS)
    outputs = {"no_tensorboard", "progress"}  # what is shown, not what is computed
    assert set(mt.RESUME_SETTINGS) == flags - {"n_trials", "overwrite", "print_config", *outputs}


def test_test_script_reproduces_the_final_run(study):
    results, summary = study
    run_dir = results / "meta_parameters_tuning"
    study_dir = run_dir / "demo_ll_r"
    argv = ["-c", str(study_dir / "best_config.yaml"), "--results_dir", str(study_dir), "--run_name", "best"]
    metrics = call_main(tmm, argv)
    assert metrics["matches_saved_metrics"] is True and metrics["mAP"] == summary["test"]["mAP"]


@pytest.mark.parametrize(
    "module", ["meta_parameters_tuning", "test_multilabel_model", "annotation_tool", "make_benv2_lmdb"]
)
def test_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).get_args_parser().parse_args(["--help"])
    assert exit_.value.code == 0 and "--demo" in capsys.readouterr().out
