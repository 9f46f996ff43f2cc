"""Each distillation loss term against a small case computed by hand."""
import math

import pytest
import torch

from gkd.core.errors import GkdError
from gkd.kd.distill.levels import assign_levels, pair_levels
from gkd.kd.distill.losses import decoupled_imitation, global_relation_loss, pkd_loss, soft_label_kl, weighted_box_mask
from gkd.kd.distill.robust import max_same_class_cos, robust_weights


def test_mask_takes_max_over_overlaps_whatever_the_order():
    # stride 4 on an 8x8 map: box A covers cells [0, 3) x [0, 3), box B [1, 5) x [1, 5); they overlap on [1, 3)^2.
    boxes = torch.tensor([[0, 0.0, 0.0, 12.0, 12.0], [0, 4.0, 4.0, 20.0, 20.0]])
    w = torch.tensor([0.3, 0.8])
    m = weighted_box_mask(boxes, w, 4, (1, 8, 8))
    expected = torch.zeros(8, 8)
    expected[0:3, 0:3] = 0.3
    expected[1:5, 1:5] = 0.8
    assert torch.equal(m[0, 0], expected)
    # Reverse order: the reference would let the last box win (0.3 on the overlap); the max does not depend on it.
    m_rev = weighted_box_mask(boxes.flip(0), w.flip(0), 4, (1, 8, 8))
    assert torch.equal(m_rev, m)
    assert m[0, 0, 2, 2] == pytest.approx(0.8)


def test_mask_rules_small_box_single_cell_end_exclusive_and_batches():
    boxes = torch.tensor([[1, 9.0, 5.0, 10.0, 7.0],     # inside one cell: marks only cell (int(5/4), int(9/4)) = (1, 2)
                          [0, 0.0, 0.0, 8.0, 31.9]])    # x: [0, 2), y: [0, min(7, 8)) (the end cell is excluded)
    m = weighted_box_mask(boxes, torch.tensor([0.5, 1.0]), 4, (2, 8, 8))
    assert m[1, 0].nonzero().tolist() == [[1, 2]] and m[1, 0, 1, 2] == 0.5
    expected = torch.zeros(8, 8)
    expected[0:7, 0:2] = 1.0
    assert torch.equal(m[0, 0], expected)


def test_decoupled_imitation_by_hand():
    # C = 2, one 2x2 map. Differences: channel 0 = [[1, 2], [3, 0]], channel 1 = 0 everywhere.
    t = torch.zeros(1, 2, 2, 2)
    a = torch.zeros(1, 2, 2, 2)
    a[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mask = torch.tensor([[[[0.5, 0.0], [1.0, 0.0]]]])
    fg, bg = decoupled_imitation(a, t, mask)
    # fg = (1^2 * 0.5 + 3^2 * 1.0) / max(1, 2 * C * (0.5 + 1.0)) = 9.5 / 6
    assert fg.item() == pytest.approx(9.5 / 6)
    # bg cells: (0, 1) and (1, 1): (2^2 + 0) / max(1, 2 * C * 2) = 4 / 8
    assert bg.item() == pytest.approx(0.5)
    # an empty mask: fg is 0 (normaliser clamped to 1), bg covers every cell
    fg0, bg0 = decoupled_imitation(a, t, torch.zeros_like(mask))
    assert fg0.item() == 0.0 and bg0.item() == pytest.approx(14 / 16)


def test_robust_weights_by_hand_clamped_and_missing_class():
    # 3 prototypes: two of class 1, one of class 2. Instances of class 1, 1, 3 (class 3 has no prototype).
    proto_labels = torch.tensor([1, 1, 2])
    cos_s = torch.tensor([[0.9, 0.2, 0.99], [-0.9, -0.8, 0.0], [0.5, 0.5, 0.5]])
    cos_t = torch.tensor([[0.1, 0.7, -1.0], [0.9, 0.95, 0.0], [0.1, 0.1, 0.1]])
    w, has = robust_weights(cos_s, cos_t, torch.tensor([1, 1, 3]), proto_labels)
    # instance 0: max_s = 0.9 (class-2 column ignored), max_t = 0.7 -> 1 - 0.2 = 0.8
    # instance 1: max_s = -0.8, max_t = 0.95 -> 1 - 1.75 < 0 -> clamped to 0
    # instance 2: class without prototypes -> weight 1, no global term
    assert w.tolist() == pytest.approx([0.8, 0.0, 1.0])
    assert has.tolist() == [True, True, False]
    assert not w.requires_grad


def test_soft_label_kl_by_hand():
    zs = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    zt = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    t = 2.0
    pt = torch.softmax(zt / t, 1)
    ps = torch.softmax(zs / t, 1)
    kl0 = float((pt[0] * (pt[0] / ps[0]).log()).mean())   # averaged over the 2 classes
    w = torch.tensor([0.5, 1.0])
    got = soft_label_kl(zs, zt, w, t)
    assert got.item() == pytest.approx((t * t * kl0 * 0.5 + 0.0) / 2, rel=1e-6)
    assert soft_label_kl(zs, zt, None, t).item() == pytest.approx(t * t * kl0 / 2, rel=1e-6)
    assert soft_label_kl(zs[:0], zt[:0], w[:0], t).item() == 0.0


def test_global_loss_by_hand():
    cos_s = torch.tensor([[1.0, 0.0], [0.5, -0.5]], requires_grad=True)
    cos_t = torch.tensor([[0.0, 0.0], [0.5, 2.5]])
    w = torch.tensor([0.5, 1.0])
    loss = global_relation_loss(cos_s, cos_t, w)
    # scaled differences: row 0: (0.5, 0) -> 0.5 * 0.5^2 = 0.125; row 1: (0, -3) -> |3| - 0.5 = 2.5; mean over 4
    assert loss.item() == pytest.approx((0.125 + 0 + 0 + 2.5) / 4)
    loss.backward()
    assert cos_s.grad is not None and cos_s.grad[0, 0].item() == pytest.approx(0.5 * 0.5 / 4)


def test_pkd_is_one_minus_pearson_per_channel():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g)
    t = 2.0 * s + 1.0  # perfectly correlated: loss 0 whatever the scale and shift
    assert pkd_loss(s, t).item() == pytest.approx(0.0, abs=1e-6)
    t2 = torch.randn(2, 3, 4, 5, generator=g)
    # by hand: per channel r = Pearson over (B, H, W); loss = mean over channels of (1 - r) * (n - 1) / n
    n = 2 * 4 * 5
    r = torch.stack([torch.corrcoef(torch.stack([s[:, c].flatten(), t2[:, c].flatten()]))[0, 1] for c in range(3)])
    expected = float(((1 - r) * (n - 1) / n).mean())
    assert pkd_loss(s, t2).item() == pytest.approx(expected, rel=1e-4)


def test_level_pairing_by_stride_mobilenet_and_errors():
    resnet = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
    mobilenet = {"0": 32, "1": 32, "pool": 64}
    pairs, notes = pair_levels(mobilenet, resnet)
    assert [(p.stride, p.student, p.teacher) for p in pairs] == [(32, "0", "3"), (64, "pool", "pool")]
    assert any("'1' (stride 32) not distilled" in n for n in notes)
    assert any("stride 4" in n for n in notes)
    pairs, notes = pair_levels(resnet, resnet, wanted=(8, 16))
    assert [p.stride for p in pairs] == [8, 16] and any("not distilled" in n for n in notes)
    with pytest.raises(GkdError, match="distill.strides"):
        pair_levels(mobilenet, resnet, wanted=(4,))
    with pytest.raises(GkdError, match="share no stride"):
        pair_levels({"0": 4}, {"0": 8})


def test_assign_levels_reference_rule():
    # sqrt((w + 1)(h + 1)) / 56: < 2 -> level 0, [2, 4) -> 1, ...; clamped to the number of levels
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 111, 111], [0, 0, 150, 150], [0, 0, 1000, 1000.0]])
    assert assign_levels(boxes, 5).tolist() == [0, 1, 1, 4]
    assert assign_levels(boxes, 2).tolist() == [0, 1, 1, 1]
    assert math.floor(math.log2(112 / 56 + 1e-6)) == 1
    # a canonical size scaled to 160 px inputs (56 x 160 / 800): the same boxes spread over the pyramid
    assert assign_levels(boxes, 5, canonical=11.2).tolist() == [0, 3, 3, 4]
    assert assign_levels(torch.tensor([[0, 0, 21, 21.0], [0, 0, 30, 30], [0, 0, 60, 60]]), 5, 11.2).tolist() == [0, 1, 2]


def test_adapters_keep_the_map_size_for_both_kernels():
    from gkd.kd.distill.adapters import Adapters

    x = torch.randn(2, 256, 5, 7)
    for k in (3, 1):
        a = Adapters(["s4", "s8"], kernel=k)
        assert a.convs["s4"].weight.shape == (256, 256, k, k)
        assert a("s8", x).shape == x.shape


def test_max_same_class_cos():
    """The max over each instance's own-class prototype columns (labels 1..K); ``has`` False and best 0 where the
    class has no prototype, and for an empty bank (moved here from the operator tests: one implementation)."""
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(6, 7, generator=g) * 2 - 1
    proto_labels = torch.tensor([1, 1, 1, 3, 3, 3, 3])  # class 2 has no prototype
    labels = torch.tensor([1, 3, 2, 1, 3, 2])
    best, has = max_same_class_cos(cos, labels, proto_labels)
    for i, k in enumerate(labels.tolist()):
        cols = (proto_labels == k).nonzero().flatten()
        if cols.numel() == 0:
            assert not has[i] and best[i].item() == 0.0
        else:
            assert has[i] and best[i].item() == cos[i, cols].max().item()
    best, has = max_same_class_cos(cos[:, :0], labels, proto_labels[:0])
    assert not has.any() and (best == 0).all()
