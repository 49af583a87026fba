import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score
from sklearn.metrics.cluster._expected_mutual_info_fast import expected_mutual_information

from neural_em import metrics
from neural_em.data import mnist
from neural_em.metrics import (
    adjusted_mutual_info,
    adjusted_rand,
    contingency_tables,
    grouping_scores,
    sequence_scores,
)

METHODS = ["max", "arithmetic", "min", "geometric"]
TOLERANCE = 1e-9


def _sklearn_rows(score, true_labels, pred_labels, mask, **kwargs):
    return np.array([score(t[m], p[m], **kwargs) for t, p, m in zip(true_labels, pred_labels, mask)])


def _random_batch(rng, batch, num_pixels, num_true, num_pred, agreement=0.0, keep=0.5):
    """Random labellings; `agreement` of the predictions copy the truth."""
    true_labels = rng.integers(0, num_true, (batch, num_pixels))
    pred_labels = rng.integers(0, num_pred, (batch, num_pixels))
    copy = rng.random((batch, num_pixels)) < agreement
    pred_labels = np.where(copy, true_labels % num_pred, pred_labels)
    mask = rng.random((batch, num_pixels)) < keep
    return true_labels, pred_labels, mask


@pytest.mark.parametrize("average_method", METHODS)
def test_ami_matches_sklearn_on_random_labellings(average_method):
    rng = np.random.default_rng(0)
    cases = [  # (pixels, true clusters, predicted clusters, agreement, kept fraction)
        (5, 2, 2, 0.0, 1.0), (30, 3, 4, 0.0, 0.7), (60, 6, 2, 0.5, 0.5),
        (100, 4, 4, 0.9, 0.3), (784, 4, 3, 0.9, 0.3), (784, 8, 8, 0.5, 1.0),
    ]
    for num_pixels, num_true, num_pred, agreement, keep in cases:
        batch = _random_batch(rng, 6, num_pixels, num_true, num_pred, agreement, keep)
        ours = adjusted_mutual_info(*batch, average_method=average_method)
        expected = _sklearn_rows(adjusted_mutual_info_score, *batch, average_method=average_method)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)


def test_ami_by_hand():
    # true [0 0 1 1], pred [0 0 1 2]: MI = H(true) = log 2, H(pred) = 1.5 log 2, and
    # EMI = 2 · (1/2 · log 2 · 1/6) + 4 · (1/4 · log 2 · 1/2) = 2/3 log 2.
    true_labels, pred_labels, mask = np.array([[0, 0, 1, 1]]), np.array([[0, 0, 1, 2]]), np.ones((1, 4), bool)
    expected = {"max": (1 / 3) / (3 / 2 - 2 / 3), "arithmetic": (1 / 3) / (5 / 4 - 2 / 3),
                "min": 1.0, "geometric": (1 / 3) / (np.sqrt(1.5) - 2 / 3)}
    for method, value in expected.items():
        ours = adjusted_mutual_info(true_labels, pred_labels, mask, method)[0]
        assert ours == pytest.approx(value, abs=1e-12)


DEGENERATE = {  # name: (true labels, predicted labels) of the scored pixels
    "one true group": ([4, 4, 4, 4, 4], [0, 1, 1, 2, 0]),
    "one predicted cluster": ([1, 2, 3, 1, 2], [2, 2, 2, 2, 2]),
    "both single": ([3, 3, 3], [1, 1, 1]),
    "identical": ([1, 1, 2, 2, 3, 3, 3], [1, 1, 2, 2, 3, 3, 3]),
    "identical up to renaming": ([1, 1, 2, 2, 3, 3, 3], [2, 2, 0, 0, 1, 1, 1]),
    "empty": ([], []),
    "one pixel": ([2], [0]),
    "both all singletons": ([1, 2, 3], [2, 0, 1]),
    "true all singletons": ([1, 2, 3, 4], [0, 0, 1, 1]),
    "two pixels split": ([1, 2], [0, 0]),
}


@pytest.mark.parametrize("average_method", METHODS)
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_ami_degenerate_cases_match_sklearn(case, average_method):
    true_scored, pred_scored = DEGENERATE[case]
    num_pixels = 8  # pad every case with unscored pixels carrying other labels
    true_labels = np.full((1, num_pixels), 7)
    pred_labels = np.full((1, num_pixels), 5)
    mask = np.zeros((1, num_pixels), bool)
    true_labels[0, : len(true_scored)] = true_scored
    pred_labels[0, : len(pred_scored)] = pred_scored
    mask[0, : len(true_scored)] = True
    expected = adjusted_mutual_info_score(true_scored, pred_scored, average_method=average_method)
    if case == "true all singletons" and average_method == "min":
        expected = 1.0  # 0/0, where scikit-learn returns rounding noise (see below)
    ours = adjusted_mutual_info(true_labels, pred_labels, mask, average_method)
    assert ours.shape == (1,)
    assert ours[0] == pytest.approx(expected, abs=TOLERANCE)


def test_ami_special_values():
    # scikit-learn's conventions, checked here independently of it.
    true_labels = np.array([[1, 1, 1, 1], [1, 2, 1, 2], [1, 1, 1, 1], [5, 6, 5, 6], [0, 0, 0, 0]])
    pred_labels = np.array([[0, 1, 0, 1], [3, 3, 3, 3], [2, 2, 2, 2], [1, 0, 1, 0], [0, 1, 2, 3]])
    mask = np.ones((5, 4), bool)
    mask[4] = False
    ours = adjusted_mutual_info(true_labels, pred_labels, mask)
    np.testing.assert_allclose(ours, [0.0, 0.0, 1.0, 1.0, 1.0], atol=1e-12)


def test_ami_min_with_all_singletons_is_one():
    # Every table with these marginals has MI = H(pred) = min(H(true), H(pred)) = EMI:
    # 0/0, where scikit-learn returns rounding noise and we its perfect-match 1.0.
    true_labels = np.arange(12).reshape(2, 6)  # every pixel its own group
    pred_labels = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 0]])
    mask = np.ones((2, 6), bool)
    np.testing.assert_array_equal(adjusted_mutual_info(true_labels, pred_labels, mask, "min"), [1.0, 1.0])
    np.testing.assert_array_equal(adjusted_mutual_info(pred_labels, true_labels, mask, "min"), [1.0, 1.0])


def test_ami_ignores_unscored_pixels():
    rng = np.random.default_rng(1)
    true_labels, pred_labels, mask = _random_batch(rng, 4, 50, 3, 3, agreement=0.5, keep=0.6)
    scrambled_true = np.where(mask, true_labels, rng.integers(-5, 100, mask.shape))
    scrambled_pred = np.where(mask, pred_labels, rng.integers(-5, 100, mask.shape))
    # Unscored values only add empty rows and columns to the tables: equal up to summation order.
    np.testing.assert_allclose(adjusted_mutual_info(true_labels, pred_labels, mask),
                               adjusted_mutual_info(scrambled_true, scrambled_pred, mask), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(adjusted_rand(true_labels, pred_labels, mask),
                                  adjusted_rand(scrambled_true, scrambled_pred, mask))


@pytest.mark.parametrize("shift, spacing, dtype", [(10**12, 1, np.int64), (0, 7000, np.int64),
                                                    (-3, 1, np.int8), (2**40, 1, np.uint64)])
def test_ami_and_ari_with_unusual_label_values(shift, spacing, dtype):
    rng = np.random.default_rng(2)
    true_labels, pred_labels, mask = _random_batch(rng, 5, 40, 3, 4, agreement=0.5, keep=0.7)
    true_labels = (true_labels * spacing + shift).astype(dtype)
    pred_labels = (pred_labels * spacing + shift).astype(dtype)
    batch = (true_labels, pred_labels, mask)
    np.testing.assert_allclose(adjusted_mutual_info(*batch),
                               _sklearn_rows(adjusted_mutual_info_score, *batch, average_method="max"),
                               atol=TOLERANCE)
    np.testing.assert_allclose(adjusted_rand(*batch), _sklearn_rows(adjusted_rand_score, *batch),
                               atol=TOLERANCE)


def test_results_do_not_depend_on_chunk_sizes(monkeypatch):
    rng = np.random.default_rng(3)
    batch = _random_batch(rng, 9, 120, 4, 3, agreement=0.7, keep=0.5)
    whole_ami, whole_ari = adjusted_mutual_info(*batch), adjusted_rand(*batch)
    monkeypatch.setattr(metrics, "_MAX_CHUNK_PIXELS", 250)  # 2 images per contingency chunk
    monkeypatch.setattr(metrics, "_MAX_EMI_TERMS", 40)  # a few triples per EMI block
    np.testing.assert_allclose(adjusted_mutual_info(*batch), whole_ami, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(adjusted_rand(*batch), whole_ari)


def test_contingency_tables_count_scored_pixels():
    true_labels = np.array([[1, 1, 2, 2, 0], [2, 2, 2, 1, 1]])
    pred_labels = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    mask = np.array([[True, True, True, True, False], [True, True, True, True, True]])
    tables = contingency_tables(true_labels, pred_labels, mask)  # rows: labels 0, 1, 2
    np.testing.assert_array_equal(tables, [[[0, 0], [1, 1], [0, 2]], [[0, 0], [0, 2], [2, 1]]])


def test_expected_mutual_info_for_huge_images_matches_sklearn():
    # Over ~2 million pixels the (N, a, b) keys no longer fit int64 and the
    # row-wise unique path is taken; supports are short, so this stays cheap.
    table = np.array([[1, 1_499_999], [0, 1_500_000]])
    a, b, n = table.sum(axis=1)[None], table.sum(axis=0)[None], np.array([table.sum()])
    ours = metrics._expected_mutual_info(a, b, n)
    assert ours[0] == pytest.approx(expected_mutual_information(table, int(n[0])), rel=1e-9, abs=1e-15)


def test_ari_matches_sklearn():
    rng = np.random.default_rng(4)
    for num_pixels, num_true, num_pred, agreement, keep in [(6, 2, 3, 0.0, 1.0), (50, 4, 3, 0.6, 0.5),
                                                            (784, 4, 3, 0.9, 0.3)]:
        batch = _random_batch(rng, 5, num_pixels, num_true, num_pred, agreement, keep)
        np.testing.assert_allclose(adjusted_rand(*batch), _sklearn_rows(adjusted_rand_score, *batch),
                                   rtol=0, atol=TOLERANCE)
    for true_scored, pred_scored in DEGENERATE.values():
        batch = (np.array([true_scored], int).reshape(1, -1), np.array([pred_scored], int).reshape(1, -1),
                 np.ones((1, len(true_scored)), bool))
        expected = adjusted_rand_score(true_scored, pred_scored)
        assert adjusted_rand(*batch)[0] == pytest.approx(expected, abs=TOLERANCE)
    # Over 46,000 pixels the pair-count products leave int64 for float64.
    big = _random_batch(rng, 1, 50_000, 3, 3, agreement=0.3, keep=1.0)
    assert adjusted_rand(*big)[0] == pytest.approx(adjusted_rand_score(big[0][0], big[1][0]), abs=TOLERANCE)
    # scikit-learn's documented example: 4/7.
    assert adjusted_rand(np.array([[0, 0, 1, 2]]), np.array([[0, 0, 1, 1]]), np.ones((1, 4), bool))[0] == \
        pytest.approx(4 / 7, abs=1e-12)


@pytest.mark.parametrize("bad, message", [
    (dict(true_labels=np.zeros((2, 3))), "true_labels must be an integer array"),
    (dict(pred_labels=np.zeros((2, 4), int)), "same shape"),
    (dict(mask=np.ones((2, 3), int)), "mask must be a boolean array"),
    (dict(true_labels=np.zeros(6, int)), r"shape \(B, P\)"),
    (dict(average_method="mean"), "average_method must be one of"),
])
def test_ami_rejects_bad_input(bad, message):
    arguments = dict(true_labels=np.zeros((2, 3), int), pred_labels=np.zeros((2, 3), int),
                     mask=np.ones((2, 3), bool), average_method="max")
    arguments.update(bad)
    with pytest.raises(ValueError, match=message):
        adjusted_mutual_info(**arguments)


def _hand_made_images():
    """Two 2×3 images, K = 2. Column 2 is background (group 0)."""
    groups = np.array([[[1, 1, 0], [2, 2, 0]],
                       [[1, 2, 0], [1, 2, 0]]])[..., None]  # (B, H, W, 1)
    gamma_first = np.array([[[0.9, 0.8, 0.5], [0.3, 0.1, 0.99]],  # γ_0; argmax 0 0 _ / 1 1 _
                            [[0.6, 0.7, 0.01], [0.8, 0.9, 0.2]]])  # argmax 0 everywhere scored
    gamma = np.stack([gamma_first, 1.0 - gamma_first], axis=1)[..., None]  # (B, K, H, W, 1)
    return groups, gamma


def test_grouping_scores_static_by_hand():
    groups, gamma = _hand_made_images()
    scores = grouping_scores(groups, gamma)
    # Image 0: clusters {0, 0} / {1, 1} match groups {1, 1} / {2, 2} perfectly.
    # Image 1: a single predicted cluster for two groups: AMI = ARI = 0.
    np.testing.assert_allclose(scores["ami"], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(scores["ari"], [1.0, 0.0], atol=1e-12)
    # Mean of max_k γ over the scored pixels only (background 0.5, 0.99, 0.99, 0.8 ignored).
    np.testing.assert_allclose(scores["confidence"],
                               [(0.9 + 0.8 + 0.7 + 0.9) / 4, (0.6 + 0.7 + 0.8 + 0.9) / 4])
    np.testing.assert_array_equal(scores["num_scored"], [4, 4])

    everything = grouping_scores(groups, gamma, ignore_background=False, average_method="arithmetic")
    np.testing.assert_array_equal(everything["num_scored"], [6, 6])
    flat_groups, flat_pred = groups.reshape(2, -1), gamma.argmax(axis=1).reshape(2, -1)
    expected = [adjusted_mutual_info_score(t, p, average_method="arithmetic")
                for t, p in zip(flat_groups, flat_pred)]
    np.testing.assert_allclose(everything["ami"], expected, atol=TOLERANCE)
    np.testing.assert_allclose(everything["confidence"], [(0.9 + 0.8 + 0.5 + 0.7 + 0.9 + 0.99) / 6,
                                                          (0.6 + 0.7 + 0.99 + 0.8 + 0.9 + 0.8) / 6])


def test_object_errors_by_hand():
    groups, gamma = _hand_made_images()
    scores = grouping_scores(groups, gamma)
    # Image 0 is grouped perfectly; image 1 puts both objects into one cluster, whole.
    np.testing.assert_array_equal(scores["objects"], [2, 2])
    np.testing.assert_array_equal(scores["objects_split"], [0, 0])
    np.testing.assert_array_equal(scores["objects_merged"], [0, 2])

    tables = np.array([[[8, 2, 0],  # main cluster 0 holds 80%: whole
                        [0, 3, 4],  # main cluster 2 holds 4/7 < 80%: split
                        [0, 0, 6],  # main cluster 2 again: merged with the row above
                        [0, 0, 0]]])  # a group this image lacks
    errors = metrics.object_errors_of_tables(tables)
    assert {name: value.tolist() for name, value in errors.items()} == {
        "objects": [3], "objects_split": [1], "objects_merged": [2]}
    assert metrics.object_errors_of_tables(tables, split_share=0.81)["objects_split"].tolist() == [2]


def test_grouping_scores_sequences_and_shared_ground_truth():
    groups, gamma = _hand_made_images()
    steps = 3
    gamma_sequence = np.stack([gamma, gamma[::-1], gamma], axis=1)  # (B, T, K, H, W, 1)
    groups_sequence = np.stack([groups] * steps, axis=1)  # (B, T, H, W, 1)
    scores = grouping_scores(groups_sequence, gamma_sequence)
    assert scores["ami"].shape == (2, steps)
    static = grouping_scores(groups, gamma)
    np.testing.assert_array_equal(scores["ami"][:, 0], static["ami"])
    np.testing.assert_array_equal(scores["confidence"][:, 2], static["confidence"])
    # T = 1 ground truth (static images over EM steps) is shared by every step.
    shared = grouping_scores(groups_sequence[:, :1], gamma_sequence)
    for name in ("ami", "ari", "confidence"):
        np.testing.assert_array_equal(shared[name], scores[name])
    # Float group ids, as in the published files, are accepted.
    np.testing.assert_array_equal(grouping_scores(groups.astype(np.float32), gamma)["ami"], static["ami"])


def test_grouping_scores_empty_scored_set_is_finite():
    groups = np.zeros((1, 2, 2, 1), int)  # all background
    gamma = np.full((1, 3, 2, 2, 1), 1 / 3)
    scores = grouping_scores(groups, gamma)
    assert scores["num_scored"][0] == 0
    assert scores["confidence"][0] == 1.0
    assert scores["ami"][0] == 1.0 and scores["ari"][0] == 1.0


@pytest.mark.parametrize("groups_shape, gamma_shape, message", [
    ((2, 2, 3, 1), (2, 2, 2, 3), "gamma must have shape"),
    ((2, 1, 2, 3, 1), (2, 2, 2, 3, 1), r"groups must have shape \(B, H, W, 1\)"),
    ((3, 2, 3, 1), (2, 2, 2, 3, 1), "do not match gamma"),
    ((2, 2, 2, 3, 1), (2, 3, 2, 2, 3, 1), "do not match gamma"),
])
def test_grouping_scores_rejects_mismatched_shapes(groups_shape, gamma_shape, message):
    with pytest.raises(ValueError, match=message):
        grouping_scores(np.ones(groups_shape, int), np.full(gamma_shape, 0.5))


def test_grouping_scores_rejects_fractional_groups():
    groups, gamma = _hand_made_images()
    with pytest.raises(ValueError, match="integer group ids"):
        grouping_scores(groups + 0.5, gamma)


def test_sequence_scores_by_hand():
    per_step = np.array([[0.2, 0.4, 0.6], [1.0, 0.0, 0.5]])
    scores = sequence_scores(per_step, [1.0, 1.0, 2.0])
    np.testing.assert_allclose(scores["weighted"], [(0.2 + 0.4 + 1.2) / 4, (1.0 + 0.0 + 1.0) / 4])
    np.testing.assert_array_equal(scores["last"], [0.6, 0.5])
    # Loss on the last step only ("last"): the weighted score is the last one.
    np.testing.assert_allclose(sequence_scores(per_step, [0, 0, 1])["weighted"], [0.6, 0.5])


@pytest.mark.parametrize("scores, weights, message", [
    (np.zeros(3), [1, 1, 1], r"shape \(B, T\)"),
    (np.zeros((2, 3)), [1, 1], r"step_weights must have shape \(3,\)"),
    (np.zeros((2, 3)), [1, -1, 1], "non-negative"),
    (np.zeros((2, 3)), [0, 0, 0], "positive sum"),
])
def test_sequence_scores_rejects_bad_input(scores, weights, message):
    with pytest.raises(ValueError, match=message):
        sequence_scores(scores, weights)


def test_occluded_pixels_by_hand():
    # Two 2x3 grey images: a pixel is occluded when it shows something and has group 0.
    features = np.array([[[0.0, 0.5, 1.0], [0.2, 0.0, 0.0]],
                         [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])[..., None]  # (2, 2, 3, 1)
    groups = np.array([[[0, 0, 1], [0, 2, 0]],
                       [[0, 0, 0], [1, 0, 0]]])[..., None]  # (2, 2, 3, 1)
    np.testing.assert_array_equal(metrics.occluded_pixels(features, groups), [2, 0])
    # Leading axes are kept: (B, T) sequences; a pixel with any channel on shows something.
    rgb = np.zeros((1, 2, 2, 3, 3))
    rgb[0, 1, 0, 0, 2] = 1.0
    np.testing.assert_array_equal(metrics.occluded_pixels(rgb, np.zeros((1, 2, 2, 3, 1), int)), [[0, 1]])


def test_occluded_pixels_leave_out_strokes_fainter_than_the_group_threshold():
    # Two grey digit layers composed as flying MNIST composes them: pixel 0 is a faint stroke of
    # the first digit alone, pixel 1 is lit by both digits, pixel 2 by the second alone.
    first = np.array([10, 200, 0], np.uint8).reshape(1, 1, 1, 3)  # (T, N, H, W)
    second = np.array([0, 180, 90], np.uint8).reshape(1, 1, 1, 3)
    features, groups = mnist.compose_grey([first, second], group_threshold=0.1)
    np.testing.assert_array_equal(groups.ravel(), [0, 0, 2])
    assert metrics.occluded_pixels(features / 255.0, groups, threshold=0.1).item() == 1
    # Without the threshold the faint stroke counts as overlap too.
    assert metrics.occluded_pixels(features / 255.0, groups).item() == 2


def test_occluded_pixels_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"features .* and groups .* must agree"):
        metrics.occluded_pixels(np.zeros((2, 4, 4, 1)), np.zeros((2, 4, 5, 1)))
