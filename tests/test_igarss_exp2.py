"""igarss_exp2.py: CLI, the demo pipeline's files, bad inputs, the task-head maths and learning."""

import json
import shutil

import numpy as np
import pytest
from conftest import assert_main_error, no_temporary_files, parse, run_script

import igarss_exp2
from common import tensorboard
from common.errors import cli_entry
from common.tgmatl import awir, stacked_training

EXP1_METHODS = ("dtl", "dtl_hard", "matl", "tg_matl_30_10")
ALL_METHODS = ("base", *EXP1_METHODS)


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    """`igarss_exp1.py --demo` then `igarss_exp2.py --demo`, shrunk: CLIP only, few epochs, a higher
    learning rate so the heads learn in that time."""
    import igarss_exp1

    results = tmp_path_factory.mktemp("exp2") / "results"
    # exp1 in this process (its own tests run it as a subprocess); exp2 as the user runs it.
    igarss_exp1.main(
        parse(
            igarss_exp1,
            [
                "--demo",
                "--embeddings",
                "clip",
                "--epochs",
                "40",
                "--learning_rate",
                "1e-2",
                "--workers",
                "1",
                "--results_dir",
                results,
                "--calibration_epochs",
                "0",
                "--views",
            ],
        )
    )
    exp2 = run_script(
        "igarss_exp2.py",
        "--demo",
        "--embeddings",
        "clip",
        "--epochs",
        "60",
        "--learning_rate",
        "3e-3",
        "--workers",
        "1",
        "--results_dir",
        str(results),
        "--calibration_epochs",
        "0",  # the calibration is tested on its own below
    )
    assert exp2.returncode == 0, exp2.stderr[-2000:]
    return results, exp2.stdout


def test_help(capsys):
    # In-process: the demo test below already runs the script as a subprocess.
    with pytest.raises(SystemExit) as exit_info:
        igarss_exp2.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert "--test_size" in usage and "--margin" in usage and "--demo" in usage


def test_demo_writes_every_documented_file(demo_results):
    results, stdout = demo_results
    for method in ALL_METHODS:
        for fold in range(1, 9):
            for stem in ("class_head", "reg_boxfeat_head", "reg_boxloc_head"):
                assert (
                    results / "trained_models" / "exp2_task_heads" / "clip" / method / f"{stem}_run{fold}.h5"
                ).is_file()
            npy = results / "exp2_results" / "clip" / f"{method}_fold{fold}_taskhead_metrics.npy"
            record = np.load(npy, allow_pickle=True).item()  # our own file: the reference's dict format
            twin = json.loads(npy.with_suffix(".json").read_text())
            assert set(record) == set(igarss_exp2.METRICS + igarss_exp2.TIME_METRICS)
            for key, value in record.items():
                assert twin[key] == pytest.approx(value)
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (results / "exp2_results" / name).stat().st_size > 0
    table = (results / "exp2_results" / "summary.md").read_text()
    assert "| clip | tg_matl_30_10 | 8 |" in table and "**" in table and "+-" in table
    assert no_temporary_files(results), "temporary files left behind"
    for method in ALL_METHODS:
        assert f"summary: {method} acc" in stdout


def test_exported_heads_reload_and_reproduce_the_metrics(demo_results):
    """keras.models.load_model on the .h5 gives the test metrics computed from the stacked model."""
    import keras

    results, _ = demo_results
    data = awir.load_awir(
        results / "demo_data" / "igarss_exp2" / "data.npz",
        results / "demo_data" / "igarss_exp2" / "embeddings",
        ["clip"],
        results,
        0.7,
    )
    fold, test = 3, data["test"]
    projection = igarss_exp2.project_with_exp1_head(
        awir.exp1_head_path(results, "clip", "tg_matl_30_10", fold), data["embeddings"]["clip"], "exp1"
    )
    twin = json.loads(
        (results / "exp2_results" / "clip" / f"tg_matl_30_10_fold{fold}_taskhead_metrics.json").read_text()
    )
    for kind in igarss_exp2.HEAD_KINDS:
        model = keras.models.load_model(
            igarss_exp2.task_head_path(results, "clip", "tg_matl_30_10", kind, fold)
        )
        assert model.loss is not None
        units = igarss_exp2.HEAD_KINDS[kind]["units"]
        predictions = model.predict(projection[test], verbose=0)
        target = igarss_exp2.head_targets(data, fold, kind)[test, :units]
        for metric, value in igarss_exp2.task_metrics(kind, predictions, target).items():
            assert value == pytest.approx(twin[metric], abs=1e-4), (kind, metric)


def test_heads_learn_and_triplet_projections_keep_box_geometry(demo_results):
    """Structured synthetic data (class and box geometry linearly encoded in the embeddings)."""
    results, _ = demo_results
    rows = {row["method"]: row for row in igarss_exp2.summarise(results, ["clip"], ALL_METHODS, range(1, 9))}
    for method in ALL_METHODS:
        assert rows[method]["acc_mean"] > 0.6, (method, rows[method]["acc_mean"])  # chance is 1/3
    assert rows["base"]["r2_feat_mean"] > 0.2
    assert rows["matl"]["r2_feat_mean"] >= rows["dtl"]["r2_feat_mean"]
    assert rows["tg_matl_30_10"]["r2_feat_mean"] >= rows["dtl"]["r2_feat_mean"]


def test_validation_metrics_are_those_of_the_model_selection_split(demo_results):
    """Each fold's val_* metrics come from its 9 held-out validation samples with the kept weights: the
    validation MSE equals the best validation loss that chose them, and differs from the test MSE."""
    results, _ = demo_results
    for method in ALL_METHODS:
        for fold in range(1, 9):
            path = results / "exp2_results" / "clip" / f"{method}_fold{fold}_taskhead_metrics.json"
            twin = json.loads(path.read_text())
            assert set(igarss_exp2.VAL_METRICS) <= set(twin)
            assert twin["val_mse_feat"] == pytest.approx(twin["boxfeat_best_val_loss"], rel=1e-4)
            assert twin["val_mse_loc"] == pytest.approx(twin["boxloc_best_val_loss"], rel=1e-4)
            assert twin["val_mse_feat"] != twin["mse_feat"]
    header = (results / "exp2_results" / "summary.csv").read_text().splitlines()[0]
    assert "val_acc_mean" in header and "val_r2_loc_std" in header


def test_tensorboard_holds_every_heads_losses_and_their_best_is_the_recorded_one(demo_results):
    results, _ = demo_results
    scalars = tensorboard.read_scalars(
        results / "trained_models" / "exp2_task_heads" / "tensorboard" / "clip"
    )
    losses = ("train_loss", "val_loss")
    kinds, folds = igarss_exp2.HEAD_KINDS, range(1, 9)
    expected = [
        f"{m}/{k}/{loss}/fold{f}" for m in ALL_METHODS for k in kinds for loss in losses for f in folds
    ]
    assert sorted(scalars) == sorted(expected)
    assert all(sorted(values) == list(range(1, 61)) for values in scalars.values())
    for method in ALL_METHODS:
        for fold in range(1, 9):
            twin = json.loads(
                (results / "exp2_results" / "clip" / f"{method}_fold{fold}_taskhead_metrics.json").read_text()
            )
            for kind in igarss_exp2.HEAD_KINDS:
                best = min(scalars[f"{method}/{kind}/val_loss/fold{fold}"].values())
                assert best == pytest.approx(twin[f"{kind}_best_val_loss"], rel=1e-6)
    off = parse(igarss_exp2, ["--demo", "--no_tensorboard"])
    assert off.no_tensorboard and "no_tensorboard" not in igarss_exp2.RESUME_SETTINGS


def test_calibration_times_each_method_in_a_run_of_its_own(monkeypatch):
    """A cheap and an expensive method: each cost comes from the run of that method's heads alone, and
    a joint stack's wall time is split by these costs, not evenly."""
    per_head_epoch = {"base": 4e-3, "dtl": 1e-3}  # seconds; the fake clock of each method's run
    calls = []

    def fake_train(heads, inputs, data, settings, chunk_epochs=None, progress=None):
        (method,) = {head["method"] for head in heads}  # one method per calibration run
        calls.append((method, len(heads), settings.epochs, chunk_epochs))
        compile_seconds, chunk = 5.0, per_head_epoch[method] * chunk_epochs * len(heads)
        for done, seconds in (
            (1, compile_seconds),
            (2, compile_seconds + chunk),
            (3, compile_seconds + 2.5 * chunk),
        ):
            progress(done * chunk_epochs, settings.epochs, seconds, np.zeros(1), np.zeros(1))

    monkeypatch.setattr(igarss_exp2, "train_task_heads", fake_train)
    inputs = {("clip", "base", 1): np.zeros((10, 512)), ("clip", "dtl", 1): np.zeros((10, 64))}
    inputs[("clip", "dtl", 2)] = inputs[("clip", "dtl", 1)]
    units = [
        {"embedding": "clip", "method": method, "fold": fold, "input": ("clip", method, fold), "key": key}
        for key, (method, fold) in enumerate([("base", 1), ("dtl", 1), ("dtl", 2)])
    ]
    args = parse(igarss_exp2, ["--demo"])
    costs = igarss_exp2.calibrate_method_costs(units, inputs, {}, args, epochs=7)
    assert sorted(calls) == [("base", 3, 21, 7), ("dtl", 6, 21, 7)]  # 3 kinds x folds, 3 chunks of 7
    assert costs == pytest.approx({("clip", "base"): 4e-3, ("clip", "dtl"): 1e-3})
    joint = [head for heads in igarss_exp2.heads_by_width(units, inputs).values() for head in heads]
    seconds = stacked_training.head_seconds(30.0, joint, costs, igarss_exp2.cost_group)
    by_method = {m: seconds[[h["method"] == m for h in joint]] for m in per_head_epoch}
    np.testing.assert_allclose(by_method["base"], 30.0 * 4 / (3 * 4 + 6 * 1))
    np.testing.assert_allclose(by_method["dtl"], 30.0 * 1 / (3 * 4 + 6 * 1))
    assert not np.allclose(seconds, 30.0 / len(joint))


def test_metrics_twin_of_an_earlier_version_is_named(tmp_path, capsys):
    path = igarss_exp2.metrics_path(tmp_path, "clip", "dtl", 1).with_suffix(".json")
    path.parent.mkdir(parents=True)
    record = dict.fromkeys(igarss_exp2.METRICS + igarss_exp2.TIME_METRICS, 0.5)
    path.write_text(json.dumps(record))
    assert_main_error(
        capsys,
        cli_entry(lambda: igarss_exp2.summarise(tmp_path, ["clip"], ["dtl"], [1])),
        str(path),
        "has no val_acc",
    )


# ---- bad input ----


def exp2_args(results, **overrides):
    args = parse(
        igarss_exp2,
        ["--demo", "--embeddings", "clip", "--epochs", "2", "--workers", "1", "--results_dir", results],
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def assert_input_error(capsys, args, *fragments):
    return assert_main_error(capsys, lambda: igarss_exp2.main(args), *fragments)


def assert_nothing_written(results):
    assert not (results / "exp2_results").exists()
    assert not (results / "trained_models" / "exp2_task_heads").exists()


def test_missing_exp1_head_names_the_command(tmp_path, capsys):
    results = tmp_path / "results"
    assert_input_error(
        capsys,
        exp2_args(results),
        "dtl_best_fold1.h5",
        "exp1 projection head not found",
        f"python igarss_exp1.py --demo --results_dir {results}",
    )
    assert_nothing_written(results)


def copy_exp1_tree(demo_results, tmp_path):
    source, _ = demo_results
    results = tmp_path / "results"
    for part in ("splits", "trained_models/exp1_emb_proj"):
        shutil.copytree(source / part, results / part)
    return results


def test_corrupt_exp1_head(demo_results, tmp_path, capsys):
    results = copy_exp1_tree(demo_results, tmp_path)
    bad = awir.exp1_head_path(results, "clip", "dtl", 1)
    bad.write_bytes(b"not an hdf5 file")
    assert_input_error(capsys, exp2_args(results), str(bad), "cannot be loaded as a Keras model")
    assert_nothing_written(results)


def test_folds_file_of_other_data(demo_results, tmp_path, capsys):
    results = copy_exp1_tree(demo_results, tmp_path)
    folds_path = results / "splits" / "folds_test0.7.json"
    saved = json.loads(folds_path.read_text())
    saved["labels_fingerprint"] = "0" * 16
    folds_path.write_text(json.dumps(saved))
    assert_input_error(capsys, exp2_args(results), "folds_test0.7.json", "was made for other data")
    assert_nothing_written(results)


def test_other_training_settings_are_refused(demo_results, tmp_path, capsys):
    """Finished task heads of other training arguments are not mixed with new ones."""
    results = copy_exp1_tree(demo_results, tmp_path)
    config = "trained_models/exp2_task_heads/exp2_config.json"
    (results / config).parent.mkdir(parents=True)
    shutil.copy(demo_results[0] / config, results / config)
    assert_input_error(capsys, exp2_args(results), "exp2_config.json", "epochs=60 (now 2)")
    assert not (results / "exp2_results").exists()
    assert not list((results / "trained_models" / "exp2_task_heads").rglob("*.h5"))


def test_bad_fold_number(tmp_path, capsys):
    assert_input_error(capsys, exp2_args(tmp_path / "results", folds=[0, 9]), "--folds", "1..8")


# ---- the maths of the stacked task heads ----


def test_glorot_normal_matches_keras_statistics():
    values = stacked_training.glorot_normal(np.random.default_rng(0), 200, 300)
    expected_sd = np.sqrt(2 / 500)
    assert np.abs(values).max() <= 2 * expected_sd / 0.87962566103423978 + 1e-12
    assert values.std() == pytest.approx(expected_sd, rel=0.03)


def test_loss_from_logits_equals_keras_losses():
    import keras

    rng = np.random.default_rng(1)
    outputs = rng.normal(size=(1, 6, igarss_exp2.OUTPUT_UNITS)).astype(np.float32)
    valid = np.array([[True] * 5 + [False]])
    onehot = np.zeros((1, 6, igarss_exp2.OUTPUT_UNITS), np.float32)
    onehot[0, np.arange(6), rng.integers(0, 3, 6)] = 1
    logits = outputs[0, :5, :3]
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = keras.losses.CategoricalCrossentropy()(onehot[0, :5, :3], softmax)
    assert float(igarss_exp2.task_head_loss("class", outputs, onehot, valid)[0]) == pytest.approx(
        float(expected), 1e-5
    )
    target = rng.uniform(size=(1, 6, igarss_exp2.OUTPUT_UNITS)).astype(np.float32)
    expected = keras.losses.MeanSquaredError()(target[0, :5, :13], 1 / (1 + np.exp(-outputs[0, :5, :13])))
    assert float(igarss_exp2.task_head_loss("boxfeat", outputs, target, valid)[0]) == pytest.approx(
        float(expected), 1e-5
    )


def test_stacked_training_equals_keras_one_by_one_and_exports_exactly(tmp_path):
    """Two heads (classifier, box-feature regressor) trained in one stack end with the weights and BN
    statistics Keras reaches with train_on_batch on the same batches; the exported .h5 reloads and
    predicts like the stack."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(3)
    num_samples, input_dim, batch_size, epochs = 40, 6, 8, 3
    x = rng.normal(size=(num_samples, input_dim)).astype(np.float32)
    class_label = rng.integers(0, 3, num_samples)
    targets = {
        "class": np.zeros((num_samples, igarss_exp2.OUTPUT_UNITS), np.float32),
        "boxfeat": np.zeros((num_samples, igarss_exp2.OUTPUT_UNITS), np.float32),
    }
    targets["class"][np.arange(num_samples), class_label] = 1
    targets["boxfeat"][:, :13] = rng.uniform(size=(num_samples, 13))
    kinds = ["class", "boxfeat"]
    train = [np.arange(0, 30), np.arange(5, 35)]  # 30 samples: batches of 8, 8, 8, 6
    val = [np.arange(30, 40), np.arange(0, 5)]
    keys = [11, 12]
    generators = [stacked_training.model_generator(0, key) for key in keys]
    params, state = igarss_exp2.initial_task_head_params(input_dim, kinds, generators)
    initial = {k: v.copy() for k, v in params.items()}

    def loss(outputs, batch, valid):
        return tf.concat(
            [
                igarss_exp2.task_head_loss(
                    kind, outputs[i : i + 1], batch["target"][i : i + 1], valid[i : i + 1]
                )
                for i, kind in enumerate(kinds)
            ],
            axis=0,
        )

    stack = stacked_training.OnePassValidationStack(
        params,
        igarss_exp2.task_head_forward,
        loss,
        {},
        {"x": np.stack([x, x]), "target": np.stack([targets[k] for k in kinds])},
        state=state,
        learning_rate=1e-2,
        batch_size=batch_size,
        model_keys=keys,
    )
    stack.fit(train, val, epochs, generators, chunk_epochs=epochs)
    for model_index, kind in enumerate(kinds):
        units = igarss_exp2.HEAD_KINDS[kind]["units"]
        model = igarss_exp2.build_task_head(input_dim, kind, learning_rate=1e-2)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2), loss=model.loss, jit_compile=False
        )  # no XLA wait
        for layer in range(1, 5):
            model.get_layer(f"dense{layer}").set_weights(
                [initial[f"kernel{layer}"][model_index], initial[f"bias{layer}"][model_index]]
            )
        model.get_layer("output").set_weights(
            [initial["kernel_out"][model_index][:, :units], initial["bias_out"][model_index][:units]]
        )
        # The stack's batches: generators continue after initialisation, one permutation per epoch.
        generator = stacked_training.model_generator(0, keys[model_index])
        igarss_exp2.initial_task_head_params(input_dim, [kind], [generator])
        for _ in range(epochs):
            order = train[model_index][generator.permutation(30)]
            for start in range(0, 30, batch_size):
                batch = order[start : start + batch_size]
                model.train_on_batch(x[batch], targets[kind][batch, :units])
        final_params = {k: v.numpy()[model_index] for k, v in stack.params.items()}
        final_state = {k: v.numpy()[model_index] for k, v in stack.state.items()}
        for layer in range(1, 5):
            kernel, bias = model.get_layer(f"dense{layer}").get_weights()
            np.testing.assert_allclose(final_params[f"kernel{layer}"], kernel, atol=2e-5)
            np.testing.assert_allclose(final_params[f"bias{layer}"], bias, atol=2e-5)
            gamma, beta, moving_mean, moving_variance = model.get_layer(f"bn{layer}").get_weights()
            np.testing.assert_allclose(final_params[f"gamma{layer}"], gamma, atol=2e-5)
            np.testing.assert_allclose(final_params[f"beta{layer}"], beta, atol=2e-5)
            np.testing.assert_allclose(final_state[f"moving_mean{layer}"], moving_mean, atol=2e-5)
            np.testing.assert_allclose(final_state[f"moving_variance{layer}"], moving_variance, atol=2e-5)
        np.testing.assert_allclose(
            final_params["kernel_out"][:, :units], model.get_layer("output").get_weights()[0], atol=2e-5
        )
        assert np.all(final_params["kernel_out"][:, units:] == 0)
        # Export the best-validation head and reload it.
        best_params, best_state = stack.best()
        path = tmp_path / f"{kind}.h5"
        igarss_exp2.export_task_head(best_params, best_state, model_index, kind, input_dim, path, 1e-2)
        reloaded = keras.models.load_model(path)
        stacked = igarss_exp2.head_predictions(kind, stack.predict(x)[model_index])
        np.testing.assert_allclose(reloaded.predict(x, verbose=0), stacked, atol=1e-5)


def test_feature_targets_are_renormalised_on_the_training_fold_and_clipped():
    features = awir.box_features(np.array([[0, 10, 0, 10], [0, 20, 0, 40], [0, 200, 0, 250], [0, 5, 0, 5]]))
    targets = igarss_exp2.box_feature_targets(features, np.array([0, 1]))
    assert targets.min() >= 0 and targets.max() <= 1
    np.testing.assert_allclose(targets[0, :2], [0, 0])
    np.testing.assert_allclose(targets[1, :2], [1, 1])
    np.testing.assert_allclose(targets[2, :2], [1, 1])  # beyond the training maximum: clipped


# ---- the paired comparisons of summary.md, on a hand-made table ----


def hand_made_folds():
    """8 folds of three methods: TG-MATL beats MATL by 0.05 acc on every fold (sure), by +-0.01 on
    R² feat alternately (a tie within the noise), and DTL is the best on mse_loc in every fold."""
    per_fold = {}
    for offset, method in ((0.0, "dtl"), (0.10, "matl"), (0.15, "tg_matl_30_10")):
        folds = {}
        for fold in range(1, 9):
            metrics = dict.fromkeys(
                igarss_exp2.METRICS + igarss_exp2.VAL_METRICS + igarss_exp2.TIME_METRICS, 0.5
            )
            metrics["acc"] = 0.6 + offset + 0.01 * fold
            metrics["r2_feat"] = 0.3 + (0.01 if (fold + len(method)) % 2 else -0.01)
            metrics["mse_loc"] = 0.2 + (0.0 if method == "dtl" else 0.05) + 0.001 * fold
            folds[fold] = dict(metrics, fold=fold)
        per_fold[("clip", method)] = folds
    return per_fold


def test_paired_table_and_bold_only_where_the_interval_excludes_zero(tmp_path):
    per_fold = hand_made_folds()
    methods = ["dtl", "matl", "tg_matl_30_10"]
    rows = igarss_exp2.summarise(tmp_path, ["clip"], methods, range(1, 9), per_fold)
    # Sample std (ddof=1) over the 8 folds: acc rises by 0.01 per fold.
    assert rows[0]["acc_std"] == pytest.approx(np.std([0.01 * f for f in range(1, 9)], ddof=1))
    comparisons = igarss_exp2.paper_comparisons(methods, 0.3, 0.1)
    assert [(a, b) for a, b, _ in comparisons] == [
        ("tg_matl_30_10", "matl"),
        ("tg_matl_30_10", "dtl"),
        ("matl", "dtl"),
    ]
    table = igarss_exp2.paired_table(per_fold, ["clip"], comparisons)
    cells = {(row[1], row[2]): row for row in table}
    acc = cells[("tg_matl_30_10 vs matl", "acc")]
    assert acc[3:] == [8, "+0.0500", "[+0.0500, +0.0500]", "8/8", "0.00781", "yes"]
    assert cells[("tg_matl_30_10 vs matl", "r2_feat")][-1] == "no"
    # mse_loc is lower-is-better: DTL's lower error counts as a loss of MATL (negative difference).
    assert (
        cells[("matl vs dtl", "mse_loc")][4] == "-0.0500" and cells[("matl vs dtl", "mse_loc")][-1] == "yes"
    )
    marks = igarss_exp2.sure_best_marks(rows, per_fold)
    index = {row["method"]: i for i, row in enumerate(rows)}
    assert (index["tg_matl_30_10"], "acc") in marks and (index["dtl"], "mse_loc") in marks
    assert not any(metric == "r2_feat" for _, metric in marks)  # a best mean within the noise is not bold
    igarss_exp2.write_summary(rows, tmp_path, per_fold, comparisons)
    markdown = (tmp_path / "summary.md").read_text()
    assert "sample std (ddof=1)" in markdown and "## Paired comparisons" in markdown
    assert "| clip | tg_matl_30_10 vs matl | acc | 8 | +0.0500 |" in markdown
    assert markdown.count("**") == 2 * len(marks) + 2  # the two of the header's "**Bold**"
    assert (tmp_path / "summary_paired.csv").read_text().count("\n") == len(table) + 1
