"""Inputs shared by the kernel backends' tests: one tensor per layout the backends view differently,
the fused activations, and non-trivial per-channel parameters."""

import torch

LAYOUTS = {
    "nc": ((64, 5), torch.contiguous_format),
    "ncl": ((6, 5, 33), torch.contiguous_format),
    "nchw": ((4, 5, 6, 7), torch.contiguous_format),
    "nhwc": ((4, 5, 6, 7), torch.channels_last),
    "ncdhw": ((2, 3, 4, 5, 6), torch.contiguous_format),
    "ndhwc": ((2, 3, 4, 5, 6), torch.channels_last_3d),
    "rank6": ((2, 3, 2, 3, 2, 3), torch.contiguous_format),
    "nc11": ((9, 4, 1, 1), torch.channels_last),
}
ACT_CASES = [
    ("identity", 0.0),
    ("relu", 0.0),
    ("leaky_relu", 0.1),
    ("elu", 0.7),
    ("silu", 0.0),
    ("hardswish", 0.0),
    ("hardsigmoid", 0.0),
    ("gelu", 0.0),
    ("gelu_tanh", 0.0),
]


def make(name, dtype=torch.float64, seed=0, loc=1.0, device="cpu"):
    """A 2 * N(0, 1) + loc tensor of layout ``name``."""
    shape, fmt = LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + loc
    return x.to(device, dtype).contiguous(memory_format=fmt)


def params(c, dtype, device="cpu"):
    """(weight, bias, running_mean, running_var), each (c,) and different per channel."""

    def line(lo, hi):
        return torch.linspace(lo, hi, c, dtype=dtype, device=device)

    return line(0.5, 1.5), line(-1, 1), line(-0.5, 0.5), line(0.5, 2.0)


def assert_results_close(ours, theirs, tol):
    """Two backends' result tuples agree: same Nones, same dtypes, values within ``tol``."""
    for a, b in zip(ours, theirs, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol)
