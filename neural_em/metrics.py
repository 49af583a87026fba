"""Grouping metrics (SPEC §6): AMI, ARI and confidence, vectorised over a batch.

Every score equals scikit-learn's for that image alone (``adjusted_mutual_info_score``,
``adjusted_rand_score``), special cases included, but is computed for a whole
batch at once:

* one (true, predicted) contingency table per image from a single ``bincount``
  over (image, true label, predicted label) codes;
* the expected mutual information (EMI), the expensive part, depends on a pair
  of cluster sizes only through the triple (a_i, b_j, N); the triples repeat a
  lot across a data set, so each distinct triple is summed once, with a
  log-factorial table and the sum over n_ij vectorised.

Pure numpy/scipy, so evaluation runs without TensorFlow.
"""

import numpy as np
from scipy.special import gammaln

AVERAGE_METHODS = ("max", "arithmetic", "min", "geometric")
EPS = np.finfo(np.float64).eps  # scikit-learn's guard against 0 / 0 in AMI
_MAX_TABLE_ENTRIES = 1 << 22  # bound on rows x R x C per contingency chunk
_MAX_CHUNK_PIXELS = 1 << 21  # bound on rows x P per contingency chunk
_MAX_LABEL_RANGE = 1 << 10  # wider ranges of label values are compacted with np.unique
_MAX_EMI_TERMS = 1 << 20  # bound on the n_ij terms summed per EMI chunk
SPLIT_SHARE = 0.8  # an object is split when no component holds this share of its pixels


def _check_labels(true_labels, pred_labels, mask):
    """Validates the (B, P) label arrays and mask; returns them as numpy arrays."""
    true_labels, pred_labels, mask = (np.asarray(x) for x in (true_labels, pred_labels, mask))
    for name, labels in (("true_labels", true_labels), ("pred_labels", pred_labels)):
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{name} must be an integer array of shape (B, P), got {labels.dtype} {labels.shape}")
    if pred_labels.shape != true_labels.shape or mask.shape != true_labels.shape:
        raise ValueError(
            f"true_labels, pred_labels and mask must have the same shape (B, P), got "
            f"{true_labels.shape}, {pred_labels.shape} and {mask.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be a boolean array, got {mask.dtype}")
    return true_labels, pred_labels, mask


def _compact_labels(labels, mask):
    """Maps the scored label values onto codes 0 .. num_values − 1.

    Returns:
        (values, offset, num_values) with codes = values − offset. Usually ``values``
        are the labels themselves and ``offset`` the smallest label, so the integer
        codes are made one chunk at a time; sparse label values (e.g. 0, 1000, 7000)
        are compacted here with np.unique. Codes of unscored entries are arbitrary.
    """
    if labels.size == 0:
        return labels, 0, 1
    # The range of all labels, scored or not, is much cheaper to find than that of
    # the scored ones; unused values only add empty rows or columns to the tables.
    low, high = int(labels.min()), int(labels.max())
    if high - low < _MAX_LABEL_RANGE:
        return labels, low, high - low + 1
    values, codes = np.unique(np.where(mask, labels, low), return_inverse=True)
    return codes.reshape(labels.shape), 0, len(values)


def contingency_tables(true_labels, pred_labels, mask):
    """Per-image contingency tables of the scored pixels.

    Args:
        true_labels: int (B, P) ground-truth labels.
        pred_labels: int (B, P) predicted cluster ids.
        mask: bool (B, P), True for the pixels to score.
    Returns:
        int64 (B, R, C): entry [b, r, c] counts the scored pixels of image b with true
        label value low + r and predicted value low' + c, where low, low' are the
        smallest labels in the batch (r-th, c-th distinct value when the values are
        sparse). Rows and columns of values that an image lacks are 0.
    """
    true_labels, pred_labels, mask = _check_labels(true_labels, pred_labels, mask)
    true_codes, true_offset, num_true = _compact_labels(true_labels, mask)
    pred_codes, pred_offset, num_pred = _compact_labels(pred_labels, mask)
    if num_true * num_pred > _MAX_TABLE_ENTRIES:
        raise ValueError(
            f"too many distinct labels for dense tables: {num_true} true x {num_pred} predicted "
            f"> {_MAX_TABLE_ENTRIES} entries per image")
    batch, num_pixels = true_labels.shape
    table_size = num_true * num_pred + 1  # + 1 bin that swallows the unscored pixels
    rows_per_chunk = max(1, min(_MAX_TABLE_ENTRIES // table_size,
                                _MAX_CHUNK_PIXELS // max(num_pixels, 1)))
    # Small in-place integer ops: these per-pixel passes dominate the cost of the
    # metrics. The raw labels are cast before the offset is removed, so they must fit too.
    int32 = np.iinfo(np.int32)
    fits_int32 = (rows_per_chunk * table_size < int32.max
                  and all(int32.min <= offset and offset + size < int32.max
                          for offset, size in ((true_offset, num_true), (pred_offset, num_pred))))
    code_dtype = np.int32 if fits_int32 else np.int64
    tables = np.empty((batch, table_size), np.int64)
    for start in range(0, batch, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        cell = true_codes[rows].astype(code_dtype)  # (rows, P)
        cell -= true_offset
        cell *= num_pred
        cell += pred_codes[rows].astype(code_dtype)
        cell -= pred_offset
        np.putmask(cell, ~mask[rows], table_size - 1)
        num_rows = cell.shape[0]
        cell += np.arange(num_rows, dtype=code_dtype)[:, None] * table_size  # a block of bins per image
        tables[rows] = np.bincount(cell.ravel(), minlength=num_rows * table_size).reshape(num_rows, -1)
    tables = tables[:, :-1]  # (B, R * C)
    return tables.reshape(batch, num_true, num_pred)


def _entropy(counts, n):
    """scikit-learn's ``_entropy`` from the cluster sizes of each image.

    Args:
        counts: int (B, R) cluster sizes (0 for absent clusters).
        n: int (B,) number of samples.
    Returns:
        float64 (B,) natural-log entropy; 0 for a single cluster, 1 for no samples.
    """
    n = n[:, None].astype(np.float64)  # (B, 1)
    present = counts > 0
    safe = np.where(present, counts, 1).astype(np.float64)
    safe_n = np.maximum(n, 1.0)
    terms = np.where(present, (safe / safe_n) * (np.log(safe) - np.log(safe_n)), 0.0)  # (B, R)
    entropy = -terms.sum(axis=1)
    entropy = np.where(present.sum(axis=1) == 1, 0.0, entropy)
    return np.where(n[:, 0] == 0, 1.0, entropy)


def _mutual_info(tables, a, b, n):
    """scikit-learn's ``mutual_info_score`` from contingency tables.

    Args:
        tables: int (B, R, C); a: (B, R) and b: (B, C) its marginals; n: (B,) totals.
    Returns:
        float64 (B,) mutual information in nats, clipped at 0.
    """
    nonzero = tables > 0
    safe = np.where(nonzero, tables, 1).astype(np.float64)  # (B, R, C)
    log_n = np.log(np.maximum(n, 1).astype(np.float64))[:, None, None]  # (B, 1, 1)
    outer = (a[:, :, None] * b[:, None, :]).astype(np.float64)  # (B, R, C)
    log_outer = -np.log(np.where(nonzero, outer, 1.0)) + log_n + log_n
    fraction = safe / np.maximum(n, 1)[:, None, None]  # (B, R, C) n_ij / N
    terms = fraction * (np.log(safe) - log_n) + fraction * log_outer  # (B, R, C)
    # scikit-learn zeroes terms below machine epsilon before summing.
    terms = np.where(nonzero & (np.abs(terms) >= EPS), terms, 0.0)
    return np.clip(terms.sum(axis=(1, 2)), 0.0, None)


def _emi_of_triples(a, b, n, log_factorial):
    """Expected mutual information contributed by one pair of clusters.

    The sum over n_ij in max(1, a + b − N) .. min(a, b) of
    n_ij/N · log(N n_ij / (a b)) · P_hypergeometric(n_ij; N, a, b), taken over the
    whole support (no truncation), as in scikit-learn's ``expected_mutual_information``.
    Triples are sorted by support length and summed in dense (triples, n_ij) blocks,
    so per-triple factors broadcast along rows instead of being gathered per term.

    Args:
        a, b: int64 (U,) cluster sizes, each >= 1; n: int64 (U,) samples, >= max(a, b).
        log_factorial: float64 table, log_factorial[k] = log k!, for k up to max(n).
    Returns:
        float64 (U,).
    """
    low = np.maximum(1, a + b - n)
    high = np.minimum(a, b)
    num_terms = high - low + 1  # (U,) always >= 1
    order = np.argsort(num_terms, kind="stable")
    emi = np.empty(len(a))
    start = 0
    while start < len(a):
        # As many triples as fit in the term budget at the width of the longest one.
        stop = min(len(a), start + max(1, _MAX_EMI_TERMS // num_terms[order[start]]))
        width = num_terms[order[stop - 1]]
        stop = min(len(a), start + max(1, _MAX_EMI_TERMS // width))
        chunk = order[start:stop]
        ai, bi, ni = a[chunk, None], b[chunk, None], n[chunk, None]  # (u, 1)
        nij = low[chunk, None] + np.arange(width)  # (u, L)
        in_support = nij <= high[chunk, None]
        nij = np.minimum(nij, high[chunk, None])  # keeps padded entries' table indices valid
        # log P(n_ij) = log a! b! (N−a)! (N−b)! / (N! n_ij! (a−n_ij)! (b−n_ij)! (N−a−b+n_ij)!);
        # the n_ij-independent part is one number per triple.
        log_const = (log_factorial[ai] + log_factorial[bi] + log_factorial[ni - ai]
                     + log_factorial[ni - bi] - log_factorial[ni])  # (u, 1)
        log_prob = log_const - log_factorial[nij]  # (u, L)
        log_prob -= log_factorial[ai - nij]
        log_prob -= log_factorial[bi - nij]
        log_prob -= log_factorial[(ni - ai - bi) + nij]
        log_ratio = np.log(nij) + (np.log(ni) - np.log(ai) - np.log(bi))  # (u, L) log(N n_ij / (a b))
        terms = np.exp(log_prob, out=log_prob)  # (u, L)
        terms *= log_ratio
        terms *= nij / ni
        emi[chunk] = np.where(in_support, terms, 0.0).sum(axis=1)
        start = stop
    return emi


def _expected_mutual_info(a, b, n):
    """EMI per image, summing each distinct (a_i, b_j, N) triple once.

    Args:
        a: int (B, R), b: int (B, C) cluster sizes (0 = absent); n: int (B,).
    Returns:
        float64 (B,); 0 where either labelling has a single cluster.
    """
    batch, num_rows = a.shape
    num_cols = b.shape[1]
    pair_a = np.broadcast_to(a[:, :, None], (batch, num_rows, num_cols)).ravel()
    pair_b = np.broadcast_to(b[:, None, :], (batch, num_rows, num_cols)).ravel()
    pair_n = np.repeat(n, num_rows * num_cols)
    present = (pair_a > 0) & (pair_b > 0)
    image = np.repeat(np.arange(batch), num_rows * num_cols)[present]  # (pairs,)
    pair_a, pair_b, pair_n = pair_a[present], pair_b[present], pair_n[present]
    base = int(n.max(initial=0)) + 1
    if base**3 < np.iinfo(np.int64).max:
        key = (pair_n.astype(np.int64) * base + pair_a) * base + pair_b  # (pairs,) one per triple
        keys, inverse = np.unique(key, return_inverse=True)
        unique_a, unique_b, unique_n = keys // base % base, keys % base, keys // (base * base)
    else:  # over ~2 million pixels per image: slower row-wise unique
        triples, inverse = np.unique(np.stack([pair_a, pair_b, pair_n], axis=1), axis=0,
                                     return_inverse=True)
        unique_a, unique_b, unique_n = triples.T
    log_factorial = gammaln(np.arange(base + 1, dtype=np.float64) + 1.0)  # log k!
    emi_per_triple = _emi_of_triples(unique_a, unique_b, unique_n, log_factorial)  # (U,)
    emi = np.bincount(image, weights=emi_per_triple[inverse.ravel()], minlength=batch)
    single = ((a > 0).sum(axis=1) == 1) | ((b > 0).sum(axis=1) == 1)
    return np.where(single, 0.0, emi)


def _generalized_average(h_true, h_pred, average_method):
    if average_method == "min":
        return np.minimum(h_true, h_pred)
    if average_method == "geometric":
        return np.sqrt(h_true * h_pred)
    if average_method == "arithmetic":
        return (h_true + h_pred) / 2.0
    if average_method == "max":
        return np.maximum(h_true, h_pred)
    raise ValueError(f"average_method must be one of {AVERAGE_METHODS}, got {average_method!r}")


def _away_from_zero(x):
    """scikit-learn's guard: keeps the sign and moves |x| up to at least machine epsilon."""
    return np.where(x < 0, np.minimum(x, -EPS), np.maximum(x, EPS))


def adjusted_mutual_info(true_labels, pred_labels, mask, average_method="max"):
    """Adjusted mutual information of each image, over its scored pixels.

    Row b equals ``sklearn.metrics.adjusted_mutual_info_score(true_labels[b][mask[b]],
    pred_labels[b][mask[b]], average_method=average_method)``, with its special cases:
    1.0 when both labellings have a single cluster or there are no scored pixels,
    0.0 when exactly one of them has a single cluster.

    One deliberate refinement: when a labelling puts every scored pixel in its own
    cluster, every table with these marginals has the same MI, so MI = EMI = the
    other labelling's entropy exactly, and we use that exact value. It only matters
    for ``average_method="min"`` with the other labelling not all singletons, where
    the score is 0/0: scikit-learn returns rounding noise (e.g. -1.0 or 1.06), we
    return its "perfect match" value 1.0 (as its eps guard does for exact zeros).

    Args:
        true_labels: int (B, P) ground-truth labels.
        pred_labels: int (B, P) predicted cluster ids.
        mask: bool (B, P), True for the pixels to score.
        average_method: normaliser of the MI: "max" (scikit-learn before 0.22, the
            papers), "arithmetic" (scikit-learn's default now), "min" or "geometric".
    Returns:
        float64 (B,).
    """
    return _ami_of_tables(contingency_tables(true_labels, pred_labels, mask), average_method)


def _ami_of_tables(tables, average_method):
    """AMI of each (B, R, C) contingency table; see ``adjusted_mutual_info``."""
    if average_method not in AVERAGE_METHODS:
        raise ValueError(f"average_method must be one of {AVERAGE_METHODS}, got {average_method!r}")
    a = tables.sum(axis=2)  # (B, R) true cluster sizes
    b = tables.sum(axis=1)  # (B, C) predicted cluster sizes
    n = a.sum(axis=1)  # (B,)
    num_classes = (a > 0).sum(axis=1)
    num_clusters = (b > 0).sum(axis=1)

    h_true, h_pred = _entropy(a, n), _entropy(b, n)
    mi = _mutual_info(tables, a, b, n)
    emi = _expected_mutual_info(a, b, n)
    # One side all singletons: every table with these marginals has MI = the other
    # side's entropy, so EMI = MI exactly; rounding noise would decide "min" below.
    other_entropy = np.where(num_classes == n, h_pred, h_true)
    one_side_singletons = (num_classes == n) | (num_clusters == n)
    mi = np.where(one_side_singletons, other_entropy, mi)
    emi = np.where(one_side_singletons, other_entropy, emi)

    normalizer = _generalized_average(h_true, h_pred, average_method)
    ami = _away_from_zero(mi - emi) / _away_from_zero(normalizer - emi)  # (B,)
    ami = np.where((num_classes == 1) | (num_clusters == 1), 0.0, ami)
    # Perfect matches by scikit-learn's rules: both sides a single cluster, no
    # scored pixels, or (what it gets by rounding) both sides all singletons.
    both_trivial = (num_classes == num_clusters) & (num_classes <= 1)
    both_singletons = (num_classes == n) & (num_clusters == n)
    return np.where(both_trivial | both_singletons, 1.0, ami)


def adjusted_rand(true_labels, pred_labels, mask):
    """Adjusted Rand index of each image, over its scored pixels.

    Row b equals ``sklearn.metrics.adjusted_rand_score(true_labels[b][mask[b]],
    pred_labels[b][mask[b]])``, including 1.0 for no scored pixels or identical
    partitions.

    Args:
        true_labels: int (B, P) ground-truth labels.
        pred_labels: int (B, P) predicted cluster ids.
        mask: bool (B, P), True for the pixels to score.
    Returns:
        float64 (B,).
    """
    return _ari_of_tables(contingency_tables(true_labels, pred_labels, mask))


def _ari_of_tables(tables):
    """ARI of each (B, R, C) contingency table; see ``adjusted_rand``."""
    a = tables.sum(axis=2)  # (B, R)
    b = tables.sum(axis=1)  # (B, C)
    n = a.sum(axis=1)  # (B,)
    # The pair confusion matrix, as scikit-learn's pair_confusion_matrix.
    sum_squares = (tables**2).sum(axis=(1, 2))
    true_pos = sum_squares - n
    false_pos = (tables * b[:, None, :]).sum(axis=(1, 2)) - sum_squares
    false_neg = (tables * a[:, :, None]).sum(axis=(1, 2)) - sum_squares
    true_neg = n**2 - false_pos - false_neg - sum_squares
    # Numerator and denominator reach 2 N^4: exact in int64 below 46,000 pixels per image.
    dtype = np.int64 if int(n.max(initial=0)) < 46_000 else np.float64
    tp, tn, fp, fn = (x.astype(dtype) for x in (true_pos, true_neg, false_pos, false_neg))
    numerator = 2 * (tp * tn - fn * fp)
    denominator = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    perfect = (fn == 0) & (fp == 0)
    return np.where(perfect, 1.0, numerator / np.where(perfect, 1, denominator))


def grouping_scores(groups, gamma, *, average_method="max", ignore_background=True):
    """AMI, ARI and confidence of soft groupings against ground-truth groups.

    The predicted cluster of a pixel is argmax_k γ. A pixel is scored when its
    true group is not 0 (0 marks background and overlap), or always when
    ``ignore_background`` is False.

    Args:
        groups: int (B, H, W, 1) ground truth, or (B, T, H, W, 1) for sequences; T may
            be 1 and is then shared by every step of γ (static images over EM steps).
            Integer-valued floats (the published files) are accepted.
        gamma: float (B, K, H, W, 1), or (B, T, K, H, W, 1) for sequences.
        average_method: AMI normaliser, see ``adjusted_mutual_info``.
        ignore_background: score only pixels whose true group is not 0.
    Returns:
        dict of arrays of shape (B,) or (B, T):
          'ami', 'ari': float64 per image, as scikit-learn computes them;
          'confidence': mean of max_k γ over the scored pixels, 1.0 where no pixel
            is scored (like AMI and ARI, an empty set counts as certain);
          'num_scored': int number of scored pixels, to find or drop empty images;
          'objects', 'objects_split', 'objects_merged': int counts of the scored true groups,
            of those split over components and of those merged with another (see
            ``object_errors_of_tables``), which tell two kinds of poor AMI apart.
    """
    groups, gamma = np.asarray(groups), np.asarray(gamma)
    if gamma.ndim not in (5, 6) or gamma.shape[-1] != 1:
        raise ValueError(
            f"gamma must have shape (B, K, H, W, 1) or (B, T, K, H, W, 1), got {gamma.shape}")
    sequence = gamma.ndim == 6
    if groups.ndim != gamma.ndim - 1:
        raise ValueError(
            f"groups must have shape {'(B, T, H, W, 1)' if sequence else '(B, H, W, 1)'} "
            f"to match gamma {gamma.shape}, got {groups.shape}")
    if not np.issubdtype(groups.dtype, np.integer):
        if not np.all(np.equal(np.mod(groups, 1), 0)):
            raise ValueError(f"groups must hold integer group ids, got non-integer {groups.dtype} values")
        groups = groups.astype(np.int64)
    if not sequence:
        groups, gamma = groups[:, None], gamma[:, None]  # add T = 1
    batch, steps = gamma.shape[:2]
    image_shape = gamma.shape[3:]  # (H, W, 1)
    if groups.shape[0] != batch or groups.shape[1] not in (1, steps) or groups.shape[2:] != image_shape:
        raise ValueError(f"groups {groups.shape} do not match gamma {gamma.shape}")
    groups = np.broadcast_to(groups, (batch, steps) + image_shape)

    num_pixels = int(np.prod(image_shape))
    true_labels = groups.reshape(batch * steps, num_pixels)  # (B*T, P)
    gamma = gamma.reshape(batch * steps, gamma.shape[2], num_pixels)  # (B*T, K, P)
    pred_labels = gamma.argmax(axis=1)  # (B*T, P)
    mask = true_labels != 0 if ignore_background else np.ones(true_labels.shape, bool)

    num_scored = mask.sum(axis=1)  # (B*T,)
    confidence_sum = np.where(mask, gamma.max(axis=1), 0.0).sum(axis=1, dtype=np.float64)
    confidence = np.where(num_scored > 0, confidence_sum / np.maximum(num_scored, 1), 1.0)
    tables = contingency_tables(true_labels, pred_labels, mask)  # (B*T, R, K)
    scores = {
        "ami": _ami_of_tables(tables, average_method),
        "ari": _ari_of_tables(tables),
        "confidence": confidence,
        "num_scored": num_scored,
    }
    scores.update(object_errors_of_tables(tables))
    out_shape = (batch, steps) if sequence else (batch,)
    return {name: value.reshape(out_shape) for name, value in scores.items()}


def object_errors_of_tables(tables, split_share=SPLIT_SHARE):
    """How a grouping fails, per image: objects cut into pieces and objects lumped together.

    AMI alone does not say whether a poor grouping splits objects over components
    (e.g. along a fixed line across the image) or puts several objects into one.
    Each true group's main component is the one holding most of its scored pixels.

    Args:
        tables: int (B, R, C) contingency tables (true groups x predicted clusters), as
            ``contingency_tables`` returns them; all-zero rows are groups an image lacks.
        split_share: an object is split when its main component holds less than this
            share of its pixels.
    Returns:
        dict of int64 (B,): 'objects', the true groups present; 'objects_split', those
        whose main component holds less than ``split_share`` of them; 'objects_merged',
        those whose main component is also the main component of another object.
    """
    tables = np.asarray(tables)
    sizes = tables.sum(axis=2)  # (B, R)
    present = sizes > 0  # (B, R)
    main = tables.argmax(axis=2)  # (B, R)
    main_share = tables.max(axis=2) / np.maximum(sizes, 1)  # (B, R)
    split = present & (main_share < split_share)  # (B, R)
    both_present = present[:, :, None] & present[:, None, :]  # (B, R, R)
    shares_main = (main[:, :, None] == main[:, None, :]) & both_present  # (B, R, R), diagonal included
    merged = present & (shares_main.sum(axis=2) > 1)  # (B, R)
    return {name: value.sum(axis=1, dtype=np.int64)
            for name, value in (("objects", present), ("objects_split", split), ("objects_merged", merged))}


def sequence_scores(per_step_scores, step_weights):
    """Combines per-step scores of sequences into one score per sequence.

    Args:
        per_step_scores: float (B, T), e.g. grouping_scores(...)['ami'] without the
            initial state.
        step_weights: float (T,) the loss step weights (non-negative, not all 0).
    Returns:
        dict with 'weighted' (B,): Σ_t w_t s_t / Σ_t w_t, and 'last' (B,): s_{T-1}.
    """
    per_step_scores = np.asarray(per_step_scores, dtype=np.float64)
    step_weights = np.asarray(step_weights, dtype=np.float64)
    if per_step_scores.ndim != 2:
        raise ValueError(f"per_step_scores must have shape (B, T), got {per_step_scores.shape}")
    if step_weights.shape != per_step_scores.shape[1:]:
        raise ValueError(
            f"step_weights must have shape ({per_step_scores.shape[1]},) to match per_step_scores "
            f"{per_step_scores.shape}, got {step_weights.shape}")
    if np.any(step_weights < 0) or not step_weights.sum() > 0:
        raise ValueError(f"step_weights must be non-negative with a positive sum, got {step_weights}")
    weighted = per_step_scores @ step_weights / step_weights.sum()  # (B,)
    return {"weighted": weighted, "last": per_step_scores[:, -1]}


def occluded_pixels(features, groups, threshold=0.0):
    """Per image, the pixels that show an object but belong to no single object.

    Ground truth marks pixels covered by two or more objects with group 0, like the
    background; they are left out of AMI and ARI, but the images that have them are
    the ones where grouping is ambiguous, so results are worth splitting by them.

    Args:
        features: (..., H, W, C) clean images; a pixel shows something when any channel exceeds
            `threshold`.
        groups: (..., H, W, 1) ground truth, 0 for background and overlap.
        threshold: the value above which the data set's generator gave a pixel to an object
            (flying MNIST's `group_threshold`): fainter strokes have group 0 without any overlap.
    Returns:
        int64 array of the leading shape (...): the count of pixels that show something
        and have group 0.
    """
    features, groups = np.asarray(features), np.asarray(groups)
    if groups.ndim < 3 or groups.shape[-1] != 1 or features.shape[:-1] != groups.shape[:-1]:
        raise ValueError(f"features (..., H, W, C) and groups (..., H, W, 1) must agree, "
                         f"got {features.shape} and {groups.shape}")
    shows_something = np.any(features > threshold, axis=-1)  # (..., H, W)
    occluded = shows_something & (groups[..., 0] == 0)  # (..., H, W)
    return occluded.sum(axis=(-2, -1), dtype=np.int64)
