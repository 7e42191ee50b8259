"""OWL-GPS pieces on hand-made inputs: relevance, normalisation, top-k, alpha schedule, uncertainty,
Reptile, the lazy .npy reader and the CSV oracle's validation."""

import math

import numpy as np
import pytest

import train_owl_gps as owl
from common.errors import InputError
from common.owl_gps import datasets, patches


def test_concept_relevance_is_product_of_active_weights():
    # Columns: urban (w=2), near_industrial (w=3).
    active = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=bool)
    np.testing.assert_allclose(owl.concept_relevance(active, [2.0, 3.0]), [1.0, 2.0, 3.0, 6.0])


def test_acquisition_score_matches_hand_computation():
    uncertainty = np.array([0.2, 0.6, 0.4, 0.6])
    relevance = np.array([1.0, 2.0, 6.0, 3.0])
    u_normalised = np.array([0.0, 1.0, 0.5, 1.0])  # (u - 0.2) / 0.4
    r_normalised = np.array([0.0, 0.2, 1.0, 0.4])  # (r - 1) / 5
    np.testing.assert_allclose(owl.min_max(uncertainty), u_normalised)
    np.testing.assert_allclose(owl.min_max(relevance), r_normalised)
    np.testing.assert_allclose(
        owl.acquisition_score(uncertainty, relevance, 0.3), 0.3 * u_normalised + 0.7 * r_normalised
    )
    # A constant vector carries no ranking information and normalises to zeros, not NaN.
    np.testing.assert_array_equal(owl.min_max([5.0, 5.0, 5.0]), [0.0, 0.0, 0.0])


def test_parse_concept_weights_and_bad_text():
    assert owl.parse_concept_weights("urban=2, near_industrial=3.5") == {"urban": 2.0, "near_industrial": 3.5}
    with pytest.raises(InputError, match="concept_weights"):
        owl.parse_concept_weights("urban:2")


def test_top_k_orders_by_score_and_respects_budget():
    rng = np.random.default_rng(0)
    candidates = np.array([3, 7, 11, 20])
    chosen = owl.select_top_k(candidates, np.array([0.1, 0.9, 0.5, 0.7]), 2, rng)
    np.testing.assert_array_equal(chosen, [7, 20])
    # A budget larger than the pool returns each candidate exactly once.
    chosen = owl.select_top_k(candidates, np.array([0.1, 0.9, 0.5, 0.7]), 10, rng)
    np.testing.assert_array_equal(chosen, [7, 20, 11, 3])


def _tiny_args(**overrides):
    args = owl.get_args_parser().parse_args([])
    values = dict(epochs=1, batch_size=4, score_batch_size=7, mc_passes=3, ensemble_size=2, inner_steps=5)
    values.update(overrides)
    for key, value in values.items():
        setattr(args, key, value)
    return args


def _tiny_arm(tmp_path, **overrides):
    args = _tiny_args(initial_budget=4, query_budget=30, **overrides)
    images, labels, _ = datasets.synthetic_dataset(40, 8, 0.3, 1)
    data = {
        "source": patches.ArrayPatches(images),
        "labels": labels,
        "active": np.zeros((40, 1), dtype=bool),
        "locations": None,
        "name": "tiny",
    }
    learner = owl.Learner(args, 8)
    return owl.ActiveLearningRun(args, data, learner, tmp_path, "concept", 0), learner


def test_query_never_reselects_labelled_and_caps_at_pool(tmp_path):
    arm, learner = _tiny_arm(tmp_path)
    learner.initialise(0)
    arm.add_labels(0, arm.initial_ids, arm.oracle(0, arm.initial_ids, [None] * 4), [None] * 4)
    arm.train_and_evaluate(1)
    # The pool holds 32 patches, 4 labelled: a budget of 30 gets the 28 unlabelled ones, once each.
    chosen, scores = arm.query(1)
    assert len(chosen) == 28 == len(set(chosen.tolist()))
    assert not set(chosen.tolist()) & set(arm.initial_ids.tolist())
    assert set(chosen.tolist()) <= set(arm.pool_ids.tolist())
    assert not set(chosen.tolist()) & set(arm.test_ids.tolist())
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_alpha_schedule():
    assert owl.alpha_for_round(0.5, "constant", 7, 10) == 0.5
    assert [owl.alpha_for_round(0.5, "linear", t, 10) for t in (0, 3, 7, 9)] == pytest.approx(
        [0.3, 0.6, 1.0, 1.0]
    )


def test_entropy_formula():
    probabilities = np.array([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]])
    expected = [math.log(2), 0.0, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
    np.testing.assert_allclose(owl.entropy(probabilities), expected, atol=1e-9)


def test_reptile_update_formula():
    theta = [np.array([1.0, 2.0]), np.array([[0.0]])]
    adapted = [np.array([3.0, 0.0]), np.array([[1.0]])]
    updated = owl.reptile_update(theta, adapted, 0.1)
    np.testing.assert_allclose(updated[0], [1.2, 1.8])
    np.testing.assert_allclose(updated[1], [[0.1]])


@pytest.mark.parametrize("keep_optimizer_state", [False, True])
def test_learner_reptile_step_on_tiny_model(keep_optimizer_state):
    args = _tiny_args(meta_lr=0.25, inner_lr=0.05, keep_optimizer_state=keep_optimizer_state)
    learner = owl.Learner(args, 8)
    learner.initialise(3)
    images, labels, _ = datasets.synthetic_dataset(12, 8, 0.3, 2)
    x = patches.ArrayPatches(images).read(np.arange(12))
    learner.train_round(x, labels, np.random.default_rng(0))  # gives Adam non-zero moments
    theta = learner.members[0].get_weights()
    query_loss = learner.reptile(x[:10], labels[:10], np.random.default_rng(1))
    adapted = learner.adapted.get_weights()
    assert any(not np.allclose(a, t) for a, t in zip(adapted, theta, strict=True)), (
        "the inner SGD step changed nothing"
    )
    for updated, before, after in zip(learner.members[0].get_weights(), theta, adapted, strict=True):
        np.testing.assert_allclose(updated, before + 0.25 * (after - before), rtol=1e-5, atol=1e-7)
    assert np.isfinite(query_loss) and query_loss > 0
    moments = [v for v in learner.optimizers[0].variables if "momentum" in v.path]
    assert any(np.abs(np.asarray(v)).sum() > 0 for v in moments) == keep_optimizer_state


def test_uncertainty_estimators_are_bounded_and_batched():
    images, _, _ = datasets.synthetic_dataset(17, 8, 0.0, 4)
    source = patches.ArrayPatches(images)
    ids = np.arange(17)
    for uncertainty, mc_score in (
        ("entropy", "entropy"),
        ("mc_dropout", "entropy"),
        ("mc_dropout", "bald"),
        ("ensemble", "entropy"),
    ):
        learner = owl.Learner(_tiny_args(uncertainty=uncertainty, mc_score=mc_score), 8)
        learner.initialise(0)
        learner.reseed_dropout(0, 1, 2)
        scores = learner.pool_uncertainty(source, ids)  # 17 patches in batches of 7
        assert scores.shape == (17,)
        assert (scores >= -1e-6).all() and (scores <= math.log(2) + 1e-6).all()
        if uncertainty == "entropy":
            logits = np.asarray(learner.members[0](source.read(ids), training=False), np.float64)
            probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            expected = owl.entropy(probabilities)
            np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_mc_dropout_moments_equal_full_passes():
    """The trunk-once MC-dropout twin gives the moments of T full stochastic passes of the model."""
    import tensorflow as tf

    learner = owl.Learner(_tiny_args(uncertainty="mc_dropout", mc_passes=4), 8)
    learner.initialise(0)
    images, _, _ = datasets.synthetic_dataset(9, 8, 0.3, 5)
    x = patches.ArrayPatches(images).read(np.arange(9))
    learner.reseed_dropout(0, 1, 2)
    mean, mean_entropy = (t.numpy() for t in learner.mc(x))
    learner.reseed_dropout(0, 1, 2)
    model = learner.members[0]
    passes = np.stack([tf.nn.softmax(model(x, training=True)).numpy() for _ in range(4)])
    np.testing.assert_allclose(mean, passes.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean_entropy, owl.entropy(passes).mean(0), rtol=1e-4, atol=1e-5)


def test_lazy_npy_reader_matches_np_load(tmp_path):
    images = np.random.default_rng(0).random((50, 4, 6, 5)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    eager = patches.open_images_npy(tmp_path / "images.npy")
    lazy = patches.open_images_npy(tmp_path / "images.npy", in_memory_bytes=0)
    assert isinstance(eager, patches.ArrayPatches) and isinstance(lazy, patches.NpyPatches)
    for ids in (np.arange(10, 20), np.array([49, 0, 17]), np.array([5, 3, 4])):
        expected = np.transpose(images[ids], (0, 2, 3, 1))
        np.testing.assert_array_equal(lazy.read(ids), expected)
        np.testing.assert_array_equal(eager.read(ids), expected)


def test_read_queue_validation(tmp_path):
    path = tmp_path / "queue_round1.csv"
    path.write_text("id,row,col,score,label\n4,,,0.9,1\n9,,,0.8,0\n")
    np.testing.assert_array_equal(owl.read_queue(path, [4, 9]), [1, 0])
    path.write_text("id,row,col,score,label\n4,,,0.9,1\n9,,,0.8,\n")
    with pytest.raises(InputError, match="line 3: blank label for id 9"):
        owl.read_queue(path, [4, 9])
    path.write_text("id,row,col,score,label\n4,,,0.9,yes\n9,,,0.8,0\n")
    with pytest.raises(InputError, match="label 'yes' for id 4 is not 0/1"):
        owl.read_queue(path, [4, 9])
    path.write_text("id,row,col,score,label\n4,,,0.9,1\n")
    with pytest.raises(InputError, match="queued id 9 is missing"):
        owl.read_queue(path, [4, 9])


def test_reptile_support_is_the_tutorials_lower_scored_half():
    """Tutorial: argsort ascending, keep the top k, adapt on their first half (the lower-scored ones)."""
    rng = np.random.default_rng(0)
    candidates, scores = np.arange(30), rng.permutation(30) / 30.0
    chosen = owl.select_top_k(candidates, scores, 10, np.random.default_rng(1))
    labels = chosen % 2
    tutorial_top_k = candidates[np.argsort(scores)][-10:]
    ids, reordered = owl.support_first(chosen, labels, "lower")
    np.testing.assert_array_equal(ids[:5], tutorial_top_k[:5])  # the tutorial's support set, in order
    np.testing.assert_array_equal(np.sort(ids[5:]), np.sort(tutorial_top_k[5:]))
    np.testing.assert_array_equal(reordered, ids % 2)  # labels travel with their ids
    upper, _ = owl.support_first(chosen, labels, "upper")
    np.testing.assert_array_equal(np.sort(upper[:5]), np.sort(tutorial_top_k[5:]))


def test_train_loss_is_the_mean_of_batch_means():
    """10 labels in batches of 4: batches of 4, 4 and 2 each count once, as in the tutorial's loop."""
    learner = owl.Learner(_tiny_args(epochs=2, batch_size=4), 8)
    learner.train_steps = [lambda x, y: float(len(y))]  # a step whose batch-mean loss is its size
    loss = learner.train_round(np.zeros((10, 8, 8, 4), np.float32), np.zeros(10), np.random.default_rng(0))
    assert loss == pytest.approx((4 + 4 + 2) / 3)  # not the per-sample mean (16 + 16 + 4) / 10


def test_ensemble_uncertainty_evaluates_member_0_unless_ensemble_eval():
    images, _, _ = datasets.synthetic_dataset(9, 8, 0.3, 6)
    source, ids = patches.ArrayPatches(images), np.arange(9)
    for ensemble_eval in (False, True):
        learner = owl.Learner(_tiny_args(uncertainty="ensemble", ensemble_eval=ensemble_eval), 8)
        learner.initialise(0)
        single = owl.Learner(_tiny_args(), 8)
        single.initialise(0)
        members = [p(source.read(ids)).numpy()[:, 1] for p in learner.probabilities]
        expected = np.mean(members, 0) if ensemble_eval else members[0]
        np.testing.assert_allclose(learner.predict_positive(source, ids), expected, rtol=1e-6)
        # Member 0 is initialised as the single model of the entropy estimator: the same classifier.
        for a, b in zip(learner.members[0].get_weights(), single.members[0].get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.allclose(members[0], members[1])


def _write_tutorial_pickle(path, structure):
    import pickle

    with open(path, "wb") as file:
        pickle.dump(structure, file)


@pytest.mark.parametrize("layout", ["rows", "columns", "by_id"])
def test_tutorial_concepts_pkl_is_read_without_running_code(tmp_path, layout):
    images, labels, concepts = datasets.synthetic_dataset(12, 8, 0.3, 0)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    land_cover = concepts["land_cover"].tolist()
    distance = concepts["dist_industrial"].tolist()
    structure = {
        "rows": [{"land_cover": c, "dist_industrial": d} for c, d in zip(land_cover, distance, strict=True)],
        "columns": {"land_cover": land_cover, "dist_industrial": distance},
        "by_id": {
            i: {"land_cover": c, "dist_industrial": d}
            for i, (c, d) in enumerate(zip(land_cover, distance, strict=True))
        },
    }[layout]
    _write_tutorial_pickle(tmp_path / "concepts.pkl", structure)
    data = datasets.load_npy_dataset(tmp_path, ["urban", "near_industrial"], 0.3)
    np.testing.assert_array_equal(data["active"][:, 0], concepts["urban"].astype(bool))
    np.testing.assert_array_equal(data["active"][:, 1], concepts["near_industrial"].astype(bool))
    np.testing.assert_array_equal(data["labels"], labels)


def test_concepts_pkl_with_a_class_is_refused_before_it_runs(tmp_path):
    images, _, _ = datasets.synthetic_dataset(4, 8, 0.3, 0)
    np.save(tmp_path / "images.npy", images)

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never be printed",))

    _write_tutorial_pickle(tmp_path / "concepts.pkl", [{"land_cover": 1, "dist_industrial": Exploit()}])
    with pytest.raises(InputError, match=r"concepts.pkl.*class builtins.print, refused"):
        datasets.load_npy_dataset(tmp_path, ["urban"], 0.3)
    _write_tutorial_pickle(tmp_path / "concepts.pkl", {"land_cover": np.arange(4)})
    with pytest.raises(InputError, match=r"class numpy.*\.tolist\(\)"):
        datasets.load_npy_dataset(tmp_path, ["urban"], 0.3)
    (tmp_path / "concepts.pkl").unlink()
    with pytest.raises(InputError, match=r"concepts.csv: file not found.*concepts.pkl"):
        datasets.load_npy_dataset(tmp_path, ["urban"], 0.3)
