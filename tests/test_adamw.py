"""Fused AdamW step (Triton under the interpreter, and the torch path) vs torch.optim.AdamW, step by step."""
import pytest
import torch

from _utils import assert_rel_close
from fastvmt_kernels import fused_adamw_step

STEPS = 5
# Shapes: smaller than one block, ragged over several blocks, and a latent-like 5-D tensor.
SHAPES = [(7,), (3, 1029), (1, 4, 3, 5, 7)]


def _run_torch_optim(param0, grads, lrs, weight_decay):
    param = param0.clone().requires_grad_()
    opt = torch.optim.AdamW([param], lr=lrs[0], weight_decay=weight_decay)
    history = []
    for grad, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        param.grad = grad.float().clone()
        opt.step()
        history.append(param.detach().clone())
    state = opt.state[param]
    return history, state["exp_avg"], state["exp_avg_sq"]


# fp32 parameters of magnitude ~1 carry updates of ~lr = 3e-3: one ulp of the parameter (1.2e-7) is already 4e-5 of
# the update, and a GPU kernel's operation order (reciprocal-multiply vs divide, FMA) differs from torch's by an ulp
# or two. So the update is compared at ULP_SLACK ulps of the parameter, and the parameters and moments at fp32
# rounding level.
ULP_SLACK = 4


def assert_params_close(param, expected, param0, name, steps=1):
    """``param`` equals ``expected`` to ULP_SLACK ulps per step taken (rounding differences accumulate in the
    parameter), elementwise, and its update ``param - param0`` to 1e-3 relative."""
    # An ulp of the operands of the last subtraction (param0 and the update), and of the results.
    scale = torch.stack([param.abs(), expected.abs(), param0.abs(), (expected - param0).abs()]).amax(0)
    ulp = torch.finfo(torch.float32).eps * scale
    excess = ((param - expected).abs() - ULP_SLACK * steps * ulp).max().item()
    assert excess <= 0, f"{name}: parameters differ by more than {ULP_SLACK * steps} ulps (excess {excess:.3e})"
    assert_rel_close(param - param0, expected - param0, 1e-3, f"update {name}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_torch_adamw_with_reused_gradient_and_decaying_lr(device, shape, backend):
    param0 = torch.randn(shape, device=device)
    fresh = torch.randn(shape, device=device)
    cached = torch.randn(shape, device=device)
    grads = [fresh, cached, cached, cached, fresh * 0.5]  # a gradient computed once, reused for 3 steps
    lrs = [0.003 - 0.0002 * s for s in range(STEPS)]
    expected, exp_avg_ref, exp_avg_sq_ref = _run_torch_optim(param0, grads, lrs, weight_decay=0.01)
    param, exp_avg, exp_avg_sq = param0.clone(), torch.zeros_like(param0), torch.zeros_like(param0)
    for step, (grad, lr) in enumerate(zip(grads, lrs), start=1):
        fused_adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, weight_decay=0.01, backend=backend)
        assert_params_close(param, expected[step - 1], param0, f"after step {step}", steps=step)
    assert torch.equal(grads[1], cached)  # the cached gradient is read, never written
    assert_rel_close(exp_avg, exp_avg_ref, 1e-6, "exp_avg")
    assert_rel_close(exp_avg_sq, exp_avg_sq_ref, 1e-6, "exp_avg_sq")


def test_bf16_gradient_is_upcast(device):
    param0 = torch.randn(300, device=device)
    grad = torch.randn(300, device=device).to(torch.bfloat16)
    expected, _, _ = _run_torch_optim(param0, [grad.float()], [0.01], weight_decay=0.0)
    param, m, v = param0.clone(), torch.zeros_like(param0), torch.zeros_like(param0)
    fused_adamw_step(param, grad, m, v, 1, lr=0.01, weight_decay=0.0, backend="triton")
    assert_params_close(param, expected[0], param0, "bf16-grad update")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_parameter_that_requires_grad_is_updated_and_its_version_bumped(backend, device):
    """An nn.Parameter (a leaf that requires grad) steps like torch.optim.AdamW on both backends (the torch path
    raised "a leaf Variable that requires grad is being used in an in-place operation"), and the in-place update
    bumps its version counter, so a graph that saved it before the step cannot silently use the new values."""
    if backend == "torch":
        device = torch.device("cpu")
    param0 = torch.randn(300, device=device)
    grad = torch.randn(300, device=device)
    expected, _, _ = _run_torch_optim(param0, [grad], [0.01], weight_decay=0.01)
    param = torch.nn.Parameter(param0.clone())
    version = param._version
    fused_adamw_step(param, grad, torch.zeros_like(param0), torch.zeros_like(param0), 1, lr=0.01, backend=backend)
    assert param._version > version
    assert_params_close(param.detach(), expected[0], param0, f"{backend} update of a Parameter")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(step=0), "step must be an int >= 1"),
        (dict(param=torch.zeros(4, dtype=torch.bfloat16)), "param has dtype torch.bfloat16"),
        (dict(grad=torch.zeros(5)), "grad has shape"),
        (dict(grad=torch.zeros(4, dtype=torch.float16)), "grad has dtype torch.float16"),
        (dict(exp_avg=torch.zeros(8)[::2]), "exp_avg must be contiguous"),
        (dict(beta2=1.0), "beta2 must be in"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_inputs_raise(change, match):
    args = dict(param=torch.zeros(4), grad=torch.zeros(4), exp_avg=torch.zeros(4), exp_avg_sq=torch.zeros(4), step=1)
    args.update(change)
    positional = [args.pop(n) for n in ("param", "grad", "exp_avg", "exp_avg_sq", "step")]
    with pytest.raises(ValueError, match=match):
        fused_adamw_step(*positional, lr=0.001, **args)
