"""Motion losses: hand-computed cases, gradients, and optimisation behaviour (torch backend, tiny shapes)."""
import math

import pytest
import torch

from _utils import assert_rel_close
from fastvmt.losses import (
    amf_loss,
    amf_pair_weights,
    corresponding_window_loss,
    ditflow_flow,
    ditflow_loss,
)
from fastvmt import MotionTransferConfig
from fastvmt.motion import compute_flow, motion_loss
from fastvmt_kernels import motion_flow
from fastvmt_kernels.motion_flow import make_pairs


def test_pair_weights_linear_from_one_to_min_weight():
    pairs = torch.tensor([[0, 0], [0, 1], [0, 2], [0, 3], [5, 6]])
    expected = torch.tensor([1.0, 1 - 0.2 / 3, 1 - 0.4 / 3, 0.8, 1 - 0.2 / 3])
    assert torch.allclose(amf_pair_weights(pairs, 4), expected)
    assert torch.equal(amf_pair_weights(pairs[:1], 1), torch.ones(1))
    with pytest.raises(ValueError, match="0 <= j - i < span"):
        amf_pair_weights(pairs, 2)


def test_amf_loss_hand_computed():
    pairs = torch.tensor([[0, 0], [0, 1]])
    ref = torch.zeros(2, 2, 3, 2)
    gen = torch.zeros(2, 2, 3, 2)
    gen[0, 0, 0] = torch.tensor([1.0, 2.0])  # batch 0, self pair: 1 + 4 = 5, weight 1
    gen[1, 1, 2] = torch.tensor([0.0, 3.0])  # batch 1, pair (0, 1): 9, weight 0.8 (span 2)
    # per (batch, pair): [[5, 0], [0, 7.2]] -> mean 12.2 / 4
    assert math.isclose(amf_loss(gen, ref, pairs, 2).item(), 12.2 / 4, rel_tol=1e-6)
    with pytest.raises(ValueError, match="pairs must be"):
        amf_loss(gen, ref, pairs[:1], 2)


def test_corresponding_window_loss_hand_computed_and_gradient_reaches_selected_keys_only():
    frame, window = (2, 3), 2  # windows of 2 x 2 keys
    k = torch.randn(1, 3, 6, 4, requires_grad=True)
    pairs = make_pairs(3, 3)  # (0,0) (0,1) (0,2) (1,1) (1,2) (2,2); only frame 0 has two targets
    windows = torch.zeros(1, 6, 2, 2, dtype=torch.int64)  # two tiles per frame
    windows[0, 1] = torch.tensor([[0, 0], [0, 1]])  # pair (0, 1)
    windows[0, 2] = torch.tensor([[0, 1], [0, 0]])  # pair (0, 2)
    frames = k.reshape(1, 3, 2, 3, 4)

    def mean_key(j, ox):
        return frames[0, j, :, ox : ox + 2].reshape(-1, 4).mean(0)

    tile0 = (mean_key(2, 1) - mean_key(1, 0)).square().sum()
    tile1 = (mean_key(2, 0) - mean_key(1, 1)).square().sum()
    expected = 0.5 * (tile0 + tile1)
    loss = corresponding_window_loss(k, windows, pairs, frame, window)
    assert_rel_close(loss, expected, 1e-6, "window loss")
    loss.backward()
    assert k.grad[0, 0].abs().sum() == 0  # frame 0 is never a target (j > i)
    assert k.grad[0, 1].abs().sum() > 0 and k.grad[0, 2].abs().sum() > 0


def naive_window_loss(k, windows, pairs, frame, window):
    """Independent loop version of the corresponding-window loss: per frame i with >= 2 targets, per sample, per
    tile, the mean over successive targets of the squared distance between the window-mean keys."""
    b, f, _, d = k.shape
    (hf, wf), (wy, wx) = frame, window
    ly, lx = min(wy, hf), min(wx, wf)
    frames = k.reshape(b, f, hf, wf, d)
    per_frame = []
    for i in range(f):
        rows = sorted((r for r in range(len(pairs)) if pairs[r, 0] == i and pairs[r, 1] > i), key=lambda r: pairs[r, 1])
        if len(rows) < 2:
            continue
        per_sample = []
        for s in range(b):
            per_tile = []
            for tile in range(windows.shape[2]):
                means = []
                for r in rows:
                    oy, ox = windows[s, r, tile].tolist()
                    means.append(frames[s, int(pairs[r, 1]), oy : oy + ly, ox : ox + lx].reshape(-1, d).mean(0))
                steps = [(means[t + 1] - means[t]).square().sum() for t in range(len(means) - 1)]
                per_tile.append(torch.stack(steps).mean())
            per_sample.append(torch.stack(per_tile).mean())
        per_frame.append(torch.stack(per_sample))
    return torch.stack(per_frame, dim=1).mean()


def test_corresponding_window_loss_matches_naive_loop_in_any_pair_order():
    """A non-square window, frames with three and two targets (means over steps and over frames), two samples; a
    shuffled pair order (frame 0's targets listed 2, 1, 3) gives the same loss."""
    frame, window, num_tiles = (4, 5), (2, 3), 3
    k = torch.randn(2, 4, 20, 3, requires_grad=True)
    pairs = make_pairs(4, 4)  # frame 0: targets 1, 2, 3; frame 1: 2, 3; frame 2: 3
    origins = (torch.randint(0, 3, (2, len(pairs), num_tiles)), torch.randint(0, 3, (2, len(pairs), num_tiles)))
    windows = torch.stack(origins, dim=-1)  # y in [0, 4 - 2], x in [0, 5 - 3]
    loss = corresponding_window_loss(k, windows, pairs, frame, window)
    expected = naive_window_loss(k, windows, pairs, frame, window)
    assert_rel_close(loss, expected, 1e-6, "window loss")
    assert_rel_close(torch.autograd.grad(loss, k)[0], torch.autograd.grad(expected, k)[0], 1e-6, "dk")
    order = torch.tensor([2, 1, 3, 0, 4, 6, 5, 7, 8, 9])
    assert pairs[order][:3, 1].tolist() == [2, 1, 3]
    shuffled = corresponding_window_loss(k, windows[:, order], pairs[order], frame, window)
    assert_rel_close(shuffled, loss, 1e-6, "shuffled pairs")


@pytest.mark.parametrize("loss_name", ["amf", "ditflow"])
def test_reference_flow_is_a_target_without_gradient(loss_name):
    gen = torch.randn(2, 3, 5, 2, requires_grad=True)
    ref = torch.randn(2, 3, 5, 2, requires_grad=True)
    loss = amf_loss(gen, ref, make_pairs(2, 2), 2) if loss_name == "amf" else ditflow_loss(gen, ref)
    loss.backward()
    assert ref.grad is None
    assert gen.grad is not None and gen.grad.abs().sum() > 0


def test_corresponding_window_loss_with_kernel_windows_per_head():
    q, k = torch.randn(2, 4, 20, 2, 8), torch.randn(2, 4, 20, 2, 8, requires_grad=True)
    kwargs = dict(tile=(2, 2), window=3, span=3, backend="torch", return_windows=True)
    _, pairs, windows = motion_flow(q, k, (4, 5), head_reduce="mean_flow", **kwargs)
    loss = corresponding_window_loss(k, windows, pairs, (4, 5), 3)
    per_head = [corresponding_window_loss(k[:, :, :, h], windows[:, :, h], pairs, (4, 5), 3) for h in range(2)]
    assert_rel_close(loss, torch.stack(per_head).mean(), 1e-6, "per-head window loss")
    short = corresponding_window_loss(k[:, :, :, 0], windows[:, :2, 0], pairs[:2], (4, 5), 3)
    assert short.item() == 0.0  # pairs (0,0), (0,1): no frame with two targets


def test_mean_logits_window_keys_average_the_per_head_window_loss():
    """With shared windows, the window loss on window_loss_keys(k, "mean_logits") (the heads' channels concatenated,
    / sqrt(H)) is the mean over heads of each head's window loss: the "mean_flow" scale."""
    from fastvmt.motion import window_loss_keys

    heads = 3
    q, k = torch.randn(2, 4, 20, heads, 8), torch.randn(2, 4, 20, heads, 8)
    kwargs = dict(tile=(2, 2), window=3, span=3, backend="torch", return_windows=True, head_reduce="mean_logits")
    _, pairs, windows = motion_flow(q, k, (4, 5), **kwargs)
    keys = window_loss_keys(k, "mean_logits")
    assert keys.shape == (2, 4, 20, heads * 8)
    loss = corresponding_window_loss(keys, windows, pairs, (4, 5), 3)
    per_head = [corresponding_window_loss(k[:, :, :, h], windows, pairs, (4, 5), 3) for h in range(heads)]
    assert_rel_close(loss, torch.stack(per_head).mean(), 1e-6, "mean_logits window loss")
    assert torch.equal(window_loss_keys(k, "mean_qk"), k.mean(3)) and window_loss_keys(k, "mean_flow") is k


def test_ditflow_recipe_flow_is_ditflows_code():
    """The ditflow recipe's flows follow DiTFlow's compute_motion_flow: per-head logits q_h.k_h / sqrt(D) averaged
    over heads, times the temperature, softmax over frame j; soft-argmax for the generated video and the arg-max
    key for the reference; all ordered pairs."""
    from fastvmt.config import MotionTransferConfig
    from fastvmt.motion import compute_flow

    frame, f, heads, dim = (3, 4), 3, 4, 8
    q, k = torch.randn(1, f, 12, heads, dim), torch.randn(1, f, 12, heads, dim)
    config = MotionTransferConfig(recipe="ditflow")
    soft = compute_flow(q, k, frame, config, reference=False)
    hard = compute_flow(q, k, frame, config, reference=True)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    logits = torch.stack([torch.einsum("shd,thd->hst", q[0, i], k[0, j]).mean(0) / math.sqrt(dim)
                          for i in range(f) for j in range(f)])
    assert soft.pairs.tolist() == [[i, j] for i in range(f) for j in range(f)]
    assert_rel_close(soft.flow[0], torch.softmax(config.temperature * logits, -1) @ pos - pos, 1e-5, "soft")
    assert torch.equal(hard.flow[0], pos[logits.argmax(-1)] - pos)


def test_ditflow_flow_all_ordered_pairs_soft_and_hard():
    frame, f, dim = (3, 4), 3, 16
    q, k = torch.randn(1, f, 12, dim), torch.randn(1, f, 12, dim)
    flow, pairs = ditflow_flow(q, k, frame, temperature=2.0, backend="torch")
    assert pairs.tolist() == [[i, j] for i in range(f) for j in range(f)]
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    logits = torch.einsum("psd,ptd->pst", q[0, pairs[:, 0]], k[0, pairs[:, 1]]) * 2.0 / math.sqrt(dim)
    assert_rel_close(flow[0], torch.softmax(logits, -1) @ pos - pos, 1e-5, "soft global flow")
    hard, _ = ditflow_flow(q, k, frame, hard=True)
    assert torch.equal(hard[0], pos[logits.argmax(-1)] - pos)


def test_ditflow_flow_computes_each_ordered_pair_once(monkeypatch):
    """F^2 pairs in all (the time-reversed call used to recompute the F self pairs and drop them), for F = 1 too."""
    import fastvmt.losses as losses_module

    computed = []

    def counting(q, k, *args, **kwargs):
        flow, pairs = motion_flow(q, k, *args, **kwargs)
        computed.append(pairs.shape[0])
        return flow, pairs

    monkeypatch.setattr(losses_module, "motion_flow", counting)
    for f in (1, 4):
        computed.clear()
        q, k = torch.randn(2, f, 12, 16), torch.randn(2, f, 12, 16)
        flow, pairs = ditflow_flow(q, k, (3, 4), backend="torch")
        assert sum(computed) == f * f == pairs.shape[0] and flow.shape == (2, f * f, 12, 2)


def test_ditflow_loss_masks_tokens_whose_reference_does_not_move():
    """DiTFlow's threshloss keeps the tokens with norm(ref) > 0 and averages both components: a token moving only
    sideways keeps its vertical error (the mask was per component before); a still token drops out."""
    ref = torch.tensor([[[[0.0, 2.0], [0.0, 0.0], [1.0, 0.0]]]])
    gen = torch.tensor([[[[5.0, 1.0], [9.0, 9.0], [3.0, 7.0]]]], requires_grad=True)
    loss = ditflow_loss(gen, ref)
    assert math.isclose(loss.item(), (25.0 + 1.0 + 4.0 + 49.0) / 4)
    loss.backward()
    assert gen.grad[0, 0, 0, 0] != 0 and gen.grad[0, 0, 2, 1] != 0  # the zero components of moving tokens count
    assert (gen.grad[0, 0, 1] == 0).all()  # the still token does not
    assert ditflow_loss(gen, torch.zeros_like(ref)).item() == 0.0


@pytest.mark.parametrize("loss_name", ["amf", "ditflow"])
def test_losses_decrease_under_gradient_descent(loss_name):
    frame, f = (4, 5), 3
    q_ref, k_ref = torch.randn(1, f, 20, 16), torch.randn(1, f, 20, 16)
    q = torch.randn(1, f, 20, 16, requires_grad=True)
    k = torch.randn(1, f, 20, 16, requires_grad=True)
    if loss_name == "amf":
        kwargs = dict(tile=(2, 2), window=3, span=2, backend="torch")
        ref, pairs = motion_flow(q_ref, k_ref, frame, **kwargs)
        objective = lambda: amf_loss(motion_flow(q, k, frame, **kwargs)[0], ref, pairs, 2)  # noqa: E731
    else:
        ref, _ = ditflow_flow(q_ref, k_ref, frame, hard=True)
        objective = lambda: ditflow_loss(ditflow_flow(q, k, frame, backend="torch")[0], ref)  # noqa: E731
    opt = torch.optim.Adam([q, k], lr=0.05)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = objective()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_ditflow_flow_triton_backend_matches_torch(device):
    q = torch.randn(1, 3, 12, 16, device=device, requires_grad=True)
    k = torch.randn(1, 3, 12, 16, device=device, requires_grad=True)
    flows = {backend: ditflow_flow(q, k, (3, 4), backend=backend)[0] for backend in ("torch", "triton")}
    assert_rel_close(flows["triton"], flows["torch"], 1e-5, "flow")
    grads = {b: torch.autograd.grad(f.square().sum(), (q, k)) for b, f in flows.items()}
    for name, got, want in zip(("dq", "dk"), grads["triton"], grads["torch"]):
        assert_rel_close(got, want, 1e-5, name)


def test_motion_loss_weights_its_terms():
    """The motion loss is amf_weight * AMF loss + window_weight * window loss."""
    torch.manual_seed(0)
    config = MotionTransferConfig(span=3, tile=(2, 2), window=3, kernel_backend="torch", amf_weight=2.0,
                                  window_weight=3.0)
    shape = (1, 3, 16, 2, 8)
    gen = compute_flow(torch.randn(shape), torch.randn(shape), (4, 4), config, reference=False)
    ref = compute_flow(torch.randn(shape), torch.randn(shape), (4, 4), config, reference=True)
    total, parts = motion_loss(gen, ref, (4, 4), config)
    assert parts["amf"] > 0 and parts["window"] > 0
    assert float(total) == pytest.approx(2.0 * parts["amf"] + 3.0 * parts["window"], rel=1e-5)
