"""bnlab.concat: batch norm of concatenated features from one shared buffer (DenseNet's layers)."""

import pytest
import torch
import torch.nn.functional as TF

import bnlab
from bnlab import concat
from bnlab.concat import batch_norm_concat_act
from tolerances import assert_step_within, batch_norm_bounds

pytestmark = pytest.mark.usefixtures("concat_at_any_size")  # small chunks take the buffer too

ACTS = {"identity": lambda z, p: z, "relu": lambda z, p: TF.relu(z), "leaky_relu": TF.leaky_relu}


def chunked(widths, spatial=(5, 7), n=4, dtype=torch.float64, seed=0, channels_last=False):
    """Chunks (n, w, *spatial) of values with a per-channel offset, as leaves (``channels_last``:
    in that layout, channels_last_3d for 5-D)."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.contiguous_format
    if channels_last:
        layout = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    return [
        (torch.randn(n, w, *spatial, generator=g, dtype=torch.float64) * 2 + 3)
        .to(dtype, memory_format=layout)
        .requires_grad_()
        for w in widths
    ]


def vectors(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5) * torch.tensor([1.0, -1.0]).repeat(
        c
    )[:c]
    b, rm = torch.randn(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g)
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return [t.to(dtype) for t in (w, b, rm, rv)]


def step(chunks, dy, w, b, rm, rv, training, activation, param, **kwargs):
    """Forward + backward of batch_norm_concat_act on fresh leaves: results as batch_norm_bounds'
    keys (dx: the chunks' gradients concatenated)."""
    leaves = [c.detach().clone().requires_grad_() for c in chunks]
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    rm, rv = rm.clone(), rv.clone()
    y = batch_norm_concat_act(
        leaves, rm, rv, w, b, training, 0.1, 1e-5, activation, param, **kwargs
    )
    y.backward(dy)
    dx = torch.cat([c.grad for c in leaves], 1)
    out = dict(out=y.detach(), dx=dx, dweight=w.grad, dbias=b.grad)
    return out | dict(running_mean=rm, running_var=rv)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "activation,param", [("identity", None), ("relu", None), ("leaky_relu", 0.2)]
)
@pytest.mark.parametrize(
    "widths,spatial,channels_last",
    [
        ((3, 2), (5, 7), False),
        ((8, 4, 4, 4), (3, 3), False),
        ((1, 1, 1), (40,), False),
        ((5, 3), (2, 3, 4), False),
        ((3, 2), (5, 7), True),
        ((8, 4, 4, 4), (3, 3), True),
        ((5, 3), (2, 3, 4), True),
    ],
)
def test_within_the_float64_truth_of_cat_then_batch_norm(
    widths, spatial, channels_last, activation, param, dtype, training
):
    chunks = chunked(widths, spatial, dtype=dtype, channels_last=channels_last)
    assert concat.takes(chunks, activation, None)
    c = sum(widths)
    dy = torch.randn(4, c, *spatial, generator=torch.Generator().manual_seed(2)).to(dtype)
    w, b, rm, rv = vectors(c, dtype)
    p = bnlab.functional.check_activation(activation, param, False)[1]
    ours = step(chunks, dy, w, b, rm, rv, training, activation, param)
    x = torch.cat([t.detach() for t in chunks], 1)
    assert ours["out"].stride() == torch.empty_like(x).stride()  # laid out as the chunks
    truth, bounds = batch_norm_bounds(
        x, dy, w, b, rm, rv, training=training, momentum=0.1, eps=1e-5, dtype=dtype,
        activation=activation, param=p,
    )  # fmt: skip
    if not training:
        assert torch.equal(ours.pop("running_mean"), rm)
        assert torch.equal(ours.pop("running_var"), rv)
    assert_step_within(ours, truth, bounds, f"{widths} ")


def test_float64_equals_torch_nn_functional_to_rounding():
    chunks = chunked((6, 2, 2, 2))
    w, b, rm, rv = vectors(12, torch.float64)
    dy = torch.randn(4, 12, 5, 7, dtype=torch.float64)
    ours = step(chunks, dy, w, b, rm, rv, True, "relu", None)
    leaves = [c.detach().clone().requires_grad_() for c in chunks]
    wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
    rmt, rvt = rm.clone(), rv.clone()
    y = TF.relu(TF.batch_norm(torch.cat(leaves, 1), rmt, rvt, wt, bt, True, 0.1, 1e-5))
    y.backward(dy)
    theirs = dict(out=y.detach(), dx=torch.cat([c.grad for c in leaves], 1), dweight=wt.grad)
    theirs |= dict(dbias=bt.grad, running_mean=rmt, running_var=rvt)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_a_block_shares_one_buffer_and_reads_each_chunk_once_for_statistics():
    x0, f1, f2 = chunked((4, 2, 2))
    y1 = batch_norm_concat_act([x0, f1], None, None, training=True)
    buffer = concat.features_of([x0, f1])
    assert buffer.known == 6 and buffer.channels == 6
    y2 = batch_norm_concat_act([x0, f1, f2], None, None, training=True)
    assert concat.features_of([x0, f1, f2]) is concat.features_of([x0, f1])
    assert concat.features_of([x0]).known == 8  # only f2's statistics were computed
    want = TF.batch_norm(torch.cat([x0, f1, f2], 1), None, None, training=True).relu()
    torch.testing.assert_close(y2, want, rtol=1e-12, atol=1e-12)
    (y1.sum() + y2.sum()).backward()  # both layers' backwards read the shared buffer
    for chunk in (x0, f1, f2):
        assert chunk.grad is not None


def test_a_chunk_changed_in_place_starts_a_new_buffer_and_the_backward_keeps_the_old_values():
    x0, f1 = chunked((3, 2))
    dy = torch.randn(4, 5, 5, 7, dtype=torch.float64)
    leaves = [x0.detach().clone().requires_grad_(), f1.detach().clone().requires_grad_()]
    y = batch_norm_concat_act([x0, f1], None, None, training=True, activation="identity")
    ref = TF.batch_norm(torch.cat(leaves, 1), None, None, training=True)
    first = concat.features_of([x0, f1])
    with torch.no_grad():
        f1.mul_(-3.0)  # after the forward: torch.cat's copy would not see it either
    y_new = batch_norm_concat_act([x0, f1], None, None, training=True, activation="identity")
    assert concat.features_of([x0, f1]) is not first
    want = TF.batch_norm(torch.cat([x0.detach(), f1.detach()], 1), None, None, training=True)
    torch.testing.assert_close(y_new, want, rtol=1e-12, atol=1e-12)
    y.backward(dy), ref.backward(dy)
    torch.testing.assert_close(x0.grad, leaves[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f1.grad, leaves[1].grad, rtol=1e-12, atol=1e-12)


def test_another_chunk_in_a_held_place_never_overwrites_what_a_backward_reads():
    x0, f1, g1 = chunked((3, 2, 2))
    dy = torch.randn(4, 5, 5, 7, dtype=torch.float64)
    y = batch_norm_concat_act([x0, f1], None, None, training=True)
    batch_norm_concat_act([x0, g1], None, None, training=True)  # a second forward, same input
    y.backward(dy)
    leaves = [x0.detach().clone().requires_grad_(), f1.detach().clone().requires_grad_()]
    TF.batch_norm(torch.cat(leaves, 1), None, None, training=True).relu().backward(dy)
    torch.testing.assert_close(f1.grad, leaves[1].grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "case", ["one chunk", "mixed layouts", "silu", "backend native", "environment", "float16"]
)
def test_where_the_kernels_do_not_take_the_chunks_it_is_cat_then_batch_norm_act(case, monkeypatch):
    chunks = chunked((3, 2), (4, 4))
    activation, backend = ("silu" if case == "silu" else "relu"), None
    if case == "one chunk":
        chunks = chunks[:1]
    if case == "mixed layouts":
        chunks = [chunks[0], chunks[1].detach().to(memory_format=torch.channels_last)]
    if case == "float16":
        chunks = [c.detach().half() for c in chunks]
    if case == "backend native":
        backend = "native"
    if case == "environment":
        monkeypatch.setenv("BNLAB_BACKEND", "composite")
    assert not concat.takes(chunks, activation, backend)
    c = sum(t.shape[1] for t in chunks)
    rm, rv = torch.zeros(c, dtype=chunks[0].dtype), torch.ones(c, dtype=chunks[0].dtype)
    y = batch_norm_concat_act(chunks, rm, rv, training=True, activation=activation, backend=backend)
    rm2, rv2 = torch.zeros_like(rm), torch.ones_like(rv)
    want = bnlab.functional.batch_norm_act(
        torch.cat(chunks, 1), rm2, rv2, training=True, activation=activation, backend=backend
    )
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(rm, rm2, rtol=0, atol=0)


def test_bad_chunks_and_vectors_raise_naming_what_is_wrong():
    with pytest.raises(TypeError, match="list or tuple of tensors"):
        batch_norm_concat_act(torch.zeros(2, 3, 4), None, None, training=True)
    with pytest.raises(TypeError, match=r"expects tensors, got \(Tensor, int\)"):
        batch_norm_concat_act([torch.zeros(2, 3, 4), 1], None, None, training=True)
    x0, f1 = chunked((3, 2))
    with pytest.raises(ValueError, match="C = 5"):
        batch_norm_concat_act([x0, f1], None, None, torch.ones(4, dtype=torch.float64))


def test_a_non_finite_batch_leaves_the_running_statistics_and_strict_raises():
    x0, f1 = (c.detach().clone() for c in chunked((3, 2)))
    f1[0, 1, 0, 0] = float("nan")
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    tracked = torch.tensor(0)
    batch_norm_concat_act([x0, f1], rm, rv, training=True, num_batches_tracked=tracked)
    assert torch.equal(rm, torch.zeros(5, dtype=torch.float64)) and int(tracked) == 0
    with pytest.raises(bnlab.functional.NonFiniteStatisticsError, match="4"):
        batch_norm_concat_act([x0, f1], rm, rv, training=True, strict=True)


# --------------------------------------------------------------------------------------------
# modules: bnlab.nn.BatchNorm.concat
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: bnlab.nn.BatchNorm2d(7),
        lambda: bnlab.nn.BatchNormAct2d(7),
        lambda: bnlab.nn.BatchNormAct2d(7, activation="leaky_relu", activation_param=0.3),
        lambda: bnlab.nn.BatchNormAct2d(7, activation="silu"),
        lambda: bnlab.nn.InPlaceABN2d(7),
        lambda: bnlab.nn.GhostBatchNorm2d(7, virtual_batch_size=2),
    ],
    ids=["plain", "relu", "leaky", "silu", "inplace", "ghost"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_layers_concat_is_the_layer_on_the_concatenation(make, training):
    torch.manual_seed(0)
    layer, twin = make().double(), None
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.normal_()
        layer.running_mean.normal_(), layer.running_var.uniform_(0.5, 1.5)
    twin = make().double()
    twin.load_state_dict(layer.state_dict())
    layer.train(training), twin.train(training)
    chunks = chunked((3, 2, 2), (4, 5))
    leaves = [c.detach().clone().requires_grad_() for c in chunks]
    y = layer.concat(chunks)
    want = twin(torch.cat(leaves, 1) * 1.0)  # a non-leaf: the in-place layer writes over it
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy), want.backward(dy)
    for ours, theirs in zip(chunks, leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-10)
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, rtol=1e-12, atol=1e-12)


def test_a_layers_concat_checks_the_channel_count():
    with pytest.raises(ValueError, match="expects 6 channels"):
        bnlab.nn.BatchNorm2d(6).concat(chunked((3, 2), (4, 5), dtype=torch.float32))


def test_small_concatenations_stay_on_torch_cat(monkeypatch):
    monkeypatch.undo()  # the real thresholds
    assert concat.large_enough(1 << 19, contiguous=True, training=True)
    assert not concat.large_enough((1 << 19) - 1, contiguous=True, training=True)
    assert not concat.large_enough(1 << 19, contiguous=False, training=True)
    assert not concat.large_enough(1 << 19, contiguous=True, training=False)
    assert concat.large_enough(1 << 20, contiguous=False, training=False)
    assert not concat.large_enough(1 << 30, contiguous=False, training=True)  # channels_last
    small = chunked((3, 2))
    assert not concat.takes(small, "relu", None, training=True)
    big = chunked((32, 32), (64, 64), n=4, dtype=torch.float32)  # 4 x 64 x 64 x 64: 1M values
    assert concat.takes(big, "relu", None, training=True)
    assert concat.takes(big, "relu", None, training=False)
    big_cl = chunked((32, 32), (64, 64), n=4, dtype=torch.float32, channels_last=True)
    assert not concat.takes(big_cl, "relu", None, training=True)
    assert concat.takes(big_cl, "relu", None, training=False)
    y = batch_norm_concat_act(small, None, None, training=True)
    torch.testing.assert_close(
        y, TF.batch_norm(torch.cat(small, 1), None, None, training=True).relu()
    )
