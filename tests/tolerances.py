"""Shared test helpers. One tolerance table for every comparison: (atol, rtol) for outputs and for gradients, per dtype.

bfloat16 keeps 8 bits of mantissa: bnlab and torch.nn both compute in float32 and round once, so
they may differ by a couple of bfloat16 ulps (2 * 2^-8 relative) where their float32 results straddle
a rounding boundary.
"""

import torch

FORWARD = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
GRADIENT = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (4e-2, 4e-2),
}


def assert_close(actual, expected, dtype, table=FORWARD, msg=None):
    atol, rtol = table[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg, check_dtype=True)


def run(module, x, grad_out):
    """(output, dx, [dweight, dbias]) of one forward + backward of ``module`` on a copy of x."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    out = module(x)
    out.backward(grad_out)
    grads = [p.grad.clone() for p in (module.weight, module.bias) if p is not None]
    module.zero_grad()
    return out, x.grad, grads


def to_numpy(t):
    """A float64 NumPy copy (never a view of a buffer that later steps update)."""
    return None if t is None else t.detach().double().numpy().copy()
