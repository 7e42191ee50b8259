"""igarss_exp1.py: the stacked engine equals one-by-one Keras training, learning works, CLI and errors."""

import csv
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_main_error, assert_process_error, no_temporary_files, run_script
from conftest import parse as parse_argv

import igarss_exp1
from common import tensorboard
from common.tgmatl import awir, stacked_training

SMALL_WIDTHS = {"clip": 12, "dinov2": 16, "mae": 16}


def parse(*extra):
    return parse_argv(igarss_exp1, list(extra))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("awir")
    data_path, embeddings_dir = awir.make_demo_data(
        root / "data", num_samples=240, seed=1, widths=SMALL_WIDTHS
    )
    data = awir.load_awir(data_path, embeddings_dir, ["clip", "dinov2"], root / "results", 0.7)
    return data, data_path, embeddings_dir


def sequential_reference(head, embedding, data, task_scores, args, epochs, val_method=None):
    """One head trained alone: a Keras ProjectionHead, keras Adam, batches in the head's own order;
    the best epoch is chosen on the validation loss of `val_method` (default: the head's own)."""
    generator = stacked_training.model_generator(args.seed, head["key"])
    model = igarss_exp1.build_projection_head(embedding.shape[1])
    initial = igarss_exp1.initial_head_params(embedding.shape[1], [generator])
    model.set_weights([initial["kernel"][0], initial["bias"][0]])
    optimizer = keras.optimizers.Adam(learning_rate=args.learning_rate)
    train, val = data["folds"][head["fold"] - 1]
    step = 0

    def loss_on(indices, training_step, method=head["method"]):
        outputs = model(embedding[indices], training=True)[None]
        batch = {
            "class_label": tf.constant(data["class_label"][indices][None].astype(np.int32)),
            "box_cluster": tf.constant(data["box_cluster"][indices][None].astype(np.int32)),
            "task_score": tf.constant(task_scores[head["fold"] - 1][indices][None]),
            "sample_id": tf.constant(indices[None].astype(np.int32)),
            "model_key": tf.constant([head["key"]], tf.int64),
            "model_step": tf.constant([training_step], tf.int64),
        }
        valid = tf.ones((1, len(indices)), tf.bool)
        return igarss_exp1.method_loss(
            method,
            outputs,
            batch,
            valid,
            args,
            np.array([args.top_percent]),
            np.array([args.random_percent]),
        )[0]

    best_loss, best_weights = np.inf, None
    for _ in range(epochs):
        order = train[generator.permutation(len(train))]
        for start in range(0, len(order), args.batch_size):
            with tf.GradientTape() as tape:
                loss = loss_on(order[start : start + args.batch_size], step)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            step += 1
        val_loss = float(loss_on(val, step, val_method or head["method"]))
        if val_loss < best_loss:
            best_loss, best_weights = val_loss, [w.copy() for w in model.get_weights()]
    return best_weights, best_loss, model.get_weights()


@pytest.mark.parametrize("jit_compile", [False, True])
def test_stacked_engine_matches_one_by_one_keras_training(small_data, jit_compile):
    data, _, _ = small_data
    args = parse(
        "--epochs", "4", "--batch_size", "16", "--learning_rate", "0.01", "--extra_selection", "random"
    )
    embedding = data["embeddings"]["clip"]
    scores = igarss_exp1.fold_task_scores(data, args.seed)
    heads = [
        {"method": method, "fold": fold, "key": 10 * index + fold}
        for index, (method, fold) in enumerate(
            [("dtl", 1), ("dtl_hard", 2), ("matl", 3), ("tg_matl", 4), ("tg_matl", 5)]
        )
    ]
    original_init = stacked_training.StackedModels.__init__

    def forced_jit(self, *positional, **keywords):
        keywords["jit_compile"] = jit_compile
        original_init(self, *positional, **keywords)

    stacked_training.StackedModels.__init__ = forced_jit
    try:
        result = igarss_exp1.train_heads(heads, embedding, data, scores, args)
    finally:
        stacked_training.StackedModels.__init__ = original_init
    for index, head in enumerate(result["heads"]):
        best_weights, best_loss, _ = sequential_reference(head, embedding, data, scores, args, epochs=4)
        np.testing.assert_allclose(result["params"]["kernel"][index], best_weights[0], atol=2e-5)
        assert result["best_val_loss"][index] == pytest.approx(best_loss, rel=1e-4, abs=1e-5)
        # Distances do not depend on the bias, so its gradient is float rounding noise that Adam
        # normalises to full-size steps in both implementations: only its range can be compared.
        steps = 4 * int(np.ceil(63 / args.batch_size))
        assert (
            np.abs(result["params"]["bias"][index] - best_weights[1]).max() <= 2 * args.learning_rate * steps
        )


@pytest.mark.parametrize("selection", ["matl_val", "last"])
def test_model_selection_matl_val_and_last_equal_one_by_one_training(small_data, selection):
    data, _, _ = small_data
    args = parse(
        "--epochs", "4", "--batch_size", "16", "--learning_rate", "0.01", "--model_selection", selection
    )
    embedding = data["embeddings"]["clip"]
    scores = igarss_exp1.fold_task_scores(data, args.seed)
    heads = [{"method": "dtl", "fold": 1, "key": 1}, {"method": "tg_matl", "fold": 2, "key": 2}]
    result = igarss_exp1.train_heads(heads, embedding, data, scores, args)
    for index, head in enumerate(result["heads"]):
        # matl_val: TG-MATL heads are selected on MATL without the task-guided mask, others as before.
        val_method = "matl" if head["method"] == "tg_matl" else None
        best, best_loss, last = sequential_reference(head, embedding, data, scores, args, 4, val_method)
        expected = last if selection == "last" else best
        np.testing.assert_allclose(result["params"]["kernel"][index], expected[0], atol=2e-5)
        if selection == "matl_val":
            assert result["best_val_loss"][index] == pytest.approx(best_loss, rel=1e-4, abs=1e-5)
            assert best_loss > 0  # the unmasked MATL loss has triplets on the 9-sample split
        else:
            assert result["best_epoch"][index] == 3
            assert result["best_val_loss"][index] == pytest.approx(result["val_history"][-1][index])


def test_stack_time_is_split_by_each_methods_calibrated_cost():
    result = {
        "seconds": 10.0,
        "heads": [{"method": "dtl_hard"}, {"method": "tg_matl"}, {"method": "tg_matl"}],
    }
    costs = {("clip", "dtl_hard"): 1.0, ("clip", "tg_matl"): 2.0}

    def split(costs):
        group = lambda head: ("clip", head["method"])  # noqa: E731
        return stacked_training.head_seconds(result["seconds"], result["heads"], costs, group)

    np.testing.assert_allclose(split(costs), [2.0, 4.0, 4.0])
    np.testing.assert_allclose(split({}), [10 / 3] * 3)


def test_a_head_alone_trains_exactly_as_inside_a_stack(small_data):
    data, _, _ = small_data
    args = parse("--epochs", "3", "--batch_size", "16", "--learning_rate", "0.01")
    embedding = data["embeddings"]["dinov2"]
    scores = igarss_exp1.fold_task_scores(data, args.seed)
    heads = [{"method": "matl", "fold": fold, "key": fold} for fold in range(1, 5)]
    together = igarss_exp1.train_heads(heads, embedding, data, scores, args)
    alone = igarss_exp1.train_heads(heads[2:3], embedding, data, scores, args)
    np.testing.assert_allclose(together["params"]["kernel"][2], alone["params"]["kernel"][0], atol=1e-6)


def test_worker_processes_train_the_same_heads_as_this_process(small_data):
    data, _, _ = small_data
    scores = igarss_exp1.fold_task_scores(data, 0)
    heads = {
        "clip": [
            {"method": method, "fold": fold, "key": 10 * index + fold}
            for index, method in enumerate(("dtl_hard", "tg_matl"))
            for fold in (1, 2)
        ]
    }
    jobs = igarss_exp1.split_into_jobs(heads, data["embeddings"], 2)
    kernels = {}
    for workers in (1, 2):
        args = parse("--epochs", "3", "--learning_rate", "0.01", "--workers", str(workers))

        def record(job, result, workers=workers):
            for index, head in enumerate(result["heads"]):
                kernels[(workers, head["key"])] = result["params"]["kernel"][index]

        igarss_exp1.train_jobs(jobs, data, scores, args, record)
    assert len(kernels) == 8
    for key in (1, 2, 11, 12):
        np.testing.assert_allclose(kernels[(2, key)], kernels[(1, key)], atol=1e-6)


def knn_accuracy_of(result, data, embedding, label_key):
    accuracies = []
    for index, head in enumerate(result["heads"]):
        train, _ = data["folds"][head["fold"] - 1]
        kernel, bias = result["params"]["kernel"][index], result["params"]["bias"][index]
        accuracies.append(
            igarss_exp1.knn_accuracy(
                embedding[train] @ kernel + bias,
                data[label_key][train],
                embedding[data["test"]] @ kernel + bias,
                data[label_key][data["test"]],
            )
        )
    return float(np.mean(accuracies))


def test_training_separates_classes_and_matl_adds_box_structure(tmp_path):
    data_path, embeddings_dir = awir.make_demo_data(
        tmp_path / "data", num_samples=240, seed=3, widths={"clip": 24, "dinov2": 24, "mae": 24}
    )
    data = awir.load_awir(data_path, embeddings_dir, ["clip"], tmp_path / "results", 0.7)
    args = parse("--epochs", "60", "--learning_rate", "0.01")
    embedding = data["embeddings"]["clip"]
    scores = igarss_exp1.fold_task_scores(data, args.seed)
    heads = [
        {"method": method, "fold": fold, "key": 10 * i + fold}
        for i, method in enumerate(("dtl", "matl"))
        for fold in range(1, 9)
    ]
    result = igarss_exp1.train_heads(heads, embedding, data, scores, args)
    by_method = {method: {"heads": [], "params": {"kernel": [], "bias": []}} for method in ("dtl", "matl")}
    for index, head in enumerate(result["heads"]):
        group = by_method[head["method"]]
        group["heads"].append(head)
        group["params"]["kernel"].append(result["params"]["kernel"][index])
        group["params"]["bias"].append(result["params"]["bias"][index])
    class_accuracy = {m: knn_accuracy_of(g, data, embedding, "class_label") for m, g in by_method.items()}
    cluster_accuracy = {m: knn_accuracy_of(g, data, embedding, "box_cluster") for m, g in by_method.items()}
    assert class_accuracy["dtl"] > 0.6, class_accuracy  # chance is 1/3
    assert class_accuracy["matl"] > 0.5, class_accuracy
    assert cluster_accuracy["matl"] > cluster_accuracy["dtl"], cluster_accuracy


def assert_tensorboard_holds_the_printed_losses(results, stdout):
    """Every head's train and val loss at both epochs, a TensorBoard run per embedding; per stack their
    mean at the last epoch is the printed mean train / val loss."""
    folder = results / "trained_models" / "exp1_emb_proj" / "tensorboard"
    printed = re.findall(
        r"^  (\w+)\S* epoch 2/2 .* mean train loss (\S+)  mean val loss (\S+)$", stdout, re.M
    )
    assert sorted(name for name, _, _ in printed) == sorted(awir.EMBEDDING_NAMES)
    for name, train_loss, val_loss in printed:
        last = {"train_loss": [], "val_loss": []}
        scalars = tensorboard.read_scalars(folder / name)
        methods = ("dtl", "dtl_hard", "matl", "tg_matl_30_10")
        assert sorted(scalars) == sorted(
            f"{m}/{loss}/fold{k}" for m in methods for loss in last for k in range(1, 9)
        )
        for tag_name, values in scalars.items():
            assert sorted(values) == [1, 2]
            last[tag_name.split("/")[1]].append(values[2])
        assert np.mean(last["train_loss"]) == pytest.approx(float(train_loss), abs=1e-4)
        assert np.mean(last["val_loss"]) == pytest.approx(float(val_loss), abs=1e-4)


def test_loss_histories_go_to_tensorboard_a_tag_per_head_unless_turned_off(tmp_path):
    heads = [{"method": "dtl", "fold": 1}, {"method": "matl", "fold": 1}, {"method": "dtl", "fold": 2}]
    history = np.arange(12, dtype=np.float32).reshape(4, 3)
    result = {"heads": heads, "train_history": history, "val_history": -history}

    def write(folder, enabled):
        stacked_training.write_loss_histories(
            result, folder, lambda head, loss: f"{head['method']}/{loss}/fold{head['fold']}", enabled
        )

    write(tmp_path / "off", enabled=False)
    assert not (tmp_path / "off").exists()
    assert parse("--no_tensorboard").no_tensorboard and "no_tensorboard" not in igarss_exp1.RESUME_SETTINGS
    write(tmp_path / "on", enabled=True)
    scalars = tensorboard.read_scalars(tmp_path / "on")
    assert scalars["dtl/train_loss/fold2"] == {1: 2.0, 2: 5.0, 3: 8.0, 4: 11.0}
    assert scalars["dtl/val_loss/fold1"] == {1: -0.0, 2: -3.0, 3: -6.0, 4: -9.0}
    assert scalars["matl/val_loss/fold1"] == {1: -1.0, 2: -4.0, 3: -7.0, 4: -10.0}
    assert len(scalars) == 6


def test_help():
    completed = run_script("igarss_exp1.py", "--help")
    assert completed.returncode == 0 and "--margin" in completed.stdout


def test_demo_writes_every_documented_file_and_heads_reload(tmp_path, capsys):
    results = tmp_path / "results"
    argv = f"--demo --epochs 2 --workers 1 --results_dir {results} --calibration_epochs 1 --views umap"
    completed = run_script("igarss_exp1.py", *argv.split())
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "summary: tg_matl_30_10" in completed.stdout
    assert "ms per head-epoch" in completed.stdout and "silhouette clip dtl: class" in completed.stdout
    with open(results / "exp1_timings" / "method_costs_test0.7.csv", newline="") as file:
        costs = list(csv.DictReader(file))
    assert len(costs) == 12 and all(float(row["ms_per_head_epoch"]) > 0 for row in costs)
    views = results / "exp1_test_projections" / "views"
    assert sorted(p.name for p in views.glob("*.png")) == [f"{e}_umap.png" for e in ("clip", "dinov2", "mae")]
    with open(views / "silhouette.csv", newline="") as file:
        silhouettes = list(csv.DictReader(file))
    assert len(silhouettes) == 12 and all(-1 <= float(r["silhouette_class"]) <= 1 for r in silhouettes)
    models = sorted((results / "trained_models" / "exp1_emb_proj").glob("*/*.h5"))
    projections = sorted((results / "exp1_test_projections").glob("*/*.npy"))
    assert len(models) == 96 and len(projections) == 96
    for embedding in awir.EMBEDDING_NAMES:
        for tag in ("dtl", "dtl_hard", "matl", "tg_matl_30_10"):
            for fold in range(1, 9):
                assert (
                    results / "trained_models" / "exp1_emb_proj" / embedding / f"{tag}_best_fold{fold}.h5"
                ).exists()
                assert (
                    results / "exp1_test_projections" / embedding / f"{tag}_proj_val0.7_fold{fold}.npy"
                ).exists()
    with open(results / "exp1_timings" / "timings_test0.7.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 24
    assert set(rows[0]) == {
        "experiment",
        "fold",
        "dtl_train_time",
        "dtl_hard_train_time",
        "matl_train_time",
        "tg_matl_train_time",
    }
    assert (results / "splits" / "folds_test0.7.json").exists()
    assert no_temporary_files(results), "temporary files left behind"
    assert_tensorboard_holds_the_printed_losses(results, completed.stdout)
    # A reloaded head reproduces its stored test projection.
    data = awir.load_awir(
        results / "demo_data" / "igarss_exp1" / "data.npz",
        results / "demo_data" / "igarss_exp1" / "embeddings",
        ["dinov2"],
        results,
        0.7,
    )
    model = keras.models.load_model(
        results / "trained_models" / "exp1_emb_proj" / "dinov2" / "matl_best_fold3.h5", compile=False
    )
    stored = np.load(results / "exp1_test_projections" / "dinov2" / "matl_proj_val0.7_fold3.npy")
    assert stored.shape == (168, 64) and stored.dtype == np.float32
    np.testing.assert_allclose(
        model.predict(data["embeddings"]["dinov2"][data["test"]], verbose=0), stored, atol=1e-4
    )
    # A re-run reuses the finished heads; other training arguments are refused, not mixed in.
    demo_args = ["--demo", "--epochs", "2", "--workers", "1", "--results_dir", str(results), "--views"]
    igarss_exp1.main(parse(*demo_args, "--embeddings", "clip"))
    assert "finished heads reused for clip" in capsys.readouterr().out
    assert_main_error(
        capsys, lambda: igarss_exp1.main(parse(*demo_args, "--margin", "0.3")), "margin=0.1 (now 0.3)"
    )


def write_inputs(root, class_label, box_label, embeddings):
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "data.npz", class_label=class_label, box_label=box_label)
    (root / "embeddings").mkdir(exist_ok=True)
    for name, values in embeddings.items():
        np.save(root / "embeddings" / f"awir_{name}_emb.npy", values)
    return root / "data.npz", root / "embeddings"


def valid_inputs(num_samples=48):
    rng = np.random.default_rng(0)
    class_label = np.arange(num_samples) % 3
    box = rng.integers(0, 100, (num_samples, 2))
    box_label = np.stack([box[:, 0], box[:, 0] + 50, box[:, 1], box[:, 1] + 20], axis=1)
    return class_label, box_label, {"clip": rng.normal(size=(num_samples, 8)).astype(np.float32)}


def corrupt(case):
    class_label, box_label, embeddings = valid_inputs()
    if case == "mismatched_n":
        embeddings["clip"] = embeddings["clip"][:-1]
    elif case == "wrong_shape":
        embeddings["clip"] = embeddings["clip"].reshape(48, 2, 4)
    elif case == "nan":
        embeddings["clip"][5, 2] = np.nan
    elif case == "bad_class":
        class_label = class_label.copy()
        class_label[7] = 3
    elif case == "box_order":
        box_label = box_label.copy()
        box_label[4, 0], box_label[4, 1] = 90, 10
    elif case == "box_shape":
        box_label = box_label[:, :3]
    return class_label, box_label, embeddings


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_data", "data.npz: file not found"),
        ("missing_embedding", "awir_clip_emb.npy: file not found"),
        ("mismatched_n", "has 47 rows but data.npz has 48 samples"),
        ("wrong_shape", "has shape (48, 2, 4); expected shape (N, D)"),
        ("nan", "embeddings contain NaN or Inf (first at index (5, 2))"),
        ("bad_class", "sample 7 has class 3; expected class ids in 0..2"),
        ("box_order", "sample 4 has xmin > xmax"),
        ("box_shape", "has shape (48, 3); expected shape (N, 4)"),
    ],
)
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case, message):
    data_path, embeddings_dir = write_inputs(tmp_path / "in", *corrupt(case))
    if case == "missing_data":
        data_path.unlink()
    if case == "missing_embedding":
        (embeddings_dir / "awir_clip_emb.npy").unlink()
    results = tmp_path / "results"
    args = parse(
        "--data",
        str(data_path),
        "--embeddings_dir",
        str(embeddings_dir),
        "--embeddings",
        "clip",
        "--results_dir",
        str(results),
        "--epochs",
        "1",
    )
    assert_main_error(capsys, lambda: igarss_exp1.main(args), message)
    assert not results.exists() or not any(results.rglob("*.*"))


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    completed = run_script(
        "igarss_exp1.py", "--data", tmp_path / "nowhere.npz", "--results_dir", tmp_path / "results"
    )
    # The whole of stderr is the one line: TensorFlow's start-up lines are kept out too.
    assert_process_error(completed, "nowhere.npz: file not found")


def test_zero_validation_loss_note_follows_the_model_selection():
    """With --model_selection last the last epoch is kept, so the note never says "the first such epoch"."""
    assert "first such epoch" not in igarss_exp1.zero_loss_note("last")
    assert "last epoch" in igarss_exp1.zero_loss_note("last")
    assert "first such epoch" in igarss_exp1.zero_loss_note("reference")
