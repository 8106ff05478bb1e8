"""Randomized comparison of bnlab's batch-norm modules and torch.nn's against the float64 truth
(Hypothesis): shapes, layouts, dtypes, options and backends drawn together, every result within
the derived bounds of tests/tolerances.py.

CI runs the "ci" profile (derandomized: the same examples every run); a failure prints the example
and a ``@reproduce_failure`` blob. A longer local run: ``HYPOTHESIS_PROFILE=long pytest
tests/nn/test_batchnorm_properties.py`` (see tests/conftest.py).
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

import bnlab
from tolerances import check_module_step

MAX_NUMEL = 6000  # keeps Triton's CPU interpreter, which runs each example too, quick
TORCH_CLASS = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}
BNLAB_CLASS = {
    2: bnlab.nn.BatchNorm1d,
    3: bnlab.nn.BatchNorm1d,
    4: bnlab.nn.BatchNorm2d,
    5: bnlab.nn.BatchNorm3d,
}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
TORCH_COMPUTE_DTYPE = {torch.bfloat16: torch.float32}  # see test_batchnorm.py


@st.composite
def shapes(draw):
    """(N, C, *spatial): 0-3 spatial dims of 1..37, N >= 2 or N >= 1 with more than one position,
    at most MAX_NUMEL values."""
    c = draw(st.integers(1, 8))
    spatial = []
    for _ in range(draw(st.integers(0, 3))):
        room = MAX_NUMEL // (2 * c * math.prod(spatial))
        spatial.append(draw(st.integers(1, max(1, min(37, room)))))
    positions = math.prod(spatial)
    smallest_n = 2 if positions == 1 else 1
    n = draw(st.integers(smallest_n, max(smallest_n, min(16, MAX_NUMEL // (c * positions)))))
    return (n, c, *spatial)


def make_input(draw, shape, layout, dtype, scale):
    """2 * N(0, 1) * scale + loc, in the layout asked for; "strided" is every other example of a
    batch twice as large (a view no kernel can read as dense)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    loc = draw(st.sampled_from([0.0, 1.0, -3.0]))
    big = (2 * shape[0], *shape[1:]) if layout == "strided" else shape
    x = (torch.randn(big, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=CHANNELS_LAST[len(shape)])
    return x[::2] if layout == "strided" else x


@st.composite
def cases(draw):
    shape = draw(shapes())
    layouts = ["contiguous", "strided"] + (["channels_last"] if len(shape) in CHANNELS_LAST else [])
    return dict(
        shape=shape,
        layout=draw(st.sampled_from(layouts)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, None, 1.0])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        modes=draw(st.lists(st.sampled_from(["train", "eval"]), min_size=2, max_size=2)),
        scale=draw(st.sampled_from([1.0, 2.0, 30.0])),
    )


def backends_for(x, triton: bool):
    """None (automatic) and every registered backend that can run x by name; or Triton alone."""
    names = [] if triton else [None]
    for name in bnlab.kernels.available_backends():
        if (name == "gpu") == triton and bnlab.kernels.get_backend(name).supports("batch_norm", x):
            names.append(name)
    return names


def make_pair(case, backend):
    shape, dtype = case["shape"], case["dtype"]
    c = shape[1]
    kwargs = dict(
        eps=case["eps"],
        momentum=case["momentum"],
        affine=case["affine"],
        track_running_stats=case["track"],
        dtype=dtype,
    )
    ours = BNLAB_CLASS[len(shape)](c, **kwargs, backend=backend)
    theirs = TORCH_CLASS[len(shape)](c, **kwargs)
    g = torch.Generator().manual_seed(c)
    with torch.no_grad():
        if case["affine"]:
            theirs.weight.copy_(torch.rand(c, generator=g) * 2 - 0.5)
            theirs.bias.copy_(torch.randn(c, generator=g))
        if case["track"]:
            theirs.running_mean.copy_(torch.randn(c, generator=g))
            theirs.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            theirs.num_batches_tracked.fill_(3)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs.to(TORCH_COMPUTE_DTYPE.get(dtype, dtype))


def check_case(case, data, triton):
    torch_dtype = TORCH_COMPUTE_DTYPE.get(case["dtype"], case["dtype"])
    steps = [
        (
            mode,
            make_input(data.draw, case["shape"], case["layout"], case["dtype"], case["scale"]),
            make_input(data.draw, case["shape"], case["layout"], case["dtype"], 1.0),
        )
        for mode in case["modes"]
    ]
    for backend in backends_for(steps[0][1], triton):
        note(f"backend={backend!r}")
        ours, theirs = make_pair(case, backend)
        for i, (mode, x, dy) in enumerate(steps):
            ours.train(mode == "train"), theirs.train(mode == "train")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the Triton interpreter's invalid-value warnings
                check_module_step(ours, x, dy, label=f"bnlab[{backend}] step {i} ({mode}): ")
            check_module_step(
                theirs, x.to(torch_dtype), dy.to(torch_dtype), label=f"torch.nn step {i} ({mode}): "
            )
        if case["track"]:
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@given(case=cases(), data=st.data())
def test_modules_match_torch_nn_and_the_truth(case, data):
    check_case(case, data, triton=False)


# Without a GPU Triton runs in its interpreter, ~50x slower than the CPU backends together: a
# tenth of the examples (its kernels' layout x activation x dtype grid is in test_contract.py)
@settings(max_examples=max(10, settings.default.max_examples // 10))
@given(case=cases(), data=st.data())
def test_triton_matches_torch_nn_and_the_truth(case, data):
    if "gpu" not in bnlab.kernels.available_backends():
        pytest.skip("Triton is not installed")
    check_case(case, data, triton=True)
