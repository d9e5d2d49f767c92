"""Attention motion flow: Triton kernels (interpreter on CPU) vs the chunked reference vs a naive loop version."""
import math

import pytest
import torch

from _utils import REL_TOL, assert_rel_close
from fastvmt_kernels import motion_flow
from fastvmt_kernels.motion_flow import FlowGeometry, make_pairs
from fastvmt_kernels.motion_flow import op as flow_op
from fastvmt_kernels.motion_flow.reference import motion_flow_reference

# (frame, tile, window, span): ragged tiles on both axes, a non-square window, a window wider than the frame, a
# window covering the whole frame (the reference's dense global path) with ragged tiles.
GEOMETRIES = [
    ((5, 7), (2, 3), 3, 2),
    ((4, 6), (3, 4), (2, 7), 3),
    ((4, 6), (3, 4), 6, 2),
]


def naive_flow(q, k, frame, tile, window, span, temperature):
    """Independent loop version: per pair, per tile, per query token. Returns (flow (B,P,S,2), windows)."""
    batch, frames, _, dim = q.shape
    hf, wf = frame
    th, tw = tile
    wy, wx = (window, window) if isinstance(window, int) else window
    ly, lx = min(wy, hf), min(wx, wf)
    scale = temperature / math.sqrt(dim)
    flows, windows = [], []
    for b in range(batch):
        per_pair, per_pair_windows = [], []
        for i in range(frames):
            for j in range(i, min(frames, i + span)):
                qi = q[b, i].float().reshape(hf, wf, dim)
                kj = k[b, j].float().reshape(hf, wf, dim)
                tokens = [None] * (hf * wf)
                origins = []
                for y0 in range(0, hf, th):
                    for x0 in range(0, wf, tw):
                        rep = qi[y0 : y0 + th, x0 : x0 + tw].reshape(-1, dim).mean(0).detach()
                        probs = torch.softmax(kj.reshape(-1, dim).detach() @ rep * scale, 0)
                        cy = (probs * (torch.arange(hf * wf) // wf)).sum().item()
                        cx = (probs * (torch.arange(hf * wf) % wf)).sum().item()
                        oy = min(max(math.floor(cy + 0.5) - wy // 2, 0), hf - ly)
                        ox = min(max(math.floor(cx + 0.5) - wx // 2, 0), wf - lx)
                        origins.append((oy, ox))
                        keys = kj[oy : oy + ly, ox : ox + lx].reshape(-1, dim)
                        key_pos = torch.tensor([(oy + a, ox + c) for a in range(ly) for c in range(lx)]).float()
                        for y in range(y0, min(y0 + th, hf)):
                            for x in range(x0, min(x0 + tw, wf)):
                                p = torch.softmax(keys @ qi[y, x] * scale, 0)
                                tokens[y * wf + x] = p @ key_pos - torch.tensor([y, x]).float()
                per_pair.append(torch.stack(tokens))
                per_pair_windows.append(torch.tensor(origins))
        flows.append(torch.stack(per_pair))
        windows.append(torch.stack(per_pair_windows))
    return torch.stack(flows), torch.stack(windows)


@pytest.mark.parametrize("tile,window", [((1, 1), 3), ((3, 3), (8, 9))])
def test_frames_past_one_key_block_and_one_coarse_program(device, tile, window):
    """A 9 x 10 frame: 90 keys span two coarse key blocks of COARSE_BLOCK_N; with 1 x 1 tiles, 90 tiles need two
    coarse programs of COARSE_BLOCK_M; an 8 x 9 window box spans two fine key blocks of FINE_BLOCK_N (the online
    softmax rescales across blocks). Forward, windows and gradients against the naive loop."""
    frame = (9, 10)
    assert frame[0] * frame[1] > max(flow_op.COARSE_BLOCK_N, flow_op.FINE_BLOCK_N, flow_op.COARSE_BLOCK_M)
    q, k = _inputs((1, 2, frame[0] * frame[1], 16), torch.float32, device, scale=1.5)
    kwargs = dict(tile=tile, window=window, span=2, temperature=2.0)
    windows = {}

    def naive(a, b):
        flow, windows["naive"] = naive_flow(a.cpu(), b.cpu(), frame, tile, window, 2, 2.0)
        return flow.to(device)

    def fused_or_reference(backend):
        def flow_fn(a, b):
            flow, _, windows[backend] = motion_flow(a, b, frame, backend=backend, return_windows=True, **kwargs)
            return flow

        return flow_fn

    grad = torch.randn(1, 3, frame[0] * frame[1], 2, device=device)
    expected = _flow_and_grads(naive, q, k, grad)
    for backend in ("triton", "torch"):
        for label, got, want in zip(("flow", "dq", "dk"), _flow_and_grads(fused_or_reference(backend), q, k, grad),
                                    expected):
            assert_rel_close(got, want, 1e-5, f"{backend} {label}")
        assert torch.equal(windows[backend].cpu(), windows["naive"]), backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_far_below_zero_give_a_finite_flow(device, backend):
    """q = -k at temperature 200: every logit is below -200; the running max must not start at 0 (exp underflow
    would give 0 / 0)."""
    frame = (5, 7)
    k = (torch.randn(1, 2, 35, 16).abs() + 1.0).to(device)
    q = -k
    flow, _ = motion_flow(q, k, frame, tile=(2, 3), window=3, span=2, temperature=200.0, backend=backend)
    expected, _ = naive_flow(q.cpu(), k.cpu(), frame, (2, 3), 3, 2, 200.0)
    assert torch.isfinite(flow).all()
    assert_rel_close(flow, expected.to(device), 1e-5, "flow")


def _inputs(shape, dtype, device, scale=1.0):
    q = (torch.randn(shape) * scale).to(device=device, dtype=dtype).requires_grad_()
    k = (torch.randn(shape) * scale).to(device=device, dtype=dtype).requires_grad_()
    return q, k


def _flow_and_grads(fn, q, k, grad):
    flow = fn(q, k)
    dq, dk = torch.autograd.grad((flow * grad).sum(), (q, k))
    return flow, dq, dk


@pytest.mark.parametrize("frame,tile,window,span", GEOMETRIES)
def test_triton_and_reference_match_naive_fp32(device, frame, tile, window, span):
    q, k = _inputs((2, 3, frame[0] * frame[1], 16), torch.float32, device, scale=1.5)
    kwargs = dict(tile=tile, window=window, span=span, temperature=2.0)
    ref_flow, pairs, ref_windows = motion_flow(q, k, frame, backend="torch", return_windows=True, **kwargs)
    tri_flow, tri_pairs, tri_windows = motion_flow(q, k, frame, backend="triton", return_windows=True, **kwargs)
    naive_windows = []
    naive = lambda a, b: naive_windows.append(naive_flow(a, b, frame, tile, window, span, 2.0)) or naive_windows[0][0]
    grad = torch.randn(ref_flow.shape, device=device)
    runs = {
        "naive": _flow_and_grads(lambda a, b: naive(a.cpu(), b.cpu()).to(device), q, k, grad),
        "torch": _flow_and_grads(lambda a, b: motion_flow(a, b, frame, backend="torch", **kwargs)[0], q, k, grad),
        "triton": _flow_and_grads(lambda a, b: motion_flow(a, b, frame, backend="triton", **kwargs)[0], q, k, grad),
    }
    for name in ("torch", "triton"):
        for label, got, want in zip(("flow", "dq", "dk"), runs[name], runs["naive"]):
            assert_rel_close(got, want, 1e-5, f"{name} {label}")
    assert torch.equal(pairs.cpu(), make_pairs(3, span)) and torch.equal(tri_pairs, pairs)
    assert torch.equal(ref_windows.cpu(), naive_windows[0][1]) and torch.equal(tri_windows.cpu(), naive_windows[0][1])
    assert_rel_close(tri_flow, runs["naive"][0], 1e-5, "triton flow")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_matches_reference_with_same_windows(device, dtype):
    frame, tile, window = (5, 7), (2, 3), 3
    geo = FlowGeometry.create(frame, tile, window)
    q, k = _inputs((1, 3, 35, 32), dtype, device)
    flow, _, windows = motion_flow(q, k, frame, tile=tile, window=window, span=2, backend="triton", return_windows=True)
    _, _, ref_windows = motion_flow_reference(q.detach(), k.detach(), geo, 2, 1.0)
    # The coarse pass rounds tile-mean queries to the input dtype for the tensor cores: rare origin flips only.
    assert (windows == ref_windows).float().mean() >= 0.8
    grad = torch.randn(flow.shape, device=device)
    tri = (flow,) + torch.autograd.grad((flow * grad).sum(), (q, k))
    ref_flow = motion_flow_reference(q, k, geo, 2, 1.0, origins=windows)[0]
    ref = (ref_flow,) + torch.autograd.grad((ref_flow * grad).sum(), (q, k))
    for label, got, want in zip(("flow", "dq", "dk"), tri, ref):
        assert_rel_close(got.float(), want.float(), REL_TOL[dtype], label)


@pytest.mark.parametrize("dim", [48, 80, 144])
def test_triton_head_dims_that_are_not_powers_of_two(device, dim):
    """The Triton backend accepts any multiple of 16 up to 256: the kernels pad the head dim to a power of two and
    mask the extra channels (loads, the dq store and the dk atomics)."""
    frame, tile, window, span = (5, 7), (2, 3), 3, 2
    q, k = _inputs((1, 3, 35, dim), torch.float32, device)
    kwargs = dict(tile=tile, window=window, span=span, temperature=1.5)
    grad = torch.randn(1, 5, 35, 2, device=device)
    _, _, windows = motion_flow(q, k, frame, backend="torch", return_windows=True, **kwargs)
    tri = _flow_and_grads(lambda a, b: motion_flow(a, b, frame, backend="triton", **kwargs)[0], q, k, grad)
    ref = _flow_and_grads(lambda a, b: motion_flow(a, b, frame, backend="torch", **kwargs)[0], q, k, grad)
    assert torch.equal(motion_flow(q, k, frame, backend="triton", return_windows=True, **kwargs)[2], windows)
    for label, got, want in zip(("flow", "dq", "dk"), tri, ref):
        assert_rel_close(got, want, 1e-5, f"D={dim} {label}")


def test_window_covering_frame_is_dense_global_soft_argmax(device):
    frame = (4, 5)
    q, k = _inputs((1, 3, 20, 16), torch.float32, device)
    temperature, dim = 1.5, 16
    pos = FlowGeometry.create(frame, (1, 1), 1).token_positions(device)
    pairs = make_pairs(3, 3, device)
    logits = torch.einsum("psd,ptd->pst", q[0, pairs[:, 0]], k[0, pairs[:, 1]]) * temperature / math.sqrt(dim)
    dense = (torch.softmax(logits, -1) @ pos - pos)[None]
    for backend in ("torch", "triton"):
        flow, _, windows = motion_flow(
            q, k, frame, tile=(3, 2), window=9, span=3, temperature=temperature, backend=backend, return_windows=True
        )
        assert_rel_close(flow, dense, 1e-5, f"{backend} global flow")
        assert windows.eq(0).all()


def test_windows_clamped_at_frame_borders(device):
    """Keys that pull every tile to a corner: the origin is clamped to 0 / frame - l, matching the naive loop."""
    frame, tile, window = (6, 7), (2, 2), 3
    q = torch.zeros(1, 2, 42, 16)
    k = torch.randn(1, 2, 42, 16) * 0.1
    q[..., 0] = 1.0
    k[0, 0, 0, 0] = 8.0  # frame 0 keys peak at the top-left token
    k[0, 1, 41, 0] = 8.0  # frame 1 keys peak at the bottom-right token
    q, k = q.to(device), k.to(device)
    expected = naive_flow(q.cpu(), k.cpu(), frame, tile, window, 2, 4.0)
    for backend in ("torch", "triton"):
        flow, pairs, windows = motion_flow(
            q, k, frame, tile=tile, window=window, span=2, temperature=4.0, backend=backend, return_windows=True
        )
        assert pairs.tolist() == [[0, 0], [0, 1], [1, 1]]
        assert windows[0, 0].eq(0).all()
        assert windows[0, 1].tolist() == [[3, 4]] * 12 and windows[0, 2].tolist() == [[3, 4]] * 12
        assert torch.equal(windows.cpu(), expected[1])
        assert_rel_close(flow, expected[0].to(device), 1e-5, f"{backend} border flow")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_recovers_known_integer_shift(device, backend):
    """Frame 1's keys are frame 0's (orthonormal) features rolled by (dy, dx): the flow must equal the shift."""
    hf, wf, dim, (dy, dx) = 6, 8, 64, (1, -2)
    feats = torch.linalg.qr(torch.randn(dim, dim))[0][: hf * wf]  # orthonormal rows, one per token
    rolled = torch.roll(feats.reshape(hf, wf, dim), shifts=(dy, dx), dims=(0, 1)).reshape(hf * wf, dim)
    q = torch.stack([feats, rolled])[None].to(device)
    k = torch.stack([feats, rolled])[None].to(device)
    temperature = 40 * math.sqrt(dim)  # matches score 40 logits above everything else
    flow, _ = motion_flow(q, k, (hf, wf), tile=(2, 2), window=5, span=2, temperature=temperature, backend=backend)
    y, x = torch.meshgrid(torch.arange(hf), torch.arange(wf), indexing="ij")
    tile_y0, tile_x0 = (y // 2) * 2, (x // 2) * 2  # the whole tile's matches must be inside the frame (no wrap)
    inside = ((tile_y0 + dy >= 0) & (tile_y0 + 1 + dy < hf) & (tile_x0 + dx >= 0) & (tile_x0 + 1 + dx < wf)).reshape(-1)
    assert inside.sum() >= 12
    shift = torch.tensor([float(dy), float(dx)]).expand(int(inside.sum()), 2)
    assert torch.allclose(flow[0, 1, inside].cpu(), shift, atol=1e-3)
    assert flow[0, 0].abs().max() < 1e-3  # self pairs of orthonormal features: zero flow
    assert flow[0, 2].abs().max() < 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_five_dim_head_reductions(device, backend):
    frame, heads = (4, 5), 2
    q, k = _inputs((1, 2, 20, heads, 16), torch.float32, device)
    kwargs = dict(tile=(2, 2), window=3, span=2, backend=backend)
    flow, pairs, windows = motion_flow(q, k, frame, head_reduce="mean_flow", return_windows=True, **kwargs)
    assert windows.shape == (1, pairs.shape[0], heads, 6, 2)
    per_head = [motion_flow(q[:, :, :, h], k[:, :, :, h], frame, return_windows=True, **kwargs) for h in range(heads)]
    assert_rel_close(flow, torch.stack([f for f, _, _ in per_head]).mean(0), 1e-6, "mean_flow")
    assert torch.equal(windows, torch.stack([w for _, _, w in per_head], dim=2))
    dq = torch.autograd.grad(flow.square().sum(), q)[0]
    assert dq.shape == q.shape and dq.abs().sum() > 0
    mean_qk, _ = motion_flow(q, k, frame, head_reduce="mean_qk", **kwargs)
    assert_rel_close(mean_qk, motion_flow(q.mean(3), k.mean(3), frame, **kwargs)[0], 1e-6, "mean_qk")


def _dense_mean_logit_flow(q, k, frame, pairs, temperature):
    """DiTFlow's AMF written out: per-head logits temperature * q_h.k_h / sqrt(D), averaged over heads, softmax over
    frame j, expected key position minus own position. q, k: (B, F, S, H, D). Returns (B, P, S, 2)."""
    d = q.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(frame[0]), torch.arange(frame[1]), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double().to(q.device)
    out = []
    for i, j in pairs.tolist():
        logits = torch.einsum("bshd,bthd->bhst", q[:, i].double(), k[:, j].double()).mean(1) / math.sqrt(d)
        out.append(torch.softmax(temperature * logits, -1) @ pos - pos)
    return torch.stack(out, 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mean_logits_is_ditflows_head_averaged_logits(device, backend):
    """head_reduce="mean_logits" averages the per-head attention logits before each softmax (DiTFlow's code), which
    is not the flow of head-averaged q, k; a window covering the frame makes it DiTFlow's global AMF."""
    frame, heads, dim, temperature = (3, 4), 3, 16, 2.0
    q, k = _inputs((2, 3, 12, heads, dim), torch.float32, device, scale=1.5)
    kwargs = dict(tile=(2, 2), window=4, span=3, temperature=temperature, backend=backend, head_reduce="mean_logits")
    flow, pairs, windows = motion_flow(q, k, frame, return_windows=True, **kwargs)
    assert windows.shape == (2, pairs.shape[0], 4, 2) and torch.equal(windows, torch.zeros_like(windows))
    want = _dense_mean_logit_flow(q.detach(), k.detach(), frame, pairs, temperature)
    assert_rel_close(flow, want.float(), 1e-5, "mean_logits global flow")
    mean_qk = motion_flow(q, k, frame, **dict(kwargs, head_reduce="mean_qk"))[0]
    assert (flow - mean_qk).abs().max() > 0.05  # a different reduction, not a relabelled one
    # A local window (the coarse pass on the concatenated channels) and gradients, against the naive tile loop on
    # the concatenated channels at temperature / sqrt(H).
    grad = torch.randn(flow.shape, device=device)
    local = dict(kwargs, window=3)
    got = _flow_and_grads(lambda a, b: motion_flow(a, b, frame, **local)[0], q, k, grad)
    naive = lambda a, b: naive_flow(  # noqa: E731
        a.cpu().flatten(-2), b.cpu().flatten(-2), frame, (2, 2), 3, 3, temperature / math.sqrt(heads))[0].to(device)
    want = _flow_and_grads(naive, q, k, grad)
    for label, a, b in zip(("flow", "dq", "dk"), got, want):
        assert_rel_close(a, b, 1e-5, label)
    assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0


def test_auto_backend_takes_the_reference_for_channels_the_kernels_do_not_compile(device, monkeypatch):
    """"auto" on CUDA picks the kernels only for inputs they take: mean_logits over 12 heads x 32 channels
    (D' = 384 > 256) runs on the reference instead of raising, while backend="triton" still says why it cannot."""
    from fastvmt_kernels.motion_flow import interface

    monkeypatch.setattr(interface, "resolve_backend", lambda backend, dev: "torch" if backend == "torch" else "triton")
    q, k = _inputs((1, 2, 12, 12, 32), torch.float32, device)
    kwargs = dict(tile=(2, 2), window=3, span=2, head_reduce="mean_logits")
    got = motion_flow(q, k, (3, 4), backend="auto", **kwargs)[0]
    assert_rel_close(got, motion_flow(q, k, (3, 4), backend="torch", **kwargs)[0], 1e-6, "auto -> torch")
    with pytest.raises(ValueError, match="D a multiple of 16 up to 256, got D = 384"):
        motion_flow(q, k, (3, 4), backend="triton", **kwargs)


@pytest.fixture
def restore_deterministic_flag():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_deterministic_algorithms_flag(device, monkeypatch, restore_deterministic_flag):
    """Under torch.use_deterministic_algorithms(True) the triton backward (dk by fp32 atomics) follows torch's
    convention for nondeterministic ops: it raises, or warns with warn_only=True and still returns the gradients;
    its forward is unaffected. backend="auto" then takes the reference for differentiable inputs (the kernels for
    inputs without gradients, and without the flag)."""
    from fastvmt_kernels.motion_flow import interface

    q, k = _inputs((1, 3, 12, 16), torch.float32, device)
    q.requires_grad_()
    kwargs = dict(tile=(2, 2), window=3, span=2)
    g = torch.randn(1, 5, 12, 2, device=device)
    ref = motion_flow(q, k, (3, 4), backend="torch", **kwargs)[0]
    ref_grad = torch.autograd.grad(ref, q, g)[0]

    torch.use_deterministic_algorithms(True)
    flow = motion_flow(q, k, (3, 4), backend="triton", **kwargs)[0]
    assert_rel_close(flow, ref, REL_TOL[torch.float32], "forward under the flag")
    with pytest.raises(RuntimeError, match="triton backward does not have a deterministic implementation"):
        torch.autograd.grad(flow, q, g)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
        grad = torch.autograd.grad(motion_flow(q, k, (3, 4), backend="triton", **kwargs)[0], q, g)[0]
    assert_rel_close(grad, ref_grad, REL_TOL[torch.float32], "dq with warn_only")

    reference_calls = []
    reference = interface.motion_flow_reference
    monkeypatch.setattr(interface, "resolve_backend", lambda backend, dev: "torch" if backend == "torch" else "triton")
    monkeypatch.setattr(interface, "motion_flow_reference", lambda *a, **kw: reference_calls.append(1) or reference(*a, **kw))
    motion_flow(q, k, (3, 4), backend="auto", **kwargs)  # differentiable: the reference (warn_only: cuBLAS on a GPU)
    assert len(reference_calls) == 1
    motion_flow(q.detach(), k.detach(), (3, 4), backend="auto", **kwargs)  # no gradient: the kernels
    torch.use_deterministic_algorithms(False)
    motion_flow(q, k, (3, 4), backend="auto", **kwargs)  # no flag: the kernels
    assert len(reference_calls) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_given_windows_replace_the_coarse_pass(device, backend):
    frame, tile, window, span = (5, 7), (2, 3), 3, 2
    geo = FlowGeometry.create(frame, tile, window)
    q, k = _inputs((2, 3, 35, 16), torch.float32, device, scale=1.5)
    kwargs = dict(tile=tile, window=window, span=span, backend=backend, return_windows=True)
    own_flow, pairs, own_windows = motion_flow(q, k, frame, **kwargs)
    again, _, echoed = motion_flow(q, k, frame, windows=own_windows, **kwargs)
    assert torch.equal(echoed, own_windows)
    assert_rel_close(again, own_flow, 1e-6, "own windows given back")
    # Windows that the coarse pass would not pick: every legal origin, drawn at random.
    limit = torch.tensor(geo.max_origin) + 1
    other = (torch.rand(own_windows.shape) * limit).long().to(device)
    assert not torch.equal(other, own_windows)
    flow, _, used = motion_flow(q, k, frame, windows=other, **kwargs)
    assert torch.equal(used, other)
    grad = torch.randn(flow.shape, device=device)
    got = (flow,) + torch.autograd.grad((flow * grad).sum(), (q, k))
    want_flow = motion_flow_reference(q, k, geo, span, 1.0, origins=other)[0]
    want = (want_flow,) + torch.autograd.grad((want_flow * grad).sum(), (q, k))
    for label, a, b in zip(("flow", "dq", "dk"), got, want):
        assert_rel_close(a, b, 1e-5, label)
    assert not torch.allclose(flow, own_flow, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_given_windows_per_head(device, backend):
    frame, heads = (4, 5), 2
    q, k = _inputs((1, 2, 20, heads, 16), torch.float32, device)
    kwargs = dict(tile=(2, 2), window=3, span=2, backend=backend, head_reduce="mean_flow", return_windows=True)
    _, _, windows = motion_flow(q, k, frame, **kwargs)
    shifted = (windows + 1).clamp(max=torch.tensor([1, 2], device=device))  # max origin (4-3, 5-3)
    flow, _, used = motion_flow(q, k, frame, windows=shifted, **kwargs)
    assert torch.equal(used, shifted)
    per_head = [
        motion_flow(q[:, :, :, h], k[:, :, :, h], frame, tile=(2, 2), window=3, span=2, backend=backend,
                    windows=shifted[:, :, h])[0]
        for h in range(heads)
    ]
    assert_rel_close(flow, torch.stack(per_head).mean(0), 1e-6, "mean_flow with given windows")


@pytest.mark.parametrize(
    "windows,match",
    [
        (torch.zeros(1, 3, 6, 2, dtype=torch.int32), "int64 tensor"),
        (torch.zeros(1, 2, 6, 2, dtype=torch.int64), r"\(B, P, n_tiles, 2\) = \(1, 3, 6, 2\)"),
        (torch.full((1, 3, 6, 2), 2, dtype=torch.int64), r"origins must lie in \[0, \(1, 2\)\]"),
        (torch.full((1, 3, 6, 2), -1, dtype=torch.int64), "origins must lie in"),
    ],
)
def test_bad_given_windows_raise(windows, match):
    q, k = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    with pytest.raises(ValueError, match=match):
        motion_flow(q, k, (4, 5), tile=(2, 2), window=3, span=2, windows=windows)


def test_reference_global_path_matches_its_tiled_gather(monkeypatch):
    """Whole-frame windows take a dense S x S path in the reference; forcing the tiled gather gives the same flow
    and gradients (batch 2, ragged tiles, pairs split over chunks)."""
    from fastvmt_kernels.motion_flow import reference

    geo = FlowGeometry.create((5, 7), (2, 3), 9)
    assert geo.covers_frame
    assert reference.chunk_pairs_for(1, 1536, FlowGeometry.create((30, 52), (4, 4), 52)) >= 8  # was 1 per chunk
    q, k = _inputs((2, 4, 35, 16), torch.float32, "cpu", scale=1.5)
    grad = torch.randn(2, make_pairs(4, 3).shape[0], 35, 2)
    run = lambda a, b: motion_flow_reference(a, b, geo, 3, 2.0, chunk_pairs=2)[0]  # noqa: E731
    dense = _flow_and_grads(run, q, k, grad)
    monkeypatch.setattr(FlowGeometry, "covers_frame", property(lambda self: False))
    gathered = _flow_and_grads(run, q, k, grad)
    for label, a, b in zip(("flow", "dq", "dk"), dense, gathered):
        assert_rel_close(a, b, 1e-6, label)


def test_reference_chunking_does_not_change_result():
    geo = FlowGeometry.create((5, 6), (2, 4), 3)
    q, k = torch.randn(1, 4, 30, 8), torch.randn(1, 4, 30, 8)
    whole = motion_flow_reference(q, k, geo, 3, 1.0, chunk_pairs=100)
    chunked = motion_flow_reference(q, k, geo, 3, 1.0, chunk_pairs=2)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_fused_key_sums_match_reference(device, monkeypatch):
    """The GPU form of the forward's key sums (one three-operand tl.reduce; the interpreter default is three tl.sum
    calls, because the interpreter runs a custom combine function element by element in Python): same flow and
    gradients as the reference, with scattered windows and a ragged frame."""
    monkeypatch.setattr(flow_op, "FUSED_KEY_SUMS", True)
    frame, tile, window, span = (5, 7), (2, 3), (3, 4), 2
    geo = FlowGeometry.create(frame, tile, window)
    q, k = _inputs((1, 3, 35, 16), torch.float32, device, scale=1.5)
    pairs = make_pairs(3, span)
    origins = (torch.rand(1, pairs.shape[0], geo.num_tiles, 2) * (torch.tensor(geo.max_origin) + 1)).long()
    grad = torch.randn(1, pairs.shape[0], 35, 2, device=device)
    kwargs = dict(tile=tile, window=window, span=span, windows=origins.to(device))
    tri = _flow_and_grads(lambda a, b: motion_flow(a, b, frame, backend="triton", **kwargs)[0], q, k, grad)
    ref = _flow_and_grads(lambda a, b: motion_flow(a, b, frame, backend="torch", **kwargs)[0], q, k, grad)
    for label, got, want in zip(("flow", "dq", "dk"), tri, ref):
        assert_rel_close(got, want, 1e-5, f"fused sums {label}")


@pytest.mark.parametrize(
    "fwd_group, bwd_group, bwd_block_n",
    [((1, 1), (1, 1), 32), ((2, 2), (2, 2), 64), ((3, 2), (1, 2), 64), ((4, 9), (4, 9), 32)],
)
def test_tile_groups_match_reference_with_scattered_windows(device, monkeypatch, fwd_group, bwd_group, bwd_block_n):
    """The fine passes stream the bounding box of a group of tiles' windows and mask each query to its own window:
    with random (scattered) legal origins, ragged tile groups and a non-square window, flow, dq and dk must equal
    the reference's for every group shape (1 x 1 is one tile per program; 4 x 9 exceeds the 3 x 3 tile grid, so
    many key blocks hold no key of some queries' windows) and both backward key blocks, in both orientations."""
    monkeypatch.setattr(flow_op, "FWD_TILE_GROUP", fwd_group)
    monkeypatch.setattr(flow_op, "BWD_TILE_GROUP", bwd_group)
    monkeypatch.setattr(flow_op, "bwd_block_n", lambda d_pad, hopper=True: bwd_block_n)
    group = (fwd_group, bwd_group)
    frame, tile, window, span = (7, 8), (3, 3), (3, 4), 3
    geo = FlowGeometry.create(frame, tile, window)
    q, k = _inputs((2, 4, 56, 32), torch.float32, device, scale=1.5)
    pairs = make_pairs(4, span)
    limit = torch.tensor(geo.max_origin)
    origins = (torch.rand(2, pairs.shape[0], geo.num_tiles, 2) * (limit + 1)).long().to(device)
    grad = torch.randn(2, pairs.shape[0], 56, 2, device=device)
    kwargs = dict(tile=tile, window=window, span=span, windows=origins)
    tri = _flow_and_grads(lambda a, b: motion_flow(a, b, frame, backend="triton", **kwargs)[0], q, k, grad)
    ref = _flow_and_grads(lambda a, b: motion_flow(a, b, frame, backend="torch", **kwargs)[0], q, k, grad)
    for label, got, want in zip(("flow", "dq", "dk"), tri, ref):
        assert_rel_close(got, want, 1e-5, f"group {group} {label}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA property")
def test_fused_step_never_synchronises_the_host(device):
    """A forward + backward of the Triton path queues its kernels without waiting for the GPU (no .item(), no
    bincount, no pageable host-to-device copy): the host then overlaps the GPU instead of adding to it."""
    if device.type != "cuda":
        pytest.skip("runs with FASTVMT_GPU_TESTS=1")
    q, k = _inputs((1, 5, 30 * 52, 128), torch.bfloat16, device)
    kwargs = dict(tile=(3, 4), window=21, span=4, backend="triton")
    flow, _ = motion_flow(q, k, (30, 52), **kwargs)  # compiles, fills the pair cache
    grad = torch.randn_like(flow)
    torch.autograd.grad((flow * grad).sum(), (q, k))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flow, _ = motion_flow(q, k, (30, 52), **kwargs)
        torch.autograd.grad(flow, (q, k), grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_launchers_overwrite_poisoned_buffers(device):
    geo = FlowGeometry.create((5, 7), (2, 3), 3)
    q, k = [t.detach().contiguous() for t in _inputs((1, 3, 35, 16), torch.float32, device)]
    table = flow_op.pair_table(3, 2, device)
    assert torch.equal(table.pairs.cpu(), make_pairs(3, 2))
    assert table.offsets.tolist() == [0, 2, 4, 5] and table.pair_j.tolist() == [0, 1, 1, 2, 2]
    p, s, n = table.pairs.shape[0], 35, geo.num_tiles
    windows = torch.full((1, p, n, 2), -1, dtype=torch.int64, device=device)
    flow = torch.full((1, p, s, 2), float("nan"), device=device)
    lse = torch.full((1, p, s), float("nan"), device=device)
    flow_op.launch_coarse(q, k, table, geo, 1.0, windows)
    flow_op.launch_fine_forward(q, k, table, windows, geo, 1.0, flow, lse)
    ref_flow, _, ref_windows = motion_flow_reference(q, k, geo, 2, 1.0)
    assert torch.equal(windows, ref_windows)
    assert_rel_close(flow, ref_flow, 1e-5, "flow")
    assert torch.isfinite(lse).all()
    dq = torch.full_like(q, float("nan"))
    dk = torch.zeros_like(k)
    flow_op.launch_fine_backward(torch.randn_like(flow), q, k, table, windows, flow, lse, geo, 1.0, dq, dk)
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0


def test_custom_op_registration(device):
    q, k = _inputs((1, 2, 12, 16), torch.float32, device)
    # Legal origins (motion_flow() validates them; the kernels clamp others): frame (3, 4), window 3 -> [0, 0] x [0, 1].
    for given in (None, torch.tensor([[[[0, 1]], [[0, 0]], [[0, 1]]]], device=device).expand(1, 3, 4, 2)):
        torch.library.opcheck(
            flow_op.motion_flow_fwd,
            (q, k, given, 2, 3, 4, 2, 2, 3, 3, 1.0),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"),
        )


def test_op_clamps_illegal_given_origins_into_the_frame(device):
    """Origins handed straight to the op outside the legal range act as their clamped values: no window reads keys
    outside its frame or adds dk there (poisoned keys beyond the frame would show up as NaN)."""
    frame, geo = (3, 4), FlowGeometry.create((3, 4), (2, 2), 3)
    q, k = _inputs((1, 2, 12, 16), torch.float32, device)
    illegal = torch.tensor([[[[1, 0]], [[-2, 5]], [[0, 3]]]], device=device).expand(1, 3, 4, 2).contiguous()
    legal = torch.stack([illegal[..., 0].clamp(0, 0), illegal[..., 1].clamp(0, 1)], dim=-1)
    grad = torch.randn(1, 3, 12, 2, device=device)
    args = (2, *frame, *geo.tile, *geo.window, 1.0)
    runs = []
    for origins in (illegal, legal):
        flow, _, _ = flow_op.motion_flow_fwd(q, k, origins, *args)
        runs.append((flow,) + torch.autograd.grad((flow * grad).sum(), (q, k)))
    for name, got, want in zip(("flow", "dq", "dk"), *runs):
        assert_rel_close(got, want, 1e-6, f"illegal origins {name}")


def test_torch_compile_fullgraph_matches_eager(device):
    """The public function traces into one graph (custom op + fake kernel + registered autograd, no graph break)
    and gives the eager loss and gradients."""
    q, k = _inputs((1, 3, 20, 16), torch.float32, device)

    def loss(a, b):
        flow, _ = motion_flow(a, b, (4, 5), tile=(2, 2), window=3, span=2, backend="triton")
        return (flow**2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_loss = loss(q, k)
    eager_grads = torch.autograd.grad(eager_loss, (q, k))
    compiled_loss = compiled(q, k)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k))
    assert_rel_close(compiled_loss.detach(), eager_loss.detach(), 1e-6, "compiled loss")
    for name, got, want in zip(("dq", "dk"), compiled_grads, eager_grads):
        assert_rel_close(got, want, 1e-6, f"compiled {name}")


def test_given_windows_trace_under_torch_compile_fullgraph(device):
    """With ``windows=`` the eager range check reads the origins back to the host, which a graph cannot; compiled,
    the origins are clamped instead (as the kernels clamp them), and in-range ones give the eager results."""
    q, k = _inputs((1, 3, 20, 16), torch.float32, device)
    kwargs = dict(tile=(2, 2), window=3, span=2, backend="triton")
    _, _, windows = motion_flow(q.detach(), k.detach(), (4, 5), return_windows=True, **kwargs)

    def loss(a, b, w):
        return (motion_flow(a, b, (4, 5), windows=w, **kwargs)[0] ** 2).sum()

    eager = loss(q, k, windows)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, windows)
    assert_rel_close(compiled.detach(), eager.detach(), 1e-6, "compiled loss with given windows")
    for name, got, want in zip(("dq", "dk"), torch.autograd.grad(compiled, (q, k)), torch.autograd.grad(eager, (q, k))):
        assert_rel_close(got, want, 1e-6, f"compiled {name} with given windows")


def test_reference_math_stays_fp32_under_autocast():
    """The torch backend computes in fp32 even inside an autocast region (whose einsums would run in bf16)."""
    q, k = (torch.randn(1, 3, 20, 16) for _ in range(2))
    kwargs = dict(tile=(2, 2), window=3, span=2, backend="torch")
    plain = motion_flow(q, k, (4, 5), **kwargs)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = motion_flow(q, k, (4, 5), **kwargs)[0]
    assert_rel_close(autocast, plain, 1e-6, "flow under autocast")  # was 3e-3 off


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(temperature=float("inf")), "temperature must be a positive finite float"),
        (dict(window=0), "window entries must be >= 1"),
        (dict(span=0), "span must be an int >= 1"),
        (dict(frame_shape=(4, 4)), "frame_shape .* has 16 tokens but q has S = 20"),
        (dict(q=torch.zeros(1, 2, 20, 16, dtype=torch.int32)), "dtype torch.int32"),
        (dict(q=torch.zeros(2, 20, 16)), "q must have 4 dims"),
        (dict(k=torch.zeros(1, 2, 20, 32)), "same shape"),
        (dict(head_reduce="mean_flow"), "needs per-head q, k"),
        (dict(head_reduce="mean_logits"), "head_reduce='mean_logits' needs per-head q, k"),
        (dict(head_reduce="max"), "head_reduce must be one of"),
        (dict(temperature=0.0), "temperature must be a positive finite float"),
        (dict(tile=(3,)), "tile must be 2 positive ints"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(q=torch.zeros(1, 2, 20, 24), k=torch.zeros(1, 2, 20, 24), backend="triton"), "D a multiple of 16"),
        (dict(q=torch.zeros(1, 2, 1025, 16), k=torch.zeros(1, 2, 1025, 16), frame_shape=(1, 1025), backend="triton"),
         "frames up to 1024 tokens wide"),
    ],
)
def test_bad_inputs_raise(change, match, device):
    """Each bad argument gets its own message, on the device the triton backend accepts (a CPU tensor on a CUDA
    machine would stop at the device check first)."""
    args = dict(q=torch.zeros(1, 2, 20, 16), k=torch.zeros(1, 2, 20, 16), frame_shape=(4, 5))
    args.update(change)
    q, k, frame_shape = args.pop("q").to(device), args.pop("k").to(device), args.pop("frame_shape")
    with pytest.raises(ValueError, match=match):
        motion_flow(q, k, frame_shape, **args)


def test_even_window_origin_is_centre_minus_half_side_on_both_axes():
    geo = FlowGeometry.create((8, 8), (2, 2), (4, 4))
    assert geo.origins_from_centres(torch.tensor([[4.0, 4.0]])).tolist() == [[2, 2]]
