"""kd::prototype_project: the C++/CUDA operator and the vectorised fallback against the per-instance reference.

CPU tests need the extension (``pip install --no-build-isolation -e .`` builds it, CPU-only without nvcc); the CUDA
variants are marked ``needs_cuda`` and skip where torch sees no GPU.
"""
import logging
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from gkd.kd import _ops
from gkd.kd.prototype import (_cell_range, prototype_project, prototype_project_reference,
                          prototype_project_vectorized)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
STRIDES = [1.0, 2.5, 3.7, 4.0, 8.0]


def _op(features, boxes, stride, prototypes):
    if not _ops.has_ops():
        pytest.fail(f"the extension is not built: {_ops.backend_summary()}; run "
                    "`pip install --no-build-isolation --no-deps -e .`")
    return torch.ops.kd.prototype_project(features, boxes, stride, prototypes)


IMPLS = {"op": _op, "vectorized": prototype_project_vectorized}


def _random_boxes(g, n, batch, img_h, img_w, dtype=torch.float64):
    """Boxes of every awkward kind: ordinary, tiny (zero size), whole map, at the far edge, partly/wholly outside,
    inverted; shuffled."""
    kinds = torch.randint(0, 7, (n,), generator=g)
    rows = []
    for k in kinds.tolist():
        b = float(torch.randint(0, batch, (1,), generator=g))
        u = torch.rand(4, generator=g).tolist()
        if k == 0:    # ordinary
            x1, y1 = u[0] * img_w * 0.8, u[1] * img_h * 0.8
            box = (x1, y1, x1 + u[2] * (img_w - x1), y1 + u[3] * (img_h - y1))
        elif k == 1:  # tiny: a point
            x, y = u[0] * img_w, u[1] * img_h
            box = (x, y, x, y)
        elif k == 2:  # the whole image, ending exactly on the map's far edge
            box = (0.0, 0.0, img_w, img_h)
        elif k == 3:  # the last cell
            box = (img_w - 0.5, img_h - 0.5, img_w - 0.01, img_h - 0.01)
        elif k == 4:  # partly outside on both sides
            box = (-u[0] * img_w, -u[1] * img_h, img_w * (1 + u[2]), img_h * (0.5 + u[3]))
        elif k == 5:  # wholly outside (left/above or right/below)
            box = (-img_w * (1 + u[0]), -img_h, -1e-3, -u[1]) if u[3] < 0.5 else (img_w * 1.5, img_h * 2,
                                                                                   img_w * 3, img_h * 3)
        else:         # inverted
            box = (u[0] * img_w, u[1] * img_h, u[0] * img_w * 0.5, u[1] * img_h * 0.5)
        rows.append((b, *box))
    return torch.tensor(rows, dtype=dtype).reshape(n, 5)


def _random_case(seed, dtype=torch.float64, n=None, m=None, channels=None):
    g = torch.Generator().manual_seed(seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    batch, c, height, width = ri(1, 3), ri(1, 6), ri(1, 12), ri(1, 12)
    channels = c if channels is None else channels
    stride = STRIDES[ri(0, len(STRIDES) - 1)]
    n = ri(0, 12) if n is None else n
    m = ri(0, 6) if m is None else m
    features = torch.randn(batch, channels, height, width, generator=g, dtype=dtype)
    boxes = _random_boxes(g, n, batch, height * stride, width * stride)
    prototypes = torch.randn(m, channels, generator=g, dtype=dtype)
    grads = (torch.randn(n, channels, generator=g, dtype=dtype), torch.randn(n, m, generator=g, dtype=dtype))
    return features, boxes, stride, prototypes, grads


def _fwd_bwd(fn, features, boxes, stride, prototypes, grads, device="cpu", dtype=None):
    """Outputs and the gradients of <pooled, g_pooled> + <cos, g_cos> w.r.t. features and prototypes (on CPU)."""
    dtype = dtype or features.dtype
    f = features.to(device, dtype).requires_grad_()
    p = prototypes.to(device, dtype).requires_grad_()
    pooled, cos = fn(f, boxes.to(device), stride, p)
    loss = (pooled * grads[0].to(device, dtype)).sum() + (cos * grads[1].to(device, dtype)).sum()
    gf, gp = torch.autograd.grad(loss, (f, p), allow_unused=True, materialize_grads=True)
    return [t.detach().cpu().double() for t in (pooled, cos, gf, gp)]


def _assert_all_close(got, want, atol, rtol=0.0):
    for name, a, b in zip(("pooled", "cos", "grad_features", "grad_prototypes"), got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------- cell rule

@pytest.mark.parametrize("v1, v2, expected", [
    (0.0, 3.99, (0, 1)),      # inside one cell
    (4.0, 8.0, (1, 3)),       # inclusive end: y2 exactly on a cell border takes that cell (int(y2/s) + 1)
    (-10.0, 2.0, (0, 1)),     # partly outside: clipped at 0
    (38.0, 100.0, (9, 10)),   # partly outside at the far side
    (-20.0, -10.0, (0, 1)),   # wholly before the map: the first cell (the authors' |y| would give cells 2..3)
    (50.0, 60.0, (9, 10)),    # wholly after the map: the last cell
    (8.0, 4.0, (2, 3)),       # inverted: one cell at the start
    (-1e300, 1e300, (0, 10)),  # huge values do not overflow
])
def test_cell_range_rule(v1, v2, expected):
    assert _cell_range(v1, v2, 4.0, 10) == expected


@pytest.mark.parametrize("impl", IMPLS)
def test_pools_exactly_the_rule_cells(impl):
    # features[0, 0, r, c] = 100 r + c, so a box's mean identifies its cells.
    h, w, s = 5, 7, 4.0
    features = (100 * torch.arange(h).view(h, 1) + torch.arange(w)).double().view(1, 1, h, w)
    boxes = torch.tensor([[0, 4.0, 8.0, 8.0, 11.9],       # cols 1..2, rows 2..2
                          [0, -3.0, -3.0, 0.0, 0.0],      # cell (0, 0)
                          [0, 27.9, 19.9, 99.0, 99.0],    # cell (4, 6)
                          [0, 0.0, 0.0, 28.0, 20.0]],     # the whole map
                         dtype=torch.float64)
    pooled, _ = IMPLS[impl](features, boxes, s, torch.ones(1, 1, dtype=torch.float64))
    expected = [201.5, 0.0, 406.0, features.mean().item()]
    torch.testing.assert_close(pooled[:, 0], torch.tensor(expected, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- vs the reference

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_float64(impl, device, seed):
    case = _random_case(seed)
    want = _fwd_bwd(prototype_project_reference, *case)
    got = _fwd_bwd(IMPLS[impl], *case, device=device)
    _assert_all_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("boxes_per_image", [1, 40])
def test_direct_and_integral_paths(device, boxes_per_image):
    # The CPU kernel sums boxes directly when they cover fewer cells than the plane has, and goes through the
    # integral image otherwise; on CUDA, > 256 boxes touching one tile take several backward rounds.
    g = torch.Generator().manual_seed(boxes_per_image)
    features = torch.randn(2, 3, 16, 20, generator=g, dtype=torch.float64)
    n = 2 * boxes_per_image if device == "cpu" else 300
    boxes = _random_boxes(g, n, 2, 64.0, 80.0)
    if boxes_per_image == 1:
        boxes[:, 3:] = boxes[:, 1:3] + 2.0                         # small boxes: the direct path
    prototypes = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grads = (torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 5, generator=g, dtype=torch.float64))
    want = _fwd_bwd(prototype_project_reference, features, boxes, 4.0, prototypes, grads)
    got = _fwd_bwd(_op, features, boxes, 4.0, prototypes, grads, device=device)
    _assert_all_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64_reference(impl, device):
    case = _random_case(3, n=20, m=7, channels=8)
    want = _fwd_bwd(prototype_project_reference, *case)
    got = _fwd_bwd(IMPLS[impl], *case, device=device, dtype=torch.float32)
    _assert_all_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_on_cuda(dtype):
    # Enough channels that no pooled norm is tiny: the cosine's gradient scales with 1/|pooled|.
    case = _random_case(5, n=20, m=7, channels=16)
    want = _fwd_bwd(prototype_project_reference, *case)
    got = _fwd_bwd(_op, *case, device="cuda", dtype=dtype)
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    _assert_all_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_thread_count_independent(device):
    case = _random_case(7, dtype=torch.float32, n=30, m=5)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n_threads in (1, 2, 1):
            torch.set_num_threads(n_threads)
            runs.append(_fwd_bwd(_op, *case, device=device))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, m", [(0, 4), (3, 0), (0, 0)])
def test_empty_inputs(impl, device, n, m):
    case = _random_case(11, n=n, m=m)
    got = _fwd_bwd(IMPLS[impl], *case, device=device)
    c = case[0].shape[1]
    assert [tuple(t.shape) for t in got[:2]] == [(n, c), (n, m)]
    want = _fwd_bwd(prototype_project_reference, *case)
    _assert_all_close(got, want, atol=1e-12)
    if n == 0:
        assert not got[2].any(), "no box: the feature gradient must be zero"


@pytest.mark.parametrize("device", DEVICES)
def test_boxes_get_no_gradient_and_grads_only_where_asked(device):
    features, boxes, stride, prototypes, _ = _random_case(2, n=6, m=3)
    f = features.to(device).requires_grad_()
    b = boxes.to(device).requires_grad_()
    pooled, cos = _op(f, b, stride, prototypes.to(device))            # prototypes without grad
    (pooled.sum() + cos.sum()).backward()
    assert b.grad is None and f.grad is not None and f.grad.shape == f.shape


def test_double_backward_raises_instead_of_returning_zeros():
    features, boxes, stride, prototypes, _ = _random_case(2, n=4, m=3)
    f = features.requires_grad_()
    _, cos = _op(f, boxes, stride, prototypes)
    (g,) = torch.autograd.grad(cos.sum(), f, create_graph=True)               # first order with a graph: fine
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.square().sum(), f)


def test_non_contiguous_features():
    features, boxes, stride, prototypes, grads = _random_case(4, n=8, m=3)
    nc = features.transpose(2, 3).contiguous().transpose(2, 3)      # same values, strides of channels-last-ish
    assert not nc.is_contiguous()
    want = _fwd_bwd(prototype_project_reference, features, boxes, stride, prototypes, grads)
    got = _fwd_bwd(_op, nc, boxes, stride, prototypes, grads)
    _assert_all_close(got, want, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------------------------------ errors

def _bad_inputs():
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    b = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    p = torch.randn(4, 3, dtype=torch.float64)
    nan_box, inf_box, out_of_range, fractional = b.clone(), b.clone(), b.clone(), b.clone()
    nan_box[1, 2] = float("nan")
    inf_box[0, 3] = float("inf")
    out_of_range[1, 0] = 2
    fractional[1, 0] = 0.5
    return [
        ((f[0], b, 4.0, p), "features must be \\[B, C, H, W\\]"),
        ((f, b[:, :4], 4.0, p), "boxes must be \\[N, 5\\]"),
        ((f, b, 4.0, p[:, :2]), "prototypes must be \\[M, C\\] with C = 3"),
        ((f, nan_box, 4.0, p), "boxes\\[1\\] = .* is not finite"),
        ((f, inf_box, 4.0, p), "boxes\\[0\\] = .* is not finite"),
        ((f, out_of_range, 4.0, p), "boxes\\[1\\] has batch index 2(\\.0)?; expected an integer in \\[0, 2\\)"),
        ((f, fractional, 4.0, p), "boxes\\[1\\] has batch index 0.5"),
        ((f, b, 0.0, p), "stride must be a finite number > 0"),
        ((f, b, float("nan"), p), "stride must be a finite number > 0"),
        ((f, b, 4.0, p.float()), "prototypes"),
        ((f[:, :, :0], b, 4.0, p), "features have no cells"),
    ]


# Every malformed case through the raw op in a child interpreter, on the CPU and (where there is one) the GPU, with
# and without requires_grad (the two autograd paths). On a GPU it first runs a CUDA forward and backward, the state in
# which one GPU run (torch 2.11) died with SIGSEGV at the op's first ValueError. A crash there then fails one test,
# naming the signal and the child's faulthandler trace, instead of killing the whole pytest session.
_ERROR_PROBE = r"""
import importlib.util, re, sys
import torch
import gkd.kd.prototype  # registers the autograd and fake kernels, as in training
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("_op_tests", sys.argv[1])
tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests)
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
if "cuda" in devices:
    f = torch.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    b = torch.tensor([[0, 1.0, 1.0, 20.0, 20.0], [1, 0.0, 0.0, 9.0, 9.0]], device="cuda")
    pooled, cos = torch.ops.kd.prototype_project(f, b, 4.0, torch.randn(4, 3, device="cuda"))
    (pooled.sum() + cos.sum()).backward()
    torch.cuda.synchronize()
for device in devices:
    for i, (args, message) in enumerate(tests._bad_inputs()):
        for grad in (False, True):
            f, b, stride, p = (a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
            if grad:
                f = f.detach().requires_grad_()
            try:
                torch.ops.kd.prototype_project(f, b, stride, p)
            except ValueError as exc:
                if not re.search(message, str(exc)):
                    sys.exit(f"{device} case {i} grad={grad}: ValueError {exc!r} does not match {message!r}")
            else:
                sys.exit(f"{device} case {i} grad={grad}: no ValueError")
            print(f"ok {device} case {i} grad={grad}", flush=True)
"""


@pytest.fixture(scope="module")
def error_probe():
    """The finished child process of ``_ERROR_PROBE`` (run once per module, ~3 s)."""
    if not _ops.has_ops():
        pytest.fail(f"the extension is not built: {_ops.backend_summary()}")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", _ERROR_PROBE, str(Path(__file__).resolve())],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)


def _probe_report(proc) -> str:
    how = (f"was killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
           else f"exited with status {proc.returncode}")
    return f"the error probe {how} ({_ops.backend_summary()}); its output ends:\n{(proc.stdout + proc.stderr)[-3000:]}"


def test_malformed_inputs_raise_in_a_child_process_without_crashing(error_probe):
    assert error_probe.returncode == 0, _probe_report(error_probe)
    cases = len(_bad_inputs()) * 2 * (2 if torch.cuda.is_available() else 1)
    assert error_probe.stdout.count("ok ") == cases, _probe_report(error_probe)


def _fail_if_the_probe_crashed(request):
    """Fail (not crash) an in-process error test of the compiled op when the child already died of a signal."""
    proc = request.getfixturevalue("error_probe")
    if proc.returncode < 0:
        pytest.fail("not run in this process, it would kill the test session: " + _probe_report(proc))


@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_malformed_inputs_raise_value_error(impl, case, request):
    args, message = _bad_inputs()[case]
    if impl == "op":
        _fail_if_the_probe_crashed(request)
    fn = IMPLS.get(impl, prototype_project_reference)
    with pytest.raises(ValueError, match=message):
        fn(*args)


def test_half_on_cpu_is_refused_with_the_reason(request):
    _fail_if_the_probe_crashed(request)
    f, b, p = torch.randn(1, 2, 3, 3).half(), torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), torch.randn(2, 2).half()
    with pytest.raises(ValueError, match="float16/bfloat16 are supported on CUDA only"):
        _op(f, b, 4.0, p)


@pytest.mark.needs_cuda
def test_cuda_errors_name_the_box(request):
    _fail_if_the_probe_crashed(request)
    f = torch.randn(2, 3, 4, 5, device="cuda")
    b = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [3, 0.0, 0.0, 3.0, 3.0]], device="cuda")
    with pytest.raises(ValueError, match="boxes\\[1\\] has batch index 3(\\.0)?;"):
        _op(f, b, 4.0, torch.randn(4, 3, device="cuda"))


# ------------------------------------------------------------------------------- autograd, opcheck, compile

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed, contiguous", [(0, True), (1, True), (2, False)])
def test_gradcheck(device, seed, contiguous):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)           # tiny: gradcheck is O(numel)
    if not contiguous:
        features = features.transpose(2, 3).contiguous().transpose(2, 3)
    boxes = _random_boxes(g, 6, 2, 6 * 4.0, 5 * 4.0).to(device)
    f = features.to(device).requires_grad_()
    p = torch.randn(4, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, p: _op(f, boxes, 4.0, p), (f, p))


def _opcheck_samples(device):
    features, boxes, stride, prototypes, _ = _random_case(9, n=6, m=4)
    f, b, p = features.to(device), boxes.to(device), prototypes.to(device)
    return [
        (f, b, stride, p),
        (f.clone().requires_grad_(), b, stride, p),
        (f.clone().requires_grad_(), b, stride, p.clone().requires_grad_()),
        (f.float(), b.float(), stride, p.float().requires_grad_()),
        (f, b[:0], stride, p),                                       # no box
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", range(5))
def test_opcheck(device, sample):
    _op(*_opcheck_samples("cpu")[0])                                 # fails clearly if the extension is missing
    args = _opcheck_samples(device)[sample]
    torch.library.opcheck(torch.ops.kd.prototype_project.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device):
    features, boxes, stride, prototypes, grads = _random_case(10, n=6, m=4)
    pooled, _ = _op(features, boxes, stride, prototypes)
    b, _, h, w = features.shape
    for flags in [(True, True), (True, False), (False, True)]:
        args = (grads[0], grads[1], boxes, stride, prototypes, pooled, b, h, w, *flags)
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.kd._prototype_project_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, device):
    case = _random_case(6, dtype=torch.float32, n=7, m=5)
    _op(*case[:4])
    features, boxes, stride, prototypes = (t.to(device) if isinstance(t, torch.Tensor) else t for t in case[:4])
    grads = tuple(t.to(device) for t in case[4])

    def loss_fn(f, b, p):
        pooled, cos = prototype_project(f, b, stride, p)
        return (pooled * grads[0]).sum() + (cos * grads[1]).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    results = []
    for fn in (loss_fn, compiled):
        f, p = features.clone().requires_grad_(), prototypes.clone().requires_grad_()
        loss = fn(f, boxes, p)
        results.append((loss.detach(), *torch.autograd.grad(loss, (f, p))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------- wrapper and fallback path

def test_public_wrapper_uses_the_extension_and_casts_prototypes():
    features, boxes, stride, prototypes, _ = _random_case(12, n=5, m=3)
    assert _ops.has_kernel("cpu"), _ops.backend_summary()
    pooled, cos = prototype_project(features.float(), boxes, stride, prototypes)   # float64 bank, float32 map
    want_pooled, want_cos = prototype_project_reference(features, boxes, stride, prototypes)
    assert pooled.dtype == cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), want_cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled.double(), want_pooled, atol=1e-5, rtol=1e-5)


def test_fallback_runs_vectorized_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(_ops, "_KERNELS", {})
    monkeypatch.setattr(_ops, "_warned", False)
    features, boxes, stride, prototypes, grads = _random_case(13, n=9, m=4)
    with caplog.at_level(logging.WARNING, logger="gkd"):
        got = _fwd_bwd(prototype_project, features, boxes, stride, prototypes, grads)
        prototype_project(features, boxes, stride, prototypes)
    warnings = [r for r in caplog.records if "pure-PyTorch" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    _assert_all_close(got, _fwd_bwd(prototype_project_reference, features, boxes, stride, prototypes, grads),
                      atol=1e-10, rtol=1e-10)


def test_backend_summary_names_the_backend():
    summary = _ops.backend_summary()
    assert summary.startswith("C++ CPU") if _ops.has_ops() else summary.startswith("pure-PyTorch")


def test_build_info_matches_the_running_torch():
    if not _ops.has_ops():
        pytest.fail(f"the extension is not built: {_ops.backend_summary()}")
    info = _ops.build_info()
    assert info["torch"] == ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert info["compiler"].split()[0] in ("GCC", "clang") and info["compiler"] in _ops.backend_summary()


def test_extension_built_against_another_torch_is_refused():
    # A build for another torch minor may import (no missing symbol) yet disagree on C++ object layouts.
    fake = types.SimpleNamespace(compiler="GCC 12.2.0", torch_version="2.3")
    ok, why, kernels, info = _ops._load(import_module=lambda name: fake)
    assert not ok and not kernels and info == {"compiler": "GCC 12.2.0", "torch": "2.3"}
    assert why.startswith("gkd.kd._C was built against torch 2.3 but torch ") and why.endswith("rebuild it")
