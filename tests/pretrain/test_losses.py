"""Each loss against a small case computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from virchow.pretrain.losses import DINOLoss, IBOTPatchLoss, KDELoss, KoLeoLoss, SoftmaxCentering, sinkhorn_knopp


def ce(target: list[float], probs: list[float]) -> float:
    return -sum(t * math.log(p) for t, p in zip(target, probs, strict=True))


# ---------------------------------------------------------------------------------------------- DINO


def test_dino_single_pair_matches_hand_value():
    loss = DINOLoss(2, student_temp=1.0)
    # log_softmax([ln 3, 0]) = [ln 3/4, ln 1/4]
    student = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expected = (ce([0.5, 0.5], [0.75, 0.25]) + ce([1.0, 0.0], [0.5, 0.5])) / 2
    assert loss([student], [teacher]).item() == pytest.approx(expected, rel=1e-6)


def test_dino_student_temperature_divides_logits():
    loss = DINOLoss(2, student_temp=0.5)
    student = torch.tensor([[math.log(3.0) * 0.5, 0.0]])  # / 0.5 gives [ln 3, 0]
    teacher = torch.tensor([[0.0, 1.0]])
    assert loss([student], [teacher]).item() == pytest.approx(ce([0.0, 1.0], [0.75, 0.25]), rel=1e-6)


def test_dino_sums_pairs_and_skips_same_crop():
    loss = DINOLoss(2, student_temp=1.0)
    s0, s1 = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    t0, t1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    all_pairs = ce([1, 0], [0.75, 0.25]) + ce([0, 1], [0.75, 0.25]) + ce([1, 0], [0.5, 0.5]) + ce([0, 1], [0.5, 0.5])
    cross_pairs = ce([0, 1], [0.75, 0.25]) + ce([1, 0], [0.5, 0.5])
    assert loss([s0, s1], [t0, t1]).item() == pytest.approx(all_pairs, rel=1e-6)
    assert loss([s0, s1], [t0, t1], skip_same_index=True).item() == pytest.approx(cross_pairs, rel=1e-6)


def test_dino_gradient_is_softmax_minus_target():
    loss = DINOLoss(3, student_temp=1.0)
    student = torch.tensor([[0.2, -0.1, 0.4]], requires_grad=True)
    target = torch.tensor([[0.1, 0.7, 0.2]])
    loss([student], [target]).backward()
    expected = torch.softmax(student.detach(), dim=-1) - target
    assert torch.allclose(student.grad, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- iBOT


def test_ibot_averages_masked_patches_per_image():
    loss = IBOTPatchLoss(2, student_temp=1.0)
    masks = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    # Rows follow masks.nonzero(): image 0 patch 0, image 0 patch 2, image 2 patch 1.
    student = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(3.0)]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    image0 = (ce([1, 0], [0.75, 0.25]) + ce([0, 1], [0.5, 0.5])) / 2
    image2 = ce([1, 0], [0.25, 0.75])
    expected = (image0 + 0.0 + image2) / 3  # the unmasked image counts as 0 in the mean
    assert loss(student, teacher, masks).item() == pytest.approx(expected, rel=1e-6)


def test_ibot_uses_only_masked_positions_of_network(one_thread):
    from tests.pretrain.conftest import TINY
    from virchow.pretrain.config import load_config
    from virchow.pretrain.meta_arch import backbone_tokens, build_networks

    cfg = load_config(None, [*TINY, "data.tile_dirs=[.]"])
    torch.manual_seed(0)
    student, _, spec = build_networks(cfg)
    student.eval()
    images = torch.randn(2, 3, 112, 112)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, [3, 4, 11]] = True
    masks[1, [60]] = True
    out = student(images, images[:0, :, :56, :56], masks, apply_mask=True)
    assert out.patch_logits.shape == (4, 256)

    tokens = backbone_tokens(student.backbone, images, masks, student.mask_token)
    expected = student.ibot_head(tokens[:, spec.num_prefix_tokens :][masks])
    assert torch.allclose(out.patch_logits, expected, atol=1e-6)
    # The student saw the mask token: the patch embedding at masked positions no longer matters.
    changed = images.clone()
    changed[0, :, 0:14, 42:56] = 5.0  # patch 3 of image 0 (row 0, column 3)
    again = student(changed, images[:0, :, :56, :56], masks, apply_mask=True)
    assert torch.allclose(out.patch_logits, again.patch_logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------- KoLeo


def test_koleo_matches_nearest_neighbour_distances():
    angle = math.radians(10)
    features = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)], [-1.0, 0.0]])
    d01 = 2 * math.sin(angle / 2)
    d21 = 2 * math.cos(angle / 2)
    expected = -(2 * math.log(d01) + math.log(d21)) / 3
    assert KoLeoLoss()(features).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_normalises_features_first():
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0]])
    assert KoLeoLoss()(features).item() == pytest.approx(-0.5 * math.log(2.0), rel=1e-5)


def test_koleo_gradient_finite_for_duplicates():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    KoLeoLoss()(features).backward()
    assert torch.isfinite(features.grad).all()


# ---------------------------------------------------------------------------------------------- KDE


def test_kde_matches_leave_one_out_density():
    kappa = 2.0
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # cosine similarities: s01 = 0, s02 = -1, s12 = 0
    density0 = (math.exp(kappa * (0 - 1)) + math.exp(kappa * (-1 - 1))) / 2
    density1 = (math.exp(kappa * (0 - 1)) + math.exp(kappa * (0 - 1))) / 2
    density2 = density0
    expected = (math.log(density0) + math.log(density1) + math.log(density2)) / 3
    assert KDELoss(kappa)(features).item() == pytest.approx(expected, rel=1e-6)


def test_kde_bounded_where_koleo_diverges():
    duplicates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert KDELoss(5.0)(duplicates).item() == pytest.approx(0.0, abs=1e-6)
    assert KoLeoLoss()(duplicates).item() > 15.0


def test_kde_gradient_spreads_features():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], requires_grad=True)
    before = KDELoss(5.0)(features)
    before.backward()
    with torch.no_grad():
        stepped = features - 0.1 * features.grad
    assert KDELoss(5.0)(stepped).item() < before.item()


# ---------------------------------------------------------------------------------------------- targets


def test_sinkhorn_rows_and_columns_normalised():
    torch.manual_seed(0)
    n_samples, n_prototypes = 12, 4
    logits = torch.randn(n_samples, n_prototypes)
    targets = sinkhorn_knopp(logits, temperature=0.5, n_iterations=50)
    assert torch.allclose(targets.sum(dim=1), torch.ones(n_samples), atol=1e-5)
    assert torch.allclose(targets.sum(dim=0), torch.full((n_prototypes,), n_samples / n_prototypes), atol=1e-3)
    assert (targets >= 0).all()


def test_sinkhorn_three_rounds_rows_exact():
    torch.manual_seed(1)
    targets = sinkhorn_knopp(torch.randn(8, 16), temperature=0.1, n_iterations=3)
    assert torch.allclose(targets.sum(dim=1), torch.ones(8), atol=1e-5)


def test_sinkhorn_identical_samples_give_uniform_targets():
    logits = torch.tensor([[0.3, -0.2, 0.9]]).repeat(5, 1)
    targets = sinkhorn_knopp(logits, temperature=0.05, n_iterations=3)
    assert torch.allclose(targets, torch.full((5, 3), 1 / 3), atol=1e-6)


def test_sinkhorn_large_logits_stay_finite():
    logits = torch.tensor([[100.0, -100.0], [-100.0, 100.0]])
    targets = sinkhorn_knopp(logits, temperature=0.04, n_iterations=3)
    assert torch.isfinite(targets).all()
    assert torch.allclose(targets, torch.eye(2), atol=1e-6)


def test_softmax_centering_subtracts_then_updates_center():
    centering = SoftmaxCentering(2, momentum=0.9)
    centering.center.fill_(0.5)
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    targets = centering(logits, temperature=1.0)
    assert torch.allclose(targets, torch.softmax(logits - 0.5, dim=-1))
    assert torch.allclose(centering.center, torch.tensor([[0.9 * 0.5 + 0.1 * 2.0, 0.9 * 0.5]]))
