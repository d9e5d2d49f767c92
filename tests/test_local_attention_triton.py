"""Triton local attention (forward, dq, dk, dv) against the chunked reference and a dense masked softmax.

Runs under the Triton interpreter on CPU (shapes kept tiny: cost ~ programs x loop steps), or compiled on
CUDA with FASTVMT_GPU_TESTS=1.
"""
import pytest
import torch
import torch.nn.functional as F

from fastvmt_kernels import TileLayout, local_attention, local_attention_mask
from fastvmt_kernels.local_attention import kernels, op
from fastvmt_kernels.local_attention.reference import local_attention_reference

from _utils import POISON, REL_TOL, assert_rel_close


def dense_masked(q, k, v, mask, scale):
    """Independent fp64 dense masked softmax: (out (B, L, H, D), lse (B, H, L))."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    logits = logits.masked_fill(~mask.to(q.device), float("-inf"))
    lse = logits.logsumexp(-1)
    return torch.einsum("bhqk,bkhd->bqhd", (logits - lse[..., None]).exp(), v.double()), lse


def random_qkv(b, seq, h, d, dtype, device):
    return [torch.randn(b, seq, h, d, device=device).to(dtype).requires_grad_() for _ in range(3)]


CASES = {
    # name: (dtype, B, H, D, grid, tile, window)
    "ragged-all-axes-borders-fp32": (torch.float32, 1, 1, 16, (3, 5, 7), (2, 2, 3), (1, 2, 3)),
    "even-grid-padded-tile-fp16": (torch.float16, 2, 1, 32, (2, 6, 8), (1, 3, 4), (2, 1, 1)),
    "pow2-tile-unmasked-bf16": (torch.bfloat16, 1, 2, 64, (2, 4, 16), (1, 4, 8), (1, 1, 1)),
    "multi-block-tile-odd-D-fp32": (torch.float32, 1, 1, 48, (1, 6, 20), (1, 6, 8), (1, 1, 2)),
    "ragged-t-only-bf16": (torch.bfloat16, 2, 2, 32, (5, 2, 4), (2, 2, 4), (2, 1, 1)),
    # the last t-tile holds 1 of 2 frames: its second 32-row block has no valid token at all
    "ragged-tile-with-empty-block-fp32": (torch.float32, 1, 1, 16, (3, 4, 8), (2, 4, 8), (1, 1, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_reference_and_dense(name, device):
    dtype, b, h, d, grid, tile, window = CASES[name]
    layout = TileLayout.create(grid, tile, window)
    q, k, v = random_qkv(b, layout.num_tokens, h, d, dtype, device)
    out, lse = local_attention(q, k, v, grid, tile, window, backend="triton", return_lse=True)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)  # lse is differentiable (ring attention merges use it)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))

    ref_out, ref_lse = local_attention_reference(q, k, v, layout)
    ref_grads = torch.autograd.grad((ref_out, ref_lse), (q, k, v), (dout, dlse))
    mask = local_attention_mask(grid, tile, window)
    dense_out, dense_lse = dense_masked(q, k, v, mask, d**-0.5)
    dense_grads = torch.autograd.grad((dense_out, dense_lse), (q, k, v), (dout.double(), dlse.double()))

    tol = REL_TOL[dtype]
    for expected_out, expected_lse, expected_grads, label in (
        (ref_out, ref_lse, ref_grads, "reference"),
        (dense_out, dense_lse, dense_grads, "dense"),
    ):
        assert_rel_close(out, expected_out, tol, f"out vs {label}")
        assert_rel_close(lse, expected_lse, 1e-5, f"lse vs {label}")
        for gname, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
            assert_rel_close(g, e, 2 * tol, f"{gname} vs {label}")


GQA_CASES = {
    # name: (dtype, B, H, H_kv, D, grid, tile, window)
    "grouped-ragged-fp32": (torch.float32, 2, 4, 2, 16, (3, 5, 7), (2, 2, 3), (1, 2, 1)),
    "multi-query-bf16": (torch.bfloat16, 1, 3, 1, 32, (2, 4, 6), (1, 2, 3), (2, 1, 1)),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(GQA_CASES))
def test_grouped_query_heads_match_dense_over_shared_heads(name, backend, device):
    """k, v with H_kv < H heads (grouped-query / multi-query attention): query head h attends key / value head
    h // (H / H_kv). Out, lse and the gradients (dk, dv summed over the query heads sharing a head) against a dense
    fp64 softmax over the heads repeated by the test."""
    dtype, b, h, h_kv, d, grid, tile, window = GQA_CASES[name]
    seq = grid[0] * grid[1] * grid[2]
    q = torch.randn(b, seq, h, d, device=device).to(dtype).requires_grad_()
    k, v = (torch.randn(b, seq, h_kv, d, device=device).to(dtype).requires_grad_() for _ in range(2))
    out, lse = local_attention(q, k, v, grid, tile, window, backend=backend, return_lse=True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))

    shared = [t.repeat_interleave(h // h_kv, dim=2) for t in (k, v)]  # (B, L, H, D): head h holds head h // g
    expected, expected_lse = dense_masked(q, *shared, local_attention_mask(grid, tile, window), d**-0.5)
    expected_grads = torch.autograd.grad((expected, expected_lse), (q, k, v), (dout.double(), dlse.double()))
    tol = REL_TOL[dtype]
    assert out.shape == q.shape and lse.shape == (b, h, seq)
    assert grads[1].shape == grads[2].shape == (b, seq, h_kv, d)
    assert_rel_close(out, expected, tol, "out")
    assert_rel_close(lse, expected_lse, 1e-5, "lse")
    for gname, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_rel_close(g, e, 2 * tol, gname)


def test_grouped_query_heads_with_covering_window_equal_sdpa_enable_gqa(device):
    grid, tile, window = (2, 3, 5), (2, 2, 4), (9, 9, 9)
    q = torch.randn(1, 30, 6, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 30, 2, 16, device=device, requires_grad=True) for _ in range(2))
    out = local_attention(q, k, v, grid, tile, window, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), enable_gqa=True).transpose(1, 2)
    assert_rel_close(out, expected, REL_TOL[torch.float32], "out")
    for gname, g, e in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(expected, (q, k, v), dout)):
        assert_rel_close(g, e, 2 * REL_TOL[torch.float32], gname)


@pytest.mark.parametrize(
    "q_shape,k_shape,v_shape,match",
    [
        ((1, 24, 3, 16), (1, 24, 2, 16), (1, 24, 2, 16), r"multiple of k's and v's .* got H = 3, H_kv = 2"),
        ((1, 24, 2, 16), (1, 24, 4, 16), (1, 24, 4, 16), r"multiple of k's and v's .* got H = 2, H_kv = 4"),
        ((1, 24, 2, 16), (1, 24, 1, 16), (1, 24, 2, 16), r"k and v must have the same shape \(B, L, H_kv, D\)"),
        ((1, 24, 2, 16), (1, 24, 1, 32), (1, 24, 1, 32), r"must agree in every dim but the heads"),
        ((1, 24, 2, 16), (2, 24, 1, 16), (2, 24, 1, 16), r"must agree in every dim but the heads"),
    ],
)
def test_mismatched_head_groups_raise(q_shape, k_shape, v_shape, match):
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=match):
            local_attention(q, k, v, (2, 3, 4), (1, 1, 1), (1, 1, 1), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_scale_forward_and_gradients(backend, device):
    grid, tile, window, scale = (2, 4, 6), (1, 2, 3), (1, 1, 1), 0.7
    q, k, v = random_qkv(1, 48, 2, 16, torch.float32, device)
    out = local_attention(q, k, v, grid, tile, window, scale=scale, backend=backend)
    expected, _ = dense_masked(q, k, v, local_attention_mask(grid, tile, window), scale)
    assert_rel_close(out, expected, REL_TOL[torch.float32], "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for gname, g, e in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(expected, (q, k, v), dout.double())):
        assert_rel_close(g, e, 2 * REL_TOL[torch.float32], gname)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_far_below_zero(backend, device):
    """q = -30 k: every logit is below -30 * 16 / 4; the running max must not start at 0 (0 / 0 after underflow)."""
    grid, tile, window = (2, 4, 6), (1, 2, 3), (1, 1, 1)
    k = (torch.randn(1, 48, 1, 16).abs() + 1.0).to(device)
    q, v = -30 * k, torch.randn(1, 48, 1, 16, device=device)
    out, lse = local_attention(q, k, v, grid, tile, window, backend=backend, return_lse=True)
    expected, expected_lse = dense_masked(q, k, v, local_attention_mask(grid, tile, window), 16**-0.5)
    assert torch.isfinite(out).all()
    assert_rel_close(out, expected, REL_TOL[torch.float32], "out")
    assert_rel_close(lse, expected_lse, 1e-6, "lse")


def test_window_covering_grid_equals_sdpa(device):
    grid, tile, window = (2, 3, 5), (2, 2, 4), (9, 9, 9)
    b, h, d, seq = 1, 2, 32, 30
    q, k, v = random_qkv(b, seq, h, d, torch.float32, device)
    out = local_attention(q, k, v, grid, tile, window, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    assert_rel_close(out, expected, REL_TOL[torch.float32], "out")
    for gname, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_rel_close(g, e, 2 * REL_TOL[torch.float32], gname)


def test_non_contiguous_views(device):
    """q, k, v unbound from a packed (B, L, 3, H, D) tensor and a transposed dout: read in place, correct."""
    grid, tile, window = (2, 3, 6), (1, 3, 4), (1, 1, 1)
    b, h, d, seq = 1, 2, 32, 36
    qkv = torch.randn(b, seq, 3, h, d, device=device, dtype=torch.float16).requires_grad_()
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    dout = torch.randn(b, h, seq, d, device=device, dtype=torch.float16).transpose(1, 2)  # (B, L, H, D) view
    assert_packed_matches_reference(qkv, grid, tile, window, dout)


def test_sdpa_layout_views_are_read_in_place(device):
    """Callers holding SDPA's (B, H, L, D) layout pass ``.transpose(1, 2)`` views (head stride L * D, token stride D)
    with no copy: out and the gradients of the (B, H, L, D) leaves equal the reference's (ragged grid, 2 heads)."""
    grid, tile, window = (2, 5, 7), (1, 2, 4), (1, 2, 1)
    b, h, d, seq = 2, 2, 32, 70
    leaves = [torch.randn(b, h, seq, d, device=device, dtype=torch.float16).requires_grad_() for _ in range(3)]
    views = [t.transpose(1, 2) for t in leaves]
    assert not views[0].is_contiguous() and views[0].stride(1) == d
    out = local_attention(*views, grid, tile, window, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref, _ = local_attention_reference(*(t.transpose(1, 2) for t in ref_leaves), TileLayout.create(grid, tile, window))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    assert_rel_close(out, ref, REL_TOL[torch.float16], "out")
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_rel_close(got, want, 2 * REL_TOL[torch.float16], f"d{name}")


def assert_packed_matches_reference(qkv, grid, tile, window, dout):
    """Triton local attention of q, k, v unbound from a packed (B, L, 3, H, D) tensor: out, d(qkv) vs the reference."""
    out = local_attention(*qkv.unbind(2), grid, tile, window, backend="triton")
    (grad,) = torch.autograd.grad(out, qkv, dout)
    qkv_ref = qkv.detach().clone().requires_grad_()
    ref, _ = local_attention_reference(*qkv_ref.unbind(2), TileLayout.create(grid, tile, window))
    (grad_ref,) = torch.autograd.grad(ref, qkv_ref, dout)
    assert_rel_close(out, ref, REL_TOL[qkv.dtype], "out")
    assert_rel_close(grad, grad_ref, 2 * REL_TOL[qkv.dtype], "dqkv")


def test_views_past_the_int32_row_range_are_copied_and_outputs_rejected(device, monkeypatch):
    """The kernels index rows as int32 ``row * stride_l + d``: a view whose offsets would not fit is read from a
    contiguous copy (same results), and a pre-allocated output that would not fit is refused. The limit is lowered
    here so that the packed views below (stride_l = 3 * H * D) exceed it while contiguous tensors (H * D) do not."""
    grid, tile, window = (2, 3, 6), (1, 3, 4), (1, 1, 1)
    b, h, d, seq = 1, 2, 32, 36
    monkeypatch.setattr(op, "MAX_ROW_OFFSET", (seq - 1) * h * d + d)  # contiguous fits, packed does not
    qkv = torch.randn(b, seq, 3, h, d, device=device).requires_grad_()
    q, k, v = qkv.unbind(2)
    assert op._rows_view(q) is not q and op._rows_view(q).is_contiguous()
    assert_packed_matches_reference(qkv, grid, tile, window, torch.randn(b, seq, h, d, device=device))
    packed_out = torch.empty(b, seq, 3, h, d, device=device)[:, :, 0]
    with pytest.raises(ValueError, match=r"out must have a unit-stride head dim and \(L - 1\) \* stride\(1\)"):
        op.launch_forward(q.detach(), k.detach(), v.detach(), TileLayout.create(grid, tile, window), d**-0.5,
                          out=packed_out)


def test_head_strides_past_the_int32_range_are_indexed_in_int64(device):
    """Rows are int32 offsets from int64 batch and head bases: a head-major view (e.g. ``x.view(H, B, L, D)``
    permuted to (B, L, H, D)) whose head offset h * stride(2) passes 2**31 elements must still read each head's own
    rows (forward and gradients against the reference on contiguous copies). The storage is 8 GiB of virtual memory
    of which only the viewed rows are written (lazily committed pages on the CPU); the view starts 2**31 elements in,
    so that a head offset wrapped to a negative int32 still lands inside it (wrong rows, not a crash)."""
    grid, tile, window = (1, 4, 4), (1, 4, 4), (1, 1, 1)
    seq, h, d = 16, 3, 16
    head_stride, start = 2**30 + 256, 2**31  # head 2 starts 2**31 + 512 elements past head 0
    try:
        storage = torch.empty(start + 2 * head_stride + seq * d, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve the 8 GiB of address space this view needs")
    q = storage.as_strided((1, seq, h, d), (0, d, head_stride, 1), start)
    q.copy_(torch.randn(1, seq, h, d, device=device))
    q.requires_grad_()
    k, v = (torch.randn(1, seq, h, d, device=device, dtype=torch.float16).requires_grad_() for _ in range(2))
    assert op._rows_view(q) is q  # read in place: its row offsets fit in int32, its head offsets do not
    out = local_attention(q, k, v, grid, tile, window, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    ref, _ = local_attention_reference(*dense, TileLayout.create(grid, tile, window))
    ref_grads = torch.autograd.grad(ref, dense, dout)
    for head in range(h):  # before the fix head 2 read rows 2**32 elements too early: relative error ~0.7
        assert_rel_close(out[:, :, head], ref[:, :, head], REL_TOL[torch.float16], f"out head {head}")
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_rel_close(got, want, 2 * REL_TOL[torch.float16], f"d{name}")


def test_too_many_tokens_for_int32_rows_is_refused():
    """L * H * D beyond int32 is refused before any launch (a zero-stride expanded tensor: no memory)."""
    grid, tile, window = (2, 256, 257), (1, 16, 16), (1, 1, 1)
    seq, heads, dim = 2 * 256 * 257, 256, 64
    q = torch.zeros(1, 1, 1, dim).expand(1, seq, heads, dim)
    with pytest.raises(ValueError, match=r"int32 offsets: \(L - 1\) \* H \* D \+ D must be <= 2147483647"):
        local_attention(q, q, q, grid, tile, window, backend="triton")


@pytest.mark.parametrize("h_kv", [2, 1])
def test_poisoned_outputs_are_fully_overwritten(h_kv, device):
    """Every element of out, lse, dq, dk, dv is written (multi-head, and multi-query with dk, dv of one head)."""
    grid, tile, window = (3, 3, 5), (2, 2, 3), (1, 2, 1)  # ragged on every axis, padded tiles
    layout = TileLayout.create(grid, tile, window)
    b, h, d, seq = 1, 2, 16, 45
    q, dout = (torch.randn(b, seq, h, d, device=device) for _ in range(2))
    k, v = (torch.randn(b, seq, h_kv, d, device=device) for _ in range(2))
    out = torch.full((b, seq, h, d), POISON, device=device)
    lse = torch.full((b, h, seq), POISON, device=device)
    op.launch_forward(q, k, v, layout, d**-0.5, out=out, lse=lse)
    grads = [torch.full(t.shape, POISON, device=device) for t in (q, k, v)]
    op.launch_backward(dout, q, k, v, out, lse, None, layout, d**-0.5, *grads)

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = local_attention_reference(qr, kr, vr, layout)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout)
    assert_rel_close(out, ref_out, REL_TOL[torch.float32], "out")
    assert_rel_close(lse, ref_lse, REL_TOL[torch.float32], "lse")
    for gname, g, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(g, e, 2 * REL_TOL[torch.float32], gname)


def test_query_range_table_matches_brute_force():
    layout = TileLayout.create((7, 5, 9), (2, 1, 2), (3, 4, 1))  # n = (4, 5, 5), windows clamp at borders
    table = op._query_range_table(layout, torch.device("cpu"))
    offsets = [0, layout.num_tiles[0], layout.num_tiles[0] + layout.num_tiles[1]]
    total = sum(layout.num_tiles)
    for axis, n in enumerate(layout.num_tiles):
        starts, ends = layout.window_bounds(axis, torch.arange(n))
        for key_tile in range(n):
            queries = [c for c in range(n) if starts[c] <= key_tile < ends[c]]
            lo, hi = table[offsets[axis] + key_tile].item(), table[total + offsets[axis] + key_tile].item()
            assert list(range(lo, hi)) == queries, (axis, key_tile)


def test_custom_op_traces_under_torch_compile(device):
    grid, tile, window = (1, 4, 4), (1, 4, 4), (1, 1, 1)  # a single tile keeps the interpreter fast
    q, k, v = random_qkv(1, 16, 1, 16, torch.float32, device)

    def attend(q, k, v):
        return local_attention(q, k, v, grid, tile, window, backend="triton").sum()

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref = local_attention_reference(q, k, v, TileLayout.create(grid, tile, window))[0].sum()
    ref_grads = torch.autograd.grad(ref, (q, k, v))
    assert_rel_close(loss, ref, REL_TOL[torch.float32], "loss")
    for gname, g, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(g, e, 2 * REL_TOL[torch.float32], gname)


@pytest.mark.parametrize("h_kv", [2, 1])
def test_opcheck_forward_op(h_kv, device):
    """Schema, fake kernel, autograd registration and AOT dispatch (forward + backward through the registered
    backward op), on a 3 x 5 x 3 grid with 1 x 2 x 2 tiles (ragged in y and x); multi-head and multi-query."""
    q = torch.randn(1, 45, 2, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 45, h_kv, 16, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(
        torch.ops.fastvmt.local_attention_fwd.default,
        (q, k, v, [3, 5, 3], [1, 2, 2], [1, 1, 1], 0.25, 0),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("d", [24, 8, 272])
def test_unsupported_head_dim_raises(d, device):
    q = torch.randn(1, 16, 1, d, device=device)
    with pytest.raises(ValueError, match=r"head dim D = \d+ unsupported .*multiples of 16 up to 256"):
        local_attention(q, q, q, (1, 4, 4), (1, 4, 4), (1, 1, 1), backend="triton")


def test_too_many_batch_heads_for_one_launch_raise(device):
    q = torch.randn(1, 1, 1, 16, device=device).expand(2, 8, 40000, 16)  # a view: no memory
    with pytest.raises(ValueError, match=r"at most 65535 \(batch x heads\) per call, got B = 2 x H = 40000"):
        local_attention(q, q, q, (1, 2, 4), (1, 2, 2), (1, 1, 1), backend="triton")


def test_too_many_tiles_per_axis_raises():
    q = torch.randn(1, 1025, 1, 16)
    with pytest.raises(ValueError, match=r"up to 1024 tiles per axis, got \(1, 1, 1025\)"):
        local_attention(q, q, q, (1, 1, 1025), (1, 1, 1), (1, 1, 3), backend="triton")


def test_too_large_window_box_raises():
    q = torch.randn(1, 600 * 600, 1, 16)
    with pytest.raises(ValueError, match=r"prod_a min\(n_a, 2 \* w_a\) < 262144 tiles .* got 360000"):
        local_attention(q, q, q, (1, 600, 600), (1, 1, 1), (1, 600, 600), backend="triton")


def test_mixed_devices_raise():
    q = torch.randn(1, 16, 1, 16)
    with pytest.raises(ValueError, match="must be on one device"):
        local_attention(q, q.to("meta"), q, (1, 4, 4), (1, 4, 4), (1, 1, 1), backend="triton")


def test_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    q = torch.randn(1, 16, 1, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        local_attention(q, q, q, (1, 4, 4), (1, 4, 4), (1, 1, 1), backend="triton")
