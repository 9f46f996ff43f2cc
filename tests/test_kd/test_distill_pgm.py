"""Prototype Generation Module: matching pursuit vs brute force, density filter, sampling, determinism, small data."""
import pytest
import torch
import torch.nn.functional as F

from gkd.kd.config import ModelConfig
from gkd.kd.distill.config import PGMConfig
from gkd.kd.distill.levels import pair_levels
from gkd.kd.distill.pgm import PrototypeGenerator, density_candidates, joint_matching_pursuit, sample_images
from gkd.kd.models.detectors import build_detector
from tests.helpers import TEST_THREADS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine, OpenMP with 2 threads under load is several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


def brute_force_pursuit(fs, ft, num, alpha, bandwidth, percentile):
    """The reference's algorithm with the full K x C x N error tensor (and exclusion of chosen atoms)."""
    xs, xt = F.normalize(fs.double(), dim=1), F.normalize(ft.double(), dim=1)
    cand = density_candidates(xs.float(), xt.float(), bandwidth, percentile)
    gs, gt = xs[cand], xt[cand]
    rs, rt = xs.t().clone(), xt.t().clone()  # [C, N]
    chosen, taken = [], set()
    for _ in range(min(num, len(cand))):
        a = gs @ rs  # [K, N]
        b = gt @ rt
        ws = (alpha * (a + b) + a) / (1 + 2 * alpha)
        wt = (alpha * (a + b) + b) / (1 + 2 * alpha)
        # K x C x N reconstruction errors, summed over C and N
        es = ((ws[:, None, :] * gs[:, :, None] - rs[None]) ** 2).sum(dim=(1, 2))
        et = ((wt[:, None, :] * gt[:, :, None] - rt[None]) ** 2).sum(dim=(1, 2))
        err = es + et + alpha * ((ws - wt) ** 2).sum(dim=1)
        for k in taken:
            err[k] = float("inf")
        k = int(torch.argmin(err))
        taken.add(k)
        chosen.append(int(cand[k]))
        rs = rs - gs[k][:, None] * ws[k][None]
        rt = rt - gt[k][:, None] * wt[k][None]
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_pursuit_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, c = 40, 16
    # clustered data so that the density filter and the pursuit have structure to find
    centers = torch.randn(4, c, generator=g)
    fs = centers[torch.randint(0, 4, (n,), generator=g)] + 0.3 * torch.randn(n, c, generator=g)
    ft = fs @ torch.randn(c, c, generator=g) * 0.2 + 0.5 * fs
    got = joint_matching_pursuit(fs, ft, 6, alpha=10.0, bandwidth=0.5, percentile=0.4)
    assert got.tolist() == brute_force_pursuit(fs, ft, 6, 10.0, 0.5, 0.4)
    assert len(set(got.tolist())) == len(got)  # chosen atoms are never re-selected


def test_density_filter_keeps_dense_instances_and_falls_back():
    # 6 near-copies of one direction (dense) and 4 scattered directions (density ~1: only themselves)
    g = torch.Generator().manual_seed(0)
    dense = torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(6, 4, generator=g)
    sparse = torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0], [-1.0, 0, 0, 0]])
    xs = F.normalize(torch.cat([dense, sparse]), dim=1)
    # bound = density at sorted position floor(0.4 * 10) = 4, the least dense of the dense group; strictly above it
    dens = torch.exp(-(((1 - xs @ xs.t()) / 0.1) ** 2)).sum(1)
    least = int(dens[:6].argmin())
    cand = density_candidates(xs, xs, 0.1, 0.4)
    assert cand.tolist() == [i for i in range(6) if i != least]
    # the filter must hold in both spaces: a teacher space where instance 0 is isolated removes it too
    xt = xs.clone()
    xt[0] = F.normalize(torch.tensor([0, 1.0, 1.0, 1.0]), dim=0)
    assert 0 not in density_candidates(xs, xt, 0.1, 0.4).tolist()
    # one instance: the strict bound leaves nothing, so every instance is a candidate (the reference would crash)
    one = F.normalize(torch.randn(1, 4, generator=g), dim=1)
    assert density_candidates(one, one, 0.1, 0.4).tolist() == [0]


def test_fewer_prototypes_than_asked_for_small_classes():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    idx = joint_matching_pursuit(fs, ft, 10)
    assert 1 <= len(idx) <= 3 and len(set(idx.tolist())) == len(idx)
    assert joint_matching_pursuit(fs[:0], ft[:0], 10).numel() == 0


def test_sampling_is_seeded_capped_and_independent_per_class():
    ann = []
    for i in range(50):
        labels = torch.tensor([1, 2]) if i % 2 else torch.tensor([1, 1])
        ann.append((torch.tensor([[0, 0, 40.0, 40.0], [0, 0, 10.0, 50.0]]), labels))
    a = sample_images(ann, 3, min_box_size=30, max_images=7, seed=5)
    b = sample_images(ann, 3, min_box_size=30, max_images=7, seed=5)
    c = sample_images(ann, 3, min_box_size=30, max_images=7, seed=6)
    assert a == b and a != c
    assert len(a[1]) == 7 and a[1] == sorted(a[1])
    # class 2 only appears as a 10 px wide box: not valid; class 3 never appears
    assert a[2] == [] and a[3] == []
    assert sample_images(ann, 3, 30, 100, 5)[1] == list(range(50))


def _tiny_models():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128))
    return build_detector(cfg, 3), build_detector(cfg, 3)


def _tiny_split(n=6):
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(n):
        boxes = torch.tensor([[2, 2, 30, 30.0], [30, 20, 60, 55], [5, 40, 20, 50]])
        labels = torch.tensor([1, 2, 3])  # class 3's box is 15 x 10 px: too small for prototypes
        data.append((torch.rand(3, 64, 64, generator=g), {"boxes": boxes, "labels": labels}))
    return data


def test_refresh_deterministic_per_seed_and_class_without_instances():
    student, teacher = _tiny_models()
    data = _tiny_split()
    ann = [(t["boxes"], t["labels"]) for _, t in data]
    pairs, _ = pair_levels(student.gkd_meta["strides"], teacher.gkd_meta["strides"])
    cfg = PGMConfig(num_prototypes=3, min_box_size=16, max_images_per_class=4, batch_size=4)
    gen = PrototypeGenerator(cfg, pairs, ["a", "b", "c"], ann, lambda i: data[i], seed=0)
    assert gen.empty_classes == [3]
    bank1, m1 = gen.refresh(student, teacher, torch.device("cpu"))
    gen2 = PrototypeGenerator(cfg, pairs, ["a", "b", "c"], ann, lambda i: data[i], seed=0)
    bank2, _ = gen2.refresh(student, teacher, torch.device("cpu"))
    for p in pairs:
        assert torch.equal(bank1.student[p.key], bank2.student[p.key])
        assert torch.equal(bank1.teacher[p.key], bank2.teacher[p.key])
        labels = bank1.labels[p.key].tolist()
        assert 3 not in labels and set(labels) == {1, 2} and labels == sorted(labels)
        assert bank1.count(p.key) <= 6 and bank1.student[p.key].shape[1] == 256
    assert all(len(gen.samples[c]) == 4 for c in (1, 2))
    assert m1["pgm_images"] == len(gen.images) and m1["pgm_instances"] == 2 * len(gen.images)
    assert m1["pgm_time_s"] > 0
    # the teacher's features are cached: a second refresh does not run the teacher at all
    calls = []
    h = teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    bank3, _ = gen.refresh(student, teacher, torch.device("cpu"))
    h.remove()
    assert calls == [] and all(torch.equal(bank3.teacher[p.key], bank1.teacher[p.key]) for p in pairs)
