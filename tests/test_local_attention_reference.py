"""The chunked PyTorch reference against an independent dense masked softmax and against SDPA."""
import pytest
import torch
import torch.nn.functional as F

from fastvmt_kernels import TileLayout, local_attention, local_attention_mask
from fastvmt_kernels.layout import window_start
from fastvmt_kernels.local_attention.reference import local_attention_reference

from _utils import assert_rel_close


def dense_masked(q, k, v, mask, scale):
    """Independent: one (B, H, L, L) fp64 map with the dense mask."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.double())


def test_mask_rule_matches_hand_computed_windows():
    # 1-D view: grid 7 tokens, tile 2 -> 4 tiles (last partial), window 3 tiles.
    mask = local_attention_mask((1, 1, 7), (1, 1, 2), (1, 1, 3))
    tiles = torch.arange(7) // 2
    start = {0: 0, 1: 0, 2: 1, 3: 1}  # clamp(c - 1, 0, 4 - 3)
    expected = torch.stack([(tiles >= start[int(c)]) & (tiles < start[int(c)] + 3) for c in tiles])
    assert torch.equal(mask, expected)


def test_even_window_reaches_one_tile_further_forward_than_back():
    # 1-D view: grid 8 tokens, tile 2 -> 4 tiles, window 2 tiles: s = clamp(c - (2 - 1) // 2, 0, 4 - 2) = c, then 2.
    mask = local_attention_mask((1, 1, 8), (1, 1, 2), (1, 1, 2))
    tiles = torch.arange(8) // 2
    start = {0: 0, 1: 1, 2: 2, 3: 2}
    expected = torch.stack([(tiles >= start[int(c)]) & (tiles < start[int(c)] + 2) for c in tiles])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize(
    "grid,tile,window",
    [((3, 5, 7), (1, 2, 3), (1, 3, 1)), ((4, 6, 5), (2, 4, 2), (3, 1, 2)), ((2, 3, 9), (1, 3, 4), (2, 2, 2))],
)
def test_reference_matches_dense_masked_softmax(grid, tile, window):
    b, h, d = 2, 3, 16
    seq = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(b, seq, h, d, requires_grad=True) for _ in range(3))
    mask = local_attention_mask(grid, tile, window)
    scale = d**-0.5
    out, lse = local_attention_reference(q, k, v, TileLayout.create(grid, tile, window), chunk_rows=7)
    expected = dense_masked(q, k, v, mask, scale)
    assert_rel_close(out, expected, 1e-5, "out")
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    assert_rel_close(lse, logits.masked_fill(~mask, float("-inf")).logsumexp(-1), 1e-6, "lse")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    grads_expected = torch.autograd.grad(expected, (q, k, v), go.double())
    for name, g, e in zip("qkv", grads, grads_expected):
        assert_rel_close(g, e, 1e-5, f"d{name}")


def test_window_covering_grid_is_dense_sdpa():
    grid, b, h, d = (2, 4, 6), 1, 2, 32
    seq = 48
    q, k, v = (torch.randn(b, seq, h, d) for _ in range(3))
    out = local_attention(q, k, v, grid, (1, 2, 2), (5, 9, 9), backend="torch")
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert_rel_close(out, expected, 1e-5, "out")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(2, 3, 4), tile=(1, 1, 1), window=(1, 1, 1), q_shape=(1, 25, 2, 16)), "has 24 tokens but q has L = 25"),
        (dict(grid=(2, 3, 4), tile=(0, 1, 1), window=(1, 1, 1)), "every entry of tile must be >= 1"),
        (dict(grid=(2, 3, 4), tile=(1, 1, 1), window=(1, 1)), "window must be 3 ints"),
        (dict(grid=(2, 3, 4), tile=(1, 1, 1), window=(1, 1, 1), q_shape=(24, 2, 16)), "q must have 4 dims"),
        (dict(grid=(2, 3, 4), tile=(1, 1, 1), window=(1, 1, 1), k_dtype=torch.float16), "must share one dtype"),
        (dict(grid=(2, 3, 4), tile=(1, 1, 1), window=(1, 1, 1), backend="cuda"), "backend must be one of"),
        (dict(grid=(2, 3, 4), tile=(1, 1, 1), window=(1, 1, 1), scale=True), "scale must be a positive finite"),
        (dict(grid=(2, 3, 4), tile=(1, 1, 1), window=(1, 1, 1), scale=float("inf")), "scale must be a positive finite"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    q_shape = kwargs.pop("q_shape", (1, 24, 2, 16))
    k_dtype = kwargs.pop("k_dtype", torch.float32)
    q = torch.randn(q_shape)
    k = torch.randn(q_shape, dtype=k_dtype)
    v = torch.randn(q_shape)
    with pytest.raises(ValueError, match=match):
        local_attention(q, k, v, **kwargs)


def test_reference_math_stays_fp32_under_autocast():
    """The chunked reference computes in fp32 even inside an autocast region (whose einsums would run in bf16)."""
    q, k, v = (torch.randn(1, 24, 2, 16) for _ in range(3))
    plain, plain_lse = local_attention(q, k, v, (2, 3, 4), (1, 2, 2), (1, 1, 1), backend="torch", return_lse=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = local_attention(q, k, v, (2, 3, 4), (1, 2, 2), (1, 1, 1), backend="torch", return_lse=True)
    assert_rel_close(out, plain, 1e-6, "out under autocast")  # was 8e-3 off
    assert_rel_close(lse, plain_lse, 1e-6, "lse under autocast")


@pytest.mark.parametrize("shape", [(0, 24, 2, 16), (1, 24, 0, 16)])
def test_empty_batch_or_no_heads_gives_empty_outputs(shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    out, lse = local_attention(q, k, v, (2, 3, 4), (1, 2, 2), (1, 1, 1), backend="torch", return_lse=True)
    assert out.shape == shape and lse.shape == (shape[0], shape[2], 24)  # was a ZeroDivisionError


def test_density_equals_the_mask_fraction_on_a_ragged_grid():
    grid, tile, window = (5, 7, 9), (2, 3, 2), (2, 1, 3)
    exact = local_attention_mask(grid, tile, window).double().mean().item()
    assert TileLayout.create(grid, tile, window).density() == pytest.approx(exact)


def test_window_start_int_and_tensor_paths_agree():
    for n in range(1, 7):
        for window in range(1, 9):
            tensor = window_start(torch.arange(n), n, window).tolist()
            assert [window_start(c, n, window) for c in range(n)] == tensor, (n, window)


def _frame_block_causal_local_mask(grid, tile, window, causal_frames):
    """Independent mask of the block-causal time rule: SkyReels-V2's frame-block causal mask (a key's block of
    ``causal_frames`` frames <= the query's) and the last ``window[0]`` time tiles up to the end of the query's
    block, with the plain local rule in height and width (time window covering every frame)."""
    frames = torch.arange(grid[0]).repeat_interleave(grid[1] * grid[2])  # frame of each raster token
    n_t = -(-grid[0] // tile[0])
    block_end_tile = torch.clamp((frames // causal_frames + 1) * (causal_frames // tile[0]), max=n_t)
    key_tile = frames // tile[0]
    causal = (frames[None, :] // causal_frames) <= (frames[:, None] // causal_frames)
    recent = (block_end_tile[:, None] - 1 - key_tile[None, :]) < window[0]
    spatial = local_attention_mask(grid, tile, (n_t, window[1], window[2]))
    return causal & recent & spatial


# (grid, tile, window, causal_frames): frame blocks of 1 or 2 tiles; a ragged last tile and block; a window of
# exactly one block; one covering every frame (= SkyReels-V2's causal mask with the spatial window).
CAUSAL_CASES = [
    ((7, 3, 5), (1, 2, 2), (3, 1, 2), 1),
    ((7, 3, 5), (2, 2, 3), (3, 2, 1), 4),
    ((6, 2, 4), (1, 2, 2), (2, 1, 1), 2),
    ((5, 2, 3), (1, 1, 3), (9, 2, 1), 2),
]


@pytest.mark.parametrize("grid,tile,window,causal_frames", CAUSAL_CASES)
def test_block_causal_time_rule_matches_the_frame_block_causal_mask(grid, tile, window, causal_frames):
    mask = local_attention_mask(grid, tile, window, causal_frames=causal_frames)
    assert torch.equal(mask, _frame_block_causal_local_mask(grid, tile, window, causal_frames))
    layout = TileLayout.create(grid, tile, window, causal_frames)
    assert layout.density() == pytest.approx(mask.double().mean().item())


@pytest.mark.parametrize("grid,tile,window,causal_frames", CAUSAL_CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_block_causal_local_attention_matches_dense_masked_softmax(grid, tile, window, causal_frames, backend, device):
    """Forward and gradients of both backends (triton in the interpreter on CPU) against an fp64 dense softmax under
    the independent mask."""
    torch.manual_seed(7)
    seq = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, seq, 2, 16, device=device, requires_grad=True) for _ in range(3))
    out = local_attention(q, k, v, grid, tile, window, causal_frames=causal_frames, backend=backend)
    mask = _frame_block_causal_local_mask(grid, tile, window, causal_frames).to(device)
    want = dense_masked(q, k, v, mask, 0.25)
    assert_rel_close(out, want, 1e-5, "out")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    expected = torch.autograd.grad(want, (q, k, v), dout.double())
    for name, g, e in zip("qkv", got, expected):
        assert_rel_close(g, e, 2e-5, f"d{name}")


@pytest.mark.parametrize(
    "causal_frames,match",
    [(3, r"multiple of the tile's frames tile\[0\] = 2"), (8, r"window\[0\] must cover a causal block, >= .* = 4"),
     (-1, "causal_frames must be an int >= 0"), (True, "causal_frames must be an int >= 0")],
)
def test_bad_causal_frames_raise_clear_errors(causal_frames, match):
    q = torch.randn(1, 8 * 4, 1, 16)
    with pytest.raises(ValueError, match=match):
        local_attention(q, q, q, (8, 2, 2), (2, 2, 2), (3, 1, 1), causal_frames=causal_frames)
