"""Which samples, which weights and which passes train_owl_gps.py's method steps use.

The Reptile step is checked against the inner loop replayed on the support half only (and must differ
from the same loop over the whole batch); the acquisition against concept weights and pool membership
chosen so that a swapped weight, a labelled or test patch, or a normalisation over the wrong set
changes the ranking or the scores; MC-dropout against a model whose dropout is switched off.
"""

from types import SimpleNamespace

import numpy as np
import pytest

import train_owl_gps as owl
from common.owl_gps import datasets, patches


def tiny_args(**overrides):
    args = owl.get_args_parser().parse_args([])
    values = dict(epochs=1, batch_size=4, score_batch_size=7, mc_passes=3, ensemble_size=2)
    values.update(overrides)
    for key, value in values.items():
        setattr(args, key, value)
    return args


def labelled_batch(count, seed):
    images, labels, _ = datasets.synthetic_dataset(count, 8, 0.3, seed)
    return patches.ArrayPatches(images).read(np.arange(count)), labels


# ---- Reptile ----


def replay_inner_loop(learner, theta, images, labels, order, inner_steps):
    """The inner SGD loop run by hand on `images[order]`: the adapted weights it gives."""
    learner.adapted.set_weights(theta)
    learner.reseed_dropout(5, 1, 3)
    size = learner.args.inner_batch_size
    for start in list(range(0, len(order), size))[:inner_steps]:
        batch = order[start : start + size]
        learner.inner_step(images[batch], labels[batch].astype(np.int32))
    return learner.adapted.get_weights()


def reptile_learner():
    # 12 labels: support = the first 6. Batches of 2 and 6 steps cover the whole support half.
    args = tiny_args(inner_batch_size=2, inner_steps=6, inner_lr=0.05, meta_lr=0.5, keep_optimizer_state=True)
    learner = owl.Learner(args, 8)
    learner.initialise(3)
    return learner


def test_reptile_adapts_on_the_support_half_only():
    learner = reptile_learner()
    images, labels = labelled_batch(12, 2)
    theta = learner.members[0].get_weights()
    # The step's own draw: a permutation of the 6 support positions.
    support_order = np.random.default_rng(7).permutation(6)
    expected = replay_inner_loop(learner, theta, images, labels, support_order, 6)
    whole_order = np.random.default_rng(7).permutation(12)
    whole = replay_inner_loop(learner, theta, images, labels, whole_order, 6)

    learner.members[0].set_weights(theta)
    learner.reseed_dropout(5, 1, 3)
    learner.reptile(images, labels, np.random.default_rng(7))
    adapted = learner.adapted.get_weights()
    for ours, reference in zip(adapted, expected, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, w, atol=1e-6) for a, w in zip(adapted, whole, strict=True))
    for updated, before, after in zip(learner.members[0].get_weights(), theta, expected, strict=True):
        np.testing.assert_allclose(updated, before + 0.5 * (after - before), rtol=1e-5, atol=1e-6)


def test_reptile_never_trains_on_the_query_half():
    # Query patches full of NaN: one gradient step on any of them would make the weights NaN.
    learner = reptile_learner()
    images, labels = labelled_batch(12, 2)
    images[6:] = np.nan
    theta = learner.members[0].get_weights()
    learner.reptile(images, labels, np.random.default_rng(7))
    assert all(np.isfinite(w).all() for w in learner.adapted.get_weights())
    changed = [not np.allclose(a, t) for a, t in zip(learner.adapted.get_weights(), theta, strict=True)]
    assert any(changed), "the inner loop changed nothing"
    assert all(np.isfinite(w).all() for w in learner.members[0].get_weights())


def test_reptile_query_loss_is_the_adapted_copy_on_the_query_half():
    learner = reptile_learner()
    images, labels = labelled_batch(12, 4)
    labels[6:] = 1 - labels[6:]  # make the query half's loss differ from the support half's
    query_loss = learner.reptile(images, labels, np.random.default_rng(1))
    probability = learner.adapted_probabilities(images[6:]).numpy()
    expected = -np.log(probability[np.arange(6), labels[6:]]).mean()
    assert query_loss == pytest.approx(expected, rel=1e-5)
    support = learner.adapted_probabilities(images[:6]).numpy()
    assert query_loss != pytest.approx(-np.log(support[np.arange(6), labels[:6]]).mean(), rel=1e-3)


def test_reptile_query_loss_clips_a_zero_probability_at_1e_12():
    # An adapted copy that gives every query patch's true class probability 0: the loss stays finite.
    learner = reptile_learner()
    images, labels = labelled_batch(12, 4)
    wrong = np.eye(2, dtype=np.float32)[1 - labels[6:]]
    learner.adapted_probabilities = lambda batch: SimpleNamespace(numpy=lambda: wrong)
    query_loss = learner.reptile(images, labels, np.random.default_rng(1))
    assert query_loss == pytest.approx(-np.log(1e-12), rel=1e-6)


def test_adapt_puts_the_support_half_first(tmp_path, monkeypatch):
    """The round's Reptile step receives the query reordered by support_first, with labels attached."""
    arm, _ = concept_arm(tmp_path, reptile_support="lower")
    seen = {}

    def fake_reptile(images, labels, rng):
        seen["labels"] = labels
        seen["images"] = images
        return 0.0

    monkeypatch.setattr(arm.learner, "reptile", fake_reptile)
    arm.rows = [{"seconds": 0.0, "meta_query_loss": float("nan")}]
    ids = np.array([5, 9, 13, 17, 21, 25])  # highest score first
    arm.adapt(1, ids, ids % 3 == 0)
    np.testing.assert_array_equal(seen["labels"], ids[::-1] % 3 == 0)
    np.testing.assert_array_equal(seen["images"], arm.source.read(ids[::-1]))
    # Fewer than 4 labels: no Reptile step.
    seen.clear()
    arm.adapt(1, ids[:3], ids[:3] % 2)
    assert not seen


# ---- acquisition ----


def concept_arm(tmp_path, **overrides):
    """A 40-patch arm whose concept columns are (urban, near_industrial), weighted 2 and 3."""
    weights = "urban=2,near_industrial=3"
    args = tiny_args(initial_budget=4, query_budget=5, concept_weights=weights, **overrides)
    images, labels, _ = datasets.synthetic_dataset(40, 8, 0.3, 1)
    test_ids, pool_ids, initial_ids = owl.split_pool_test(40, args.test_fraction, args.initial_budget, 0)
    active = np.zeros((40, 2), dtype=bool)
    unlabelled = np.setdiff1d(pool_ids, initial_ids)
    # Relevance 6 (both concepts) only where a query must not look: the labelled and the test patches.
    active[initial_ids] = True
    active[test_ids] = True
    # In the unlabelled pool: 3 patches near industry (3), 3 urban (2), the rest neither (1).
    active[unlabelled[:3], 1] = True
    active[unlabelled[3:6], 0] = True
    data = {
        "source": patches.ArrayPatches(images),
        "labels": labels,
        "active": active,
        "locations": None,
        "name": "tiny",
    }
    learner = owl.Learner(args, 8)
    learner.initialise(0)
    arm = owl.ActiveLearningRun(args, data, learner, tmp_path, "relevance", 0)
    arm.add_labels(0, arm.initial_ids, labels[arm.initial_ids], [None] * 4)
    arm.rows = [{"seconds": 0.0}]
    return arm, unlabelled


def test_relevance_query_ranks_by_the_named_weights_over_the_unlabelled_pool(tmp_path):
    arm, unlabelled = concept_arm(tmp_path)
    chosen, scores = arm.query(1)
    # The 3 near-industrial patches (r = 3) first, then 2 of the urban ones (r = 2).
    assert set(chosen[:3].tolist()) == set(unlabelled[:3].tolist())
    assert set(chosen[3:].tolist()) <= set(unlabelled[3:6].tolist())
    # Min-max over the unlabelled pool only (r from 1 to 3): 1.0 and 0.5. Over every patch
    # (r up to 6) they would be 0.4 and 0.2.
    np.testing.assert_allclose(scores, [1.0, 1.0, 1.0, 0.5, 0.5])


def test_uncertainty_query_scores_the_unlabelled_pool_with_the_learners_estimate(tmp_path):
    arm, unlabelled = concept_arm(tmp_path)
    arm.strategy = "uncertainty"
    chosen, scores = arm.query(1)
    arm.learner.reseed_dropout(0, 1, 2)
    expected = owl.min_max(arm.learner.pool_uncertainty(arm.source, unlabelled))
    assert set(chosen.tolist()) <= set(unlabelled.tolist())
    order = np.argsort(-expected, kind="stable")[:5]
    np.testing.assert_allclose(sorted(scores, reverse=True), expected[order], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(scores, expected[np.searchsorted(unlabelled, chosen)], rtol=1e-6)


def test_concept_query_mixes_both_terms_with_alpha(tmp_path):
    arm, unlabelled = concept_arm(tmp_path, alpha=0.25)
    arm.strategy = "concept"
    chosen, scores = arm.query(1)
    arm.learner.reseed_dropout(0, 1, 2)
    uncertainty = arm.learner.pool_uncertainty(arm.source, unlabelled)
    expected = 0.25 * owl.min_max(uncertainty) + 0.75 * owl.min_max(arm.relevance[unlabelled])
    np.testing.assert_allclose(scores, expected[np.searchsorted(unlabelled, chosen)], rtol=1e-6)
    assert np.all(np.diff(scores) <= 1e-12)  # highest first


# ---- MC-dropout ----


def test_mc_dropout_averages_passes_with_dropout_active():
    learner = owl.Learner(tiny_args(uncertainty="mc_dropout", mc_passes=8, score_batch_size=16), 8)
    learner.initialise(0)
    x, _ = labelled_batch(9, 5)
    deterministic = learner.probabilities[0](x).numpy()
    learner.reseed_dropout(0, 1, 2)
    mean, mean_entropy = (t.numpy() for t in learner.mc(x))
    # Dropout active: the mean moves away from the deterministic prediction and the passes disagree,
    # so the mean pass entropy is below the entropy of the mean (BALD > 0).
    assert np.abs(mean - deterministic).max() > 1e-3
    assert np.all(owl.entropy(mean) - mean_entropy > 0)
    np.testing.assert_allclose(mean.sum(1), 1.0, rtol=1e-5)
    # pool_uncertainty reads the same moments: entropy of the mean, or BALD.
    for mc_score, expected in (("entropy", owl.entropy(mean)), ("bald", owl.entropy(mean) - mean_entropy)):
        learner.args.mc_score = mc_score
        learner.reseed_dropout(0, 1, 2)
        np.testing.assert_allclose(
            learner.pool_uncertainty(patches.ArrayPatches(np.transpose(x, (0, 3, 1, 2))), np.arange(9)),
            expected,
            rtol=1e-4,
            atol=1e-6,
        )


def test_mc_dropout_mean_converges_and_averages_all_passes():
    """More passes: the mean of T passes is the average of the T single-pass means drawn in turn."""
    learner = owl.Learner(tiny_args(uncertainty="mc_dropout", mc_passes=1), 8)
    learner.initialise(0)
    x, _ = labelled_batch(5, 6)
    learner.reseed_dropout(0, 1, 2)
    singles = [learner.mc(x)[0].numpy() for _ in range(4)]
    many = owl.Learner(tiny_args(uncertainty="mc_dropout", mc_passes=4), 8)
    many.members[0].set_weights(learner.members[0].get_weights())
    many.reseed_dropout(0, 1, 2)
    np.testing.assert_allclose(many.mc(x)[0].numpy(), np.mean(singles, 0), rtol=1e-5, atol=1e-6)
