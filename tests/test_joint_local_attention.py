"""joint_local_attention (local video attention + dense global tokens) against an independent dense masked softmax.

The Triton backend runs under the interpreter on CPU (tiny shapes), or compiled with FASTVMT_GPU_TESTS=1.
"""
import pytest
import torch
import torch.nn.functional as F

from fastvmt_kernels import joint_local_attention, local_attention, local_attention_mask

from _utils import REL_TOL, assert_rel_close


def joint_mask(grid, tile, window, num_global, prefix, global_key_mask):
    """Dense (B, N, N) bool mask of the joint rule, built independently of the implementation."""
    local = local_attention_mask(grid, tile, window)
    num_video = local.shape[0]
    total = num_global + num_video
    batch = global_key_mask.shape[0]
    mask = torch.zeros(batch, total, total, dtype=torch.bool)
    g = torch.arange(num_global) if prefix else torch.arange(num_video, total)
    vid = torch.arange(num_global, total) if prefix else torch.arange(num_video)
    for b in range(batch):
        for qi, query in enumerate(vid.tolist()):
            mask[b, query, vid] = local[qi]
            mask[b, query, g] = global_key_mask[b]
        for query in g.tolist():
            mask[b, query, vid] = True
            mask[b, query, g] = global_key_mask[b]
    return mask


def dense_masked(q, k, v, mask, scale):
    """fp64 dense softmax attention with a (B, N, N) mask: out (B, N, H, D)."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    logits = logits.masked_fill(~mask[:, None].to(q.device), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.double())


def assert_matches_dense_union(out, q, k, v, grid, tile, window, num_global, prefix, key_mask, tol):
    """``out`` and its gradients for a random output gradient against the fp64 dense softmax over the joint rule's
    keys (``key_mask``: (B, num_global) bool), with k, v repeated over grouped query heads; gradients at 2 * tol."""
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    shared = [t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v)]
    mask = joint_mask(grid, tile, window, num_global, prefix, key_mask)
    expected = dense_masked(q, *shared, mask, q.shape[-1] ** -0.5)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout.double())
    assert_rel_close(out, expected, tol, "out")
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_rel_close(g, e, 2 * tol, name)


CASES = {
    # name: (dtype, B, H, D, grid, tile, window, num_global, position, masked)
    "prefix-ragged-fp32": (torch.float32, 1, 2, 16, (3, 5, 7), (2, 2, 3), (1, 2, 1), 5, "prefix", False),
    "suffix-key-mask-fp32": (torch.float32, 2, 1, 32, (2, 4, 6), (1, 2, 3), (1, 1, 1), 7, "suffix", True),
    "prefix-key-mask-bf16": (torch.bfloat16, 2, 2, 32, (2, 4, 8), (1, 4, 4), (1, 1, 1), 6, "prefix", True),
    "suffix-fp16": (torch.float16, 1, 1, 64, (2, 3, 8), (1, 3, 4), (2, 1, 1), 3, "suffix", False),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_masked_softmax(name, backend, device):
    dtype, b, h, d, grid, tile, window, num_global, position, masked = CASES[name]
    num_video = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(b, num_global + num_video, h, d, device=device).to(dtype).requires_grad_() for _ in range(3))
    key_mask = torch.ones(b, num_global, dtype=torch.bool)
    if masked:  # batch 0: some global keys masked; batch 1: every global key masked
        key_mask[0, ::2] = False
        key_mask[1:] = False
    out = joint_local_attention(
        q, k, v, grid, tile, window, num_global=num_global, global_position=position,
        global_key_mask=key_mask.to(device) if masked else None, backend=backend,
    )
    assert out.dtype == dtype
    assert_matches_dense_union(out, q, k, v, grid, tile, window, num_global, position == "prefix", key_mask,
                               REL_TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_grouped_query_heads_match_dense_over_shared_heads(position, backend, device):
    """k, v with H_kv = H / 2 heads (grouped-query attention) and a global key mask: every query head h attends key /
    value head h // 2, in the video queries' local and global parts and in the global queries' dense part."""
    b, h, h_kv, d, grid, tile, window, num_global = 2, 4, 2, 16, (2, 3, 5), (1, 2, 2), (1, 1, 2), 4
    total = num_global + grid[0] * grid[1] * grid[2]
    q = torch.randn(b, total, h, d, device=device, requires_grad=True)
    k, v = (torch.randn(b, total, h_kv, d, device=device, requires_grad=True) for _ in range(2))
    key_mask = torch.ones(b, num_global, dtype=torch.bool)
    key_mask[0, 1::2] = False
    out = joint_local_attention(q, k, v, grid, tile, window, num_global=num_global, global_position=position,
                                global_key_mask=key_mask.to(device), backend=backend)
    assert_matches_dense_union(out, q, k, v, grid, tile, window, num_global, position == "prefix", key_mask,
                               REL_TOL[torch.float32])


GLOBAL_KERNEL_CASES = {
    # name: (dtype, B, H, H_kv, D, grid, tile, window, num_global, position)
    # 30 video queries in 7 whole chunks of 4 global tokens and a padded one of 2; batch 2; grouped heads
    "many-chunks-gqa-fp32": (torch.float32, 2, 4, 2, 16, (2, 3, 5), (1, 2, 2), (1, 1, 2), 4, "prefix"),
    # 130 global tokens (one full 128-token tile and a ragged one) for 20 video queries: one padded chunk
    "wide-global-bf16": (torch.bfloat16, 1, 2, 2, 32, (1, 4, 5), (1, 2, 2), (1, 1, 1), 130, "suffix"),
    # a reference frame as the global prefix (Wan-Animate): 12 global tokens for 3 frames of 4 x 3 video tokens
    "reference-frame-fp16": (torch.float16, 1, 2, 1, 16, (3, 4, 3), (1, 2, 3), (2, 1, 1), 12, "prefix"),
}


@pytest.mark.parametrize("name", list(GLOBAL_KERNEL_CASES))
def test_unmasked_global_keys_run_on_the_kernels(name, device, monkeypatch):
    """With the Triton backend and no key mask the video queries' global part runs through the local-attention
    kernels (the fp32 block is not called): forward and gradients equal a dense fp64 softmax over the union."""
    from fastvmt_kernels.local_attention import joint

    def no_fp32_block(*args):
        raise AssertionError("the fp32 video-to-global block ran")

    monkeypatch.setattr(joint, "_video_to_global", no_fp32_block)
    dtype, b, h, h_kv, d, grid, tile, window, num_global, position = GLOBAL_KERNEL_CASES[name]
    total = num_global + grid[0] * grid[1] * grid[2]
    q = torch.randn(b, total, h, d, device=device).to(dtype).requires_grad_()
    k, v = (torch.randn(b, total, h_kv, d, device=device).to(dtype).requires_grad_() for _ in range(2))
    out = joint_local_attention(q, k, v, grid, tile, window, num_global=num_global, global_position=position,
                                backend="triton")
    assert out.dtype == dtype
    assert_matches_dense_union(out, q, k, v, grid, tile, window, num_global, position == "prefix",
                               torch.ones(b, num_global, dtype=torch.bool), REL_TOL[dtype])


def test_masked_global_keys_and_the_torch_backend_take_the_fp32_block(device, monkeypatch):
    """The kernels' global path has no key mask: a mask (or the torch backend) keeps the dense fp32 block."""
    from fastvmt_kernels.local_attention import joint

    def no_kernels(*args):
        raise AssertionError("the kernels' video-to-global path ran")

    monkeypatch.setattr(joint, "_video_to_global_kernels", no_kernels)
    grid, tile, window, num_global = (2, 3, 5), (1, 2, 2), (1, 1, 2), 4
    q, k, v = (torch.randn(1, num_global + 30, 2, 16, device=device) for _ in range(3))
    key_mask = torch.tensor([[True, False, True, True]], device=device)
    joint_local_attention(q, k, v, grid, tile, window, num_global=num_global, global_key_mask=key_mask,
                          backend="triton")
    joint_local_attention(q, k, v, grid, tile, window, num_global=num_global, backend="torch")


def test_global_kernel_path_beyond_the_launch_grid_takes_the_fp32_block(monkeypatch):
    """More (chunk, head) program rows than CUDA's grid allows: the dense fp32 block serves the global part."""
    from fastvmt_kernels.local_attention import joint

    monkeypatch.setattr(joint, "MAX_GRID_Y", 19)  # 10 chunks x 2 heads = 20 rows per batch element
    q = torch.randn(1, 30, 2, 16)
    assert not joint._kernels_take_global_block(q, 3)
    assert joint._kernels_take_global_block(q[:, :27], 3)  # 9 chunks


def test_chunked_video_to_global_block_matches_one_chunk(device, monkeypatch):
    from fastvmt_kernels.local_attention import joint

    grid, tile, window, num_global = (2, 3, 5), (1, 2, 2), (1, 1, 2), 4
    q, k, v = (torch.randn(2, num_global + 30, 2, 16, device=device).requires_grad_() for _ in range(3))
    key_mask = torch.tensor([[True, False, True, True], [False, False, False, False]], device=device)

    def out_and_grads():
        out = joint_local_attention(q, k, v, grid, tile, window, num_global=num_global, global_key_mask=key_mask)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    whole = out_and_grads()
    monkeypatch.setattr(joint, "GLOBAL_QUERY_CHUNK", 7)  # ragged chunks: 7, 7, 7, 7, 2 of the 30 video queries
    for name, a, b in zip(("out", "dq", "dk", "dv"), out_and_grads(), whole):
        assert_rel_close(a, b, 1e-6, f"chunked {name}")


def test_fully_masked_global_keys_reduce_video_queries_to_local_attention(device):
    grid, tile, window, num_global = (2, 4, 4), (1, 2, 2), (1, 1, 1), 4
    q, k, v = (torch.randn(1, num_global + 32, 2, 16, device=device) for _ in range(3))
    out = joint_local_attention(
        q, k, v, grid, tile, window, num_global=num_global,
        global_key_mask=torch.zeros(1, num_global, dtype=torch.bool, device=device),
    )
    local = local_attention(q[:, num_global:], k[:, num_global:], v[:, num_global:], grid, tile, window)
    assert_rel_close(out[:, num_global:], local, 1e-6, "video queries")


def test_no_global_tokens_is_local_attention(device):
    grid, tile, window = (2, 3, 5), (1, 2, 2), (1, 1, 2)
    q, k, v = (torch.randn(2, 30, 1, 16, device=device) for _ in range(3))
    out = joint_local_attention(q, k, v, grid, tile, window, num_global=0)
    assert torch.equal(out, local_attention(q, k, v, grid, tile, window))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_scale(backend, device):
    grid, tile, window, num_global, scale = (2, 4, 6), (1, 2, 3), (1, 1, 1), 3, 0.7
    q, k, v = (torch.randn(1, num_global + 48, 2, 16, device=device).requires_grad_() for _ in range(3))
    out = joint_local_attention(q, k, v, grid, tile, window, num_global=num_global, scale=scale, backend=backend)
    mask = joint_mask(grid, tile, window, num_global, True, torch.ones(1, num_global, dtype=torch.bool))
    expected = dense_masked(q, k, v, mask, scale)
    assert_rel_close(out, expected, REL_TOL[torch.float32], "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for gname, g, e in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(expected, (q, k, v), dout.double())):
        assert_rel_close(g, e, 2 * REL_TOL[torch.float32], gname)


def test_window_covering_grid_equals_full_sdpa(device):
    grid, tile, window, num_global = (2, 3, 4), (1, 2, 2), (9, 9, 9), 5
    q, k, v = (torch.randn(1, num_global + 24, 2, 16, device=device) for _ in range(3))
    out = joint_local_attention(q, k, v, grid, tile, window, num_global=num_global, global_position="suffix")
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert_rel_close(out, dense, 1e-5, "full window")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_global=-1), "num_global must be an int in"),
        (dict(num_global=34), "num_global must be an int in"),
        (dict(num_global=2.0), "num_global must be an int in"),
        (dict(num_global=3), "video tokens"),
        (dict(num_global=2, global_position="middle"), "global_position must be one of"),
        (dict(num_global=2, global_key_mask=torch.ones(1, 2)), "bool tensor"),
        (dict(num_global=2, global_key_mask=torch.ones(2, 2, dtype=torch.bool)), r"shape \(B, num_global\)"),
        (dict(num_global=2, global_key_mask=torch.ones(1, 3, dtype=torch.bool)), r"shape \(B, num_global\)"),
    ],
)
def test_bad_input_says_what_is_accepted(kwargs, match):
    grid, tile, window = (2, 4, 4), (1, 2, 2), (1, 1, 1)
    q, k, v = (torch.randn(1, 34, 1, 16) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        joint_local_attention(q, k, v, grid, tile, window, **kwargs)


@pytest.mark.parametrize("masked", [True, False], ids=["key-mask-fp32-block", "no-mask-kernel-path"])
def test_traces_under_torch_compile_fullgraph(masked, device):
    """No graph break and the eager result: validation, LSE merge and SDPA for the global queries, with the global
    part as the fp32 block's chunk loop (a key mask) or on the kernels (no mask: batch loop, chunk views, expanded
    global keys, the padded last chunk)."""
    grid, tile, window = (1, 4, 4), (1, 4, 4), (1, 1, 1)  # one tile keeps the interpreter fast
    batch, num_global = (1, 3) if masked else (2, 5)  # 16 video queries: 3 whole chunks of 5 and a padded one
    q, k, v = (torch.randn(batch, num_global + 16, 1, 16, device=device).requires_grad_() for _ in range(3))
    key_mask = torch.tensor([[True, False, True]], device=device) if masked else None

    def attend(q, k, v):
        out = joint_local_attention(
            q, k, v, grid, tile, window, num_global=num_global, global_position="suffix" if masked else "prefix",
            global_key_mask=key_mask, backend="triton",
        )
        return (out * out).sum()

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref = attend(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v))
    assert_rel_close(loss, ref, 1e-6, "loss")
    for name, g, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(g, e, 1e-5, name)


def test_video_queries_stay_fp32_under_autocast():
    """The video queries' attention (local part and the global keys' part merged with it) computes in fp32 even
    inside an autocast region; the global queries' dense SDPA follows autocast like any attention of the model."""
    grid, tile, window, num_global = (2, 3, 4), (1, 2, 2), (1, 1, 1), 5
    q, k, v = (torch.randn(1, num_global + 24, 2, 16) for _ in range(3))
    kwargs = dict(num_global=num_global, backend="torch")
    plain = joint_local_attention(q, k, v, grid, tile, window, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = joint_local_attention(q, k, v, grid, tile, window, **kwargs)
    assert_rel_close(autocast[:, num_global:].float(), plain[:, num_global:], 1e-6, "video rows under autocast")
