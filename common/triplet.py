"""TG-MATL triplet losses and task-guided selection on stacked mini-batches.

Every function works on a stack of M independent models' batches: embeddings (M, B, E), labels
(M, B), and a boolean `valid` (M, B) that marks real samples (padding and samples dropped by the
task-guided selection are False). Distances are Euclidean on the raw outputs, not squared; the
square root is guarded so its gradient at zero distance is finite.
"""

import tensorflow as tf

TINY = 1e-16


def pairwise_distance(embeddings):
    """(M, B, E) -> (M, B, B) Euclidean distances, with a finite gradient where two points coincide.

    Uses |a|^2 + |b|^2 - 2 a.b (one batched matrix product instead of a (M, B, B, E) difference
    tensor), clamped at 0 against rounding. The squared norms are the diagonal of the same Gram
    matrix, so for a point and its duplicate all four terms are the same float and the distance is
    exactly 0 (norms summed separately differ from the matrix product's dot products by rounding:
    up to 0.016 at norm 31 in float32, a sixth of the margin 0.1).
    """
    gram = tf.matmul(embeddings, embeddings, transpose_b=True)
    squared_norm = tf.linalg.diag_part(gram)
    squared = squared_norm[:, :, None] + squared_norm[:, None, :] - 2.0 * gram
    off_diagonal = 1.0 - tf.eye(tf.shape(embeddings)[1], dtype=embeddings.dtype)[None]
    squared = tf.maximum(squared, 0.0) * off_diagonal
    is_zero = tf.cast(squared <= 0.0, squared.dtype)
    return tf.sqrt(squared + is_zero * TINY) * (1.0 - is_zero)


def batch_all_triplet_loss(distance, labels, valid, margin):
    """Batch-all triplet loss L_BA per model (MATL paper, arXiv 2504.08054: the DTL loss).

    Valid triplets (a, p, n) are pairwise distinct, all valid, with y_a = y_p != y_n;
    l = max(0, D_ap - D_an + m); L = sum(l) / (count(l > 1e-16) + 1e-16), 0 when nothing violates.

    The triplet mask factorises as positive[a, p] * negative[a, n] (n differs from a and p by its
    label). With x_ap = D_ap + m and y_an = D_an, sum(l) = sum_ap x_ap c_ap - sum_an y_an c_an where
    c_ap = #{n: l_apn > 0} and c_an = #{p: l_apn > 0}. The counts are piecewise constant, so only
    they need the (B, B, B) comparison, which carries no gradient: value and gradient equal those of
    the relu form, at a fraction of its cost.
    """
    batch_size = tf.shape(labels)[1]
    same = tf.equal(labels[:, :, None], labels[:, None, :])
    pair_valid = valid[:, :, None] & valid[:, None, :]
    positive = same & pair_valid & ~tf.eye(batch_size, dtype=tf.bool)[None]
    negative = ~same & pair_valid
    far = tf.cast(1e9, distance.dtype)
    anchor_positive = tf.where(positive, distance + margin, -far)
    anchor_negative = tf.where(negative, distance, far)
    violates = tf.cast(
        tf.stop_gradient(anchor_positive)[:, :, :, None] - tf.stop_gradient(anchor_negative)[:, :, None, :]
        > TINY,
        distance.dtype,
    )
    positive_counts = tf.reduce_sum(violates, axis=3)
    negative_counts = tf.reduce_sum(violates, axis=2)
    violation_sum = tf.reduce_sum(
        tf.where(positive, anchor_positive, 0.0) * positive_counts, axis=[1, 2]
    ) - tf.reduce_sum(tf.where(negative, anchor_negative, 0.0) * negative_counts, axis=[1, 2])
    return violation_sum / (tf.reduce_sum(positive_counts, axis=[1, 2]) + TINY)


def batch_hard_triplet_loss(distance, labels, valid, margin):
    """Batch-hard triplet loss per model: mean over anchors of max(0, d+ - d- + m): the paper's DTL-Hard.

    d+ is the largest distance to another sample of the anchor's class (0 if there is none); d- is
    the smallest distance to a sample of another class, or the row maximum when there is none.
    """
    dtype = distance.dtype
    batch_size = tf.shape(labels)[1]
    same = tf.equal(labels[:, :, None], labels[:, None, :])
    pair_valid = valid[:, :, None] & valid[:, None, :]
    not_self = ~tf.eye(batch_size, dtype=tf.bool)[None]
    positive_mask = tf.cast(same & not_self & pair_valid, dtype)
    hardest_positive = tf.reduce_max(distance * positive_mask, axis=2)
    row_maximum = tf.reduce_max(distance * tf.cast(pair_valid, dtype), axis=2, keepdims=True)
    negative_mask = ~same & pair_valid
    # Non-negatives are pushed above the row maximum so the minimum falls back to it when no
    # negative exists, exactly as the reference batch-hard implementation does.
    candidate = tf.where(negative_mask, distance, distance + row_maximum)
    candidate = tf.where(valid[:, None, :], candidate, tf.cast(float("inf"), dtype))
    hardest_negative = tf.reduce_min(candidate, axis=2)
    per_anchor = tf.nn.relu(hardest_positive - hardest_negative + margin) * tf.cast(valid, dtype)
    anchors = tf.reduce_sum(tf.cast(valid, dtype), axis=1)
    return tf.reduce_sum(per_anchor, axis=1) / tf.maximum(anchors, 1.0)


def matl_loss(distance, class_label, box_cluster, valid, margin, box_weight):
    """MATL = (1 - w) L_BA(class) + w L_BA(box cluster), each normalised by its own violating count.

    The MATL paper (arXiv 2504.08054) weighs the class and box-annotation triplet terms by w.
    """
    return (1.0 - box_weight) * batch_all_triplet_loss(
        distance, class_label, valid, margin
    ) + box_weight * batch_all_triplet_loss(distance, box_cluster, valid, margin)


def _rank_within_class(key, labels, valid):
    """Rank of each sample among the valid samples of its class by descending `key` (ties: lower index)."""
    batch_size = tf.shape(labels)[1]
    index = tf.range(batch_size)
    earlier = index[None, :, None] > index[None, None, :]  # [i, j]: j comes before i
    same_valid = tf.equal(labels[:, :, None], labels[:, None, :]) & valid[:, None, :]
    ahead = (key[:, None, :] > key[:, :, None]) | ((key[:, None, :] == key[:, :, None]) & earlier)
    return tf.reduce_sum(tf.cast(same_valid & ahead, tf.int32), axis=2)


def task_guided_selection(score, class_label, valid, top_percent, random_percent, random_key=None):
    """The paper's task-guided sample selection per batch and class (README: igarss_exp1.py).

    For each class c present among the valid samples (n_c of them) keep the top
    k_top = max(1, floor(n_c * top_percent)) by score, plus k_more = min(floor(n_c * random_percent),
    n_c - k_top) more: the next-ranked ones (`random_key` None, the reference behaviour) or, given a
    `random_key` (M, B) of random draws (any ordered dtype), those of the rest of the class with the
    largest keys.
    `top_percent` and `random_percent` are per model (M,), so one stack can hold a whole sweep grid.
    Returns the keep mask (M, B).
    """
    same_valid = tf.equal(class_label[:, :, None], class_label[:, None, :]) & valid[:, None, :]
    class_count = tf.reduce_sum(tf.cast(same_valid, tf.int32), axis=2)
    # k_top and k_more for every possible class count 0..B, looked up per sample: the float64
    # arithmetic stays on this small table (float64 inside the per-sample graph slows XLA's CPU
    # code for the whole triplet loss several-fold). The 1e-5 keeps e.g. floor(10 * 0.7) at 7
    # despite 0.7 being stored as 0.69999998 in float32.
    possible_count = tf.range(tf.shape(class_label)[1] + 1, dtype=tf.float64)[None, :]
    top_table = tf.maximum(tf.floor(possible_count * tf.cast(top_percent, tf.float64)[:, None] + 1e-5), 1.0)
    more_table = tf.minimum(
        tf.floor(possible_count * tf.cast(random_percent, tf.float64)[:, None] + 1e-5),
        possible_count - top_table,
    )
    k_top = tf.gather(tf.cast(top_table, tf.int32), class_count, batch_dims=1)
    k_more = tf.gather(tf.cast(more_table, tf.int32), class_count, batch_dims=1)
    rank = _rank_within_class(score, class_label, valid)
    if random_key is None:
        keep = rank < k_top + k_more
    else:
        rest = valid & (rank >= k_top)
        random_rank = _rank_within_class(random_key, class_label, rest)
        keep = (rank < k_top) | (rest & (random_rank < k_more))
    return keep & valid


def random_selection_key(model_key, model_step, sample_id):
    """A uniformly random int32 per (model, step, sample), independent of which models share the stack.

    Only the order of the keys matters; int32 rather than a float64 draw keeps XLA's CPU code fast.
    """
    mixed = (
        tf.cast(model_key, tf.int64)[:, None] * 0x2545F491
        + tf.cast(model_step, tf.int64)[:, None] * 0x6C8E9CF5
        + tf.cast(sample_id, tf.int64) * 0x1B873593
    )
    mixed = tf.bitwise.bitwise_and(mixed, tf.constant(0xFFFFFFFF, tf.int64))
    for shift, multiplier in ((16, 0x45D9F3B), (16, 0x45D9F3B), (16, 1)):
        shifted = tf.bitwise.right_shift(mixed, tf.constant(shift, tf.int64))
        mixed = tf.bitwise.bitwise_xor(mixed, shifted) * multiplier
        mixed = tf.bitwise.bitwise_and(mixed, tf.constant(0xFFFFFFFF, tf.int64))
    return tf.cast(mixed - 2**31, tf.int32)
