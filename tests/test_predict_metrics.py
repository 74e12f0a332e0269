"""Tests of pipeline.predict (mode vote, JS uncertainty, chunked prediction) and pipeline.metrics (mIoU quirks)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.distributions import Categorical

from pipeline.classifier import build_classifier
from pipeline.metrics import ConfusionAccumulator, Scores, confusion_matrix, score
from pipeline.predict import image_uncertainty, js_uncertainty, member_logits, mode_vote, predict_image


# ---------------------------------------------------------------- prediction

def test_mode_vote_ties_go_to_smallest_label():
    preds = torch.tensor([
        [2, 3, 4, 5],
        [1, 0, 4, 5],
        [2, 0, 4, 2],
        [1, 3, 1, 2],
    ])
    assert mode_vote(preds).tolist() == [1, 0, 4, 2]


def test_mode_vote_matches_cpu_torch_mode():
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 6, (10, 5000), generator=generator)
    assert torch.equal(mode_vote(preds), torch.mode(preds, dim=0).values)


def test_js_is_zero_when_members_agree():
    logits = torch.randn(1, 50, 7).repeat(5, 1, 1)
    assert torch.allclose(js_uncertainty(logits), torch.zeros(50), atol=1e-6)


def test_js_of_two_confident_opposite_members_is_log_two():
    logits = torch.tensor([[[30.0, -30.0]], [[-30.0, 30.0]]])  # (M=2, N=1, C=2)
    assert js_uncertainty(logits).item() == pytest.approx(math.log(2), abs=1e-5)


def test_js_is_positive_when_members_disagree():
    generator = torch.Generator().manual_seed(1)
    js = js_uncertainty(torch.randn(4, 100, 5, generator=generator) * 3)
    assert js.shape == (100,) and bool((js > 0).all())


def test_image_uncertainty_top_tenth_and_official_small_n_quirk():
    assert image_uncertainty(torch.arange(100, dtype=torch.float32)) == pytest.approx(94.5)  # mean of 90..99
    assert image_uncertainty(torch.arange(25, dtype=torch.float32)) == pytest.approx(23.5)  # int(2.5) = 2: 23, 24
    # Fewer than 10 values: the official slice [-0:] takes all of them.
    assert image_uncertainty(torch.tensor([1.0, 2.0, 6.0])) == pytest.approx(3.0)


def make_members(number_class: int = 4, dim: int = 6, count: int = 5) -> list[torch.nn.Module]:
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        member = build_classifier(number_class, dim)
        for layer in member:
            if isinstance(layer, torch.nn.Linear):  # larger weights so members disagree clearly
                torch.nn.init.normal_(layer.weight, 0.0, 1.5 / layer.in_features ** 0.5)
            if isinstance(layer, torch.nn.BatchNorm1d):  # non-trivial statistics so eval mode matters
                layer.running_mean.uniform_(-0.01, 0.01)
                layer.running_var.uniform_(0.5, 2.0)
        members.append(member.eval())
    return members


def official_predict_labels(models, features: torch.Tensor, size) -> tuple[torch.Tensor, float]:
    """The official predict_labels computation restated on the CPU (reference for the test)."""
    mean_seg, entropies, votes = None, [], []
    with torch.no_grad():
        for model in models:
            preds = model(features)
            entropies.append(Categorical(logits=preds).entropy())
            probabilities = torch.softmax(preds, dim=1)
            mean_seg = probabilities if mean_seg is None else mean_seg + probabilities
            votes.append(torch.log_softmax(preds, dim=1).max(dim=1)[1].reshape(*size))
        mean_seg = mean_seg / len(models)
        full_entropy = Categorical(probs=mean_seg, validate_args=False).entropy()
        js = full_entropy - torch.mean(torch.stack(entropies), 0)
        top_k = js.sort()[0][-int(js.shape[0] / 10):].mean()
        final = torch.mode(torch.stack(votes, dim=-1), 2)[0]
    return final, float(top_k)


def test_predict_image_matches_official_computation():
    members = make_members()
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(6, 9, 11, generator=generator)
    mask, uncertainty = predict_image(members, features.to(torch.float16).float(), chunk=13)
    expected_mask, expected_uncertainty = official_predict_labels(
        members, features.to(torch.float16).float().reshape(6, -1).T, size=(9, 11))
    assert mask.shape == (9, 11) and mask.dtype == np.uint8
    assert np.array_equal(mask, expected_mask.numpy())
    assert uncertainty == pytest.approx(expected_uncertainty, rel=1e-5, abs=1e-7)
    assert len(np.unique(mask)) > 1
    assert uncertainty > 1e-2


def test_predict_image_accepts_float16_and_is_chunk_independent():
    members = make_members()
    features = torch.randn(6, 8, 8).to(torch.float16)
    mask_small, unc_small = predict_image(members, features, chunk=5)
    mask_big, unc_big = predict_image(members, features, chunk=10_000)
    assert np.array_equal(mask_small, mask_big)
    assert unc_small == pytest.approx(unc_big, rel=1e-5)
    assert unc_small > 1e-2


def test_member_logits_shape_and_eval_mode():
    members = make_members(number_class=3, dim=6, count=2)
    members[0].train()
    features = torch.randn(20, 6)
    logits = member_logits(members, features, chunk=7)
    assert logits.shape == (2, 20, 3) and logits.dtype == torch.float32
    assert not members[0].training
    with torch.no_grad():
        assert torch.allclose(logits[1], members[1](features), atol=1e-6)


# ---------------------------------------------------------------- metrics
# Hand-made masks, number_class 4, ignore label 255; class 3 appears nowhere, class 2 and 3 are predicted only on
# ignore pixels in some images.
GT_A = np.array([[0, 0, 1], [1, 255, 255]])
PRED_A = np.array([[0, 1, 1], [1, 0, 2]])
GT_B = np.array([[2, 2], [0, 255]])
PRED_B = np.array([[2, 0], [0, 3]])


def test_official_and_standard_miou_single_image():
    scores = score([PRED_A], [GT_A], number_class=4, ignore_label=255)
    # class 0: I = 1, official U = 3 (the prediction on an ignore pixel counts), standard U = 2
    # class 1: I = 2, U = 3 both; class 2: predicted only on an ignore pixel: official 0/1, standard absent
    # class 3: absent everywhere: official 0, standard skipped
    assert scores.class_ids == [0, 1, 2, 3]
    assert scores.per_class_official == pytest.approx([1 / 3, 2 / 3, 0.0, 0.0], abs=1e-7)
    assert scores.per_class_standard[:2] == pytest.approx([1 / 2, 2 / 3])
    assert scores.per_class_standard[2:] == [None, None]
    assert scores.official_miou == pytest.approx(0.25, abs=1e-7)
    assert scores.standard_miou == pytest.approx(7 / 12)
    assert scores.pixel_accuracy == pytest.approx(3 / 4)
    assert scores.per_image_miou == pytest.approx([7 / 12])


def test_scores_sum_over_images():
    scores = score([PRED_A, PRED_B], [GT_A, GT_B], number_class=4, ignore_label=255)
    # official: class 0 I = 1 + 1, U = 3 + 2; class 1 2/3; class 2 I = 0 + 1, U = 1 + 2; class 3 0/1
    assert scores.per_class_official == pytest.approx([2 / 5, 2 / 3, 1 / 3, 0.0], abs=1e-7)
    assert scores.official_miou == pytest.approx(0.35, abs=1e-7)
    # standard: class 0 (1 + 1)/(2 + 2); class 1 2/3; class 2 (0 + 1)/(0 + 2); class 3 skipped
    assert scores.per_class_standard == pytest.approx([1 / 2, 2 / 3, 1 / 2, None])
    assert scores.standard_miou == pytest.approx(5 / 9)
    assert scores.per_image_miou == pytest.approx([7 / 12, 1 / 2])
    assert scores.pixel_accuracy == pytest.approx(5 / 7)
    # the official value is I / (1e-8 + U) exactly
    assert scores.per_class_official[0] == 2 / (1e-8 + 5)


def test_ignore_label_that_is_a_class_id():
    # Bedroom-28 style: label 0 is the ignore label and also a logit; it is not scored.
    gt = np.array([[0, 1], [2, 2]])
    pred = np.array([[1, 1], [0, 2]])
    scores = score([pred], [gt], number_class=3, ignore_label=0)
    assert scores.class_ids == [1, 2]
    # class 1: predicted on the ignore pixel too: official 1/2, standard 1/1; class 2: 1/2 both
    assert scores.per_class_official == pytest.approx([1 / 2, 1 / 2], abs=1e-7)
    assert scores.per_class_standard == pytest.approx([1.0, 1 / 2])
    assert scores.official_miou == pytest.approx(0.5, abs=1e-7)
    assert scores.standard_miou == pytest.approx(0.75)
    assert scores.pixel_accuracy == pytest.approx(2 / 3)


def official_compute_iou(preds, gts, number_class: int, ignore_label: int) -> float:
    """The official compute_iou loop restated (reference for the test)."""
    unions, intersections = Counter(), Counter()
    for pred, gt in zip(preds, gts):
        for target in range(number_class):
            if target == ignore_label:
                continue
            p, g = (pred == target).astype(int), (gt == target).astype(int)
            unions[target] += (p | g).sum()
            intersections[target] += (p & g).sum()
    ious = [intersections[t] / (1e-8 + unions[t]) for t in range(number_class) if t != ignore_label]
    return np.array(ious).mean()


@pytest.mark.parametrize("number_class, ignore_label", [(6, 255), (6, 0), (34, 255)])
def test_official_miou_equals_official_loop_on_random_masks(number_class, ignore_label):
    rng = np.random.default_rng(number_class + ignore_label)
    gts, preds = [], []
    for _ in range(4):
        gt = rng.integers(0, number_class - 1, size=(16, 16))  # the top class never appears in GT
        gt[rng.random((16, 16)) < 0.2] = ignore_label
        gts.append(gt.astype(np.uint8))
        preds.append(rng.integers(0, number_class, size=(16, 16)).astype(np.uint8))
    scores = score(preds, gts, number_class, ignore_label)
    assert scores.official_miou == official_compute_iou(preds, gts, number_class, ignore_label)
    assert scores.standard_miou != pytest.approx(scores.official_miou)


def test_accumulator_streams_like_score_and_to_dict_is_plain():
    accumulator = ConfusionAccumulator(number_class=4, ignore_label=255)
    accumulator.add(PRED_A, GT_A)
    accumulator.add(PRED_B, GT_B)
    assert accumulator.matrix.dtype == np.int64
    assert int(accumulator.matrix.sum()) == GT_A.size + GT_B.size
    streamed = accumulator.scores()
    assert streamed == score([PRED_A, PRED_B], [GT_A, GT_B], 4, 255)
    empty_image = ConfusionAccumulator(number_class=4, ignore_label=255)
    empty_image.add(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8))
    as_dict = empty_image.scores().to_dict()
    assert as_dict["per_image_miou"] == [None] and as_dict["pixel_accuracy"] is None
    assert set(as_dict) == {field for field in Scores.__dataclass_fields__}


def test_confusion_matrix_rejects_unexpected_values():
    with pytest.raises(ValueError, match="prediction values \\[4\\]"):
        confusion_matrix(np.array([[4]]), np.array([[0]]), number_class=4, ignore_label=255)
    with pytest.raises(ValueError, match="ground-truth values \\[9\\]"):
        confusion_matrix(np.array([[0]]), np.array([[9]]), number_class=4, ignore_label=255)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), number_class=4, ignore_label=255)
