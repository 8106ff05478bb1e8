"""bnlab.nn.SyncBatchNorm in one process (it is BatchNorm there), masked statistics, and
convert_sync_batchnorm. Across processes: tests/test_distributed.py."""

import copy
import datetime
import inspect
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlab
from bnlab import convert_sync_batchnorm
from bnlab.nn import SyncBatchNorm
from tolerances import FORWARD, assert_close, assert_step_within, batch_norm_bounds

F64 = torch.float64
LAYOUTS = {4: torch.channels_last, 5: torch.channels_last_3d}


def make_pair(c, dtype=F64, seed=0, **kwargs):
    """A BatchNorm and a SyncBatchNorm in the same, non-trivial state."""
    ours, theirs = (
        SyncBatchNorm(c, dtype=dtype, **kwargs),
        bnlab.nn.BatchNorm(c, dtype=dtype, **kwargs),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.copy_(torch.rand(c, generator=g) + 0.5)
            theirs.bias.copy_(torch.randn(c, generator=g))
        if theirs.running_mean is not None:
            theirs.running_mean.copy_(torch.randn(c, generator=g))
            theirs.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            theirs.num_batches_tracked.fill_(3)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def make_input(shape, dtype=F64, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=F64) * 2 + 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=LAYOUTS[len(shape)])
    return x


def run(module, x, grad_out, *args):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    out = module(x, *args)
    out.backward(grad_out)
    grads = [None if p is None else p.grad.clone() for p in (module.weight, module.bias)]
    module.zero_grad()
    return out, x.grad, grads


def assert_identical(ours, theirs, shape, layout, dtype, steps=2):
    """Outputs, gradients and buffers bit for bit, over a few steps."""
    for step in range(steps):
        x = make_input(shape, dtype, step, layout)
        grad_out = make_input(shape, dtype, 100 + step, layout)
        results = [run(m, x, grad_out) for m in (ours, theirs)]
        (out, dx, grads), (ref_out, ref_dx, ref_grads) = results
        torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
        torch.testing.assert_close(dx, ref_dx, atol=0, rtol=0)
        assert dx.stride() == ref_dx.stride() and out.stride() == ref_out.stride()
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, atol=0, rtol=0)
        for (name, buf), (_, ref) in zip(ours.named_buffers(), theirs.named_buffers()):
            torch.testing.assert_close(buf, ref, atol=0, rtol=0, msg=name)


CASES = [
    ((6, 5), "contiguous"),
    ((4, 3, 7), "contiguous"),
    ((4, 3, 5, 5), "channels_last"),
    ((2, 3, 2, 3, 3), "channels_last"),
    ((0, 3, 4, 4), "contiguous"),
]


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False}], ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_without_process_group_is_batch_norm(shape, layout, kwargs, momentum, training, dtype):
    assert not (dist.is_available() and dist.is_initialized())
    ours, theirs = make_pair(shape[1], dtype, momentum=momentum, **kwargs)
    ours.train(training), theirs.train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # var_mean of an empty batch warns, on both sides
        assert_identical(ours, theirs, shape, layout, dtype)
    assert ours._sync_calls == 0


def test_process_group_of_one_rank_is_batch_norm(tmp_path):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        ours, theirs = make_pair(3, momentum=None)
        assert_identical(ours, theirs, (4, 3, 5, 5), "channels_last", F64, steps=3)
        assert ours._sync_calls == 0  # nothing was exchanged
        x = make_input((4, 3, 6))
        mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3
        assert SyncBatchNorm(3, dtype=F64)(x, mask).shape == x.shape  # masked: the local path
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# masked statistics (one process): the valid positions are a batch of their own
# --------------------------------------------------------------------------------------------


def masked_case(shape, dtype, seed=0, fill=None):
    x = make_input(shape, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) > 0.4
    mask.view(-1)[:2] = True  # at least two valid values
    if fill is not None:
        x = x.masked_fill(~mask.unsqueeze(1), fill)
    return x, mask


def valid_rows(t, mask):
    """(N, C, *) -> (M, C): the valid positions' values."""
    return t.movedim(1, -1)[mask]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(4, 3, 7), (3, 2, 4, 5)], ids=str)
def test_masked_equals_batch_norm_on_the_valid_values(shape, momentum, dtype):
    ours, theirs = make_pair(shape[1], dtype, momentum=momentum)
    for step in range(2):
        x, mask = masked_case(shape, dtype, seed=step)
        valid = mask.unsqueeze(1)
        grad_out = make_input(shape, dtype, 100 + step) * valid  # the loss ignores padding outputs
        rows, grad_rows = valid_rows(x, mask), valid_rows(grad_out, mask)
        truth, bounds = batch_norm_bounds(  # the valid values are a batch of their own
            rows,
            grad_rows,
            ours.weight,
            ours.bias,
            ours.running_mean.clone(),
            ours.running_var.clone(),
            training=True,
            momentum=momentum,
            eps=ours.eps,
            dtype=dtype,
            num_batches_tracked=ours.num_batches_tracked.clone(),
        )
        for name, module, args in (
            ("masked", ours, (x, grad_out, mask)),
            ("batch norm", theirs, (rows, grad_rows)),
        ):
            out, dx, grads = run(module, *args)
            if module is ours:
                assert (dx.masked_select(~valid) == 0).all()
                out, dx = valid_rows(out, mask), valid_rows(dx, mask)
            assert_step_within(
                dict(
                    out=out, dx=dx, dweight=grads[0], dbias=grads[1], **dict(module.named_buffers())
                ),
                truth,
                bounds,
                f"{name} ",
            )


def test_masked_padding_is_normalized_with_the_valid_statistics():
    shape = (4, 3, 7)
    ours, _ = make_pair(3)
    x, mask = masked_case(shape, F64)
    x = x.requires_grad_()
    grad_out = make_input(shape, F64, 5)
    out = ours(x, mask)
    out.backward(grad_out)
    v = valid_rows(x.detach(), mask)  # (M, C)
    mean, var = v.mean(0), v.var(0, correction=0)
    invstd = (var + ours.eps).rsqrt()
    w, b = ours.weight.detach(), ours.bias.detach()
    expected = (x.detach() - mean[:, None]) * (invstd * w)[:, None] + b[:, None]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    pad = ~mask.unsqueeze(1).expand_as(x)
    # padding did not enter the statistics: its gradient is the elementwise one
    torch.testing.assert_close(
        x.grad[pad], (grad_out * (invstd * w)[:, None]).expand_as(x)[pad], atol=1e-12, rtol=1e-12
    )


@pytest.mark.parametrize("fill", [float("inf"), float("nan"), 1e30])
def test_masked_statistics_ignore_padding_values(fill):
    ours, theirs = make_pair(3)
    x, mask = masked_case((4, 3, 7), F64, fill=fill)
    out = ours(x, mask)
    ref = theirs(valid_rows(x, mask))
    torch.testing.assert_close(valid_rows(out, mask), ref, atol=1e-12, rtol=1e-12)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(
            getattr(ours, name), getattr(theirs, name), atol=1e-12, rtol=1e-12
        )


def test_mask_all_valid_is_batch_norm():
    ours, theirs = make_pair(3)
    x = make_input((4, 3, 5, 5))
    out = ours(x, torch.ones(4, 5, 5, dtype=torch.bool))
    torch.testing.assert_close(out, theirs(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-12, rtol=1e-12)


def test_masked_eval_uses_running_statistics_and_ignores_mask():
    ours, theirs = make_pair(3)
    ours.eval(), theirs.eval()
    x, mask = masked_case((4, 3, 7), F64)
    torch.testing.assert_close(ours(x, mask), theirs(x), atol=0, rtol=0)


def test_masked_eval_without_running_statistics_uses_the_valid_values():
    ours, theirs = make_pair(3, track_running_stats=False)
    ours.eval(), theirs.eval()
    x, mask = masked_case((4, 3, 7), F64)
    torch.testing.assert_close(
        valid_rows(ours(x, mask), mask), theirs(valid_rows(x, mask)), atol=1e-12, rtol=1e-12
    )


def test_one_valid_value_is_an_error_and_leaves_state():
    ours, _ = make_pair(3)
    before = copy.deepcopy(ours.state_dict())
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[2, 3] = True
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(make_input((4, 3, 7)), mask)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


@pytest.mark.parametrize(
    "mask,error,match",
    [
        (
            torch.ones(4, 6, dtype=torch.bool),
            ValueError,
            r"mask has shape \(4, 6\), expected \(4, 7\)",
        ),
        (torch.ones(4, 3, 7, dtype=torch.bool), ValueError, "without the channel dim 1"),
        (torch.ones(4, 7), TypeError, "mask must be a bool tensor"),
    ],
)
def test_bad_mask_is_an_error(mask, error, match):
    with pytest.raises(error, match=match):
        SyncBatchNorm(3)(torch.randn(4, 3, 7), mask)


# --------------------------------------------------------------------------------------------
# the module's surface: torch.nn.SyncBatchNorm's constructor and checkpoints
# --------------------------------------------------------------------------------------------


def test_constructor_follows_torch_sync_batch_norm():
    ours = list(inspect.signature(SyncBatchNorm).parameters)
    theirs = list(inspect.signature(nn.SyncBatchNorm).parameters)
    assert ours[: len(theirs)] == theirs  # process_group in torch's position
    bn = SyncBatchNorm(4, 1e-3, 0.2, True, True, "group-placeholder")
    assert bn.process_group == "group-placeholder" and bn.eps == 1e-3 and bn.momentum == 0.2


def test_state_dict_is_torch_sync_batch_norms():
    theirs = nn.SyncBatchNorm(4)
    with torch.no_grad():
        theirs.running_mean.uniform_()
        theirs.num_batches_tracked.fill_(7)
    ours = SyncBatchNorm(4)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    assert int(ours.num_batches_tracked) == 7


def test_extra_repr_is_batch_norms():
    kwargs = dict(momentum=None, affine=False, strict=True, backend="composite")
    assert SyncBatchNorm(5, **kwargs).extra_repr() == bnlab.nn.BatchNorm(5, **kwargs).extra_repr()


@pytest.mark.parametrize(
    "timeout,error", [(0, ValueError), (-1.0, ValueError), ("5", TypeError), (True, TypeError)]
)
def test_bad_timeout_is_an_error(timeout, error):
    with pytest.raises(error, match="timeout"):
        SyncBatchNorm(3, timeout=timeout)


def test_timeout_accepts_seconds_and_timedelta():
    assert SyncBatchNorm(3, timeout=2.5).timeout == datetime.timedelta(seconds=2.5)
    assert SyncBatchNorm(3, timeout=datetime.timedelta(minutes=1)).timeout.total_seconds() == 60
    assert SyncBatchNorm(3).timeout is None


def test_one_value_per_channel_in_training_is_an_error():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        SyncBatchNorm(4)(torch.randn(1, 4))


# --------------------------------------------------------------------------------------------
# convert_sync_batchnorm
# --------------------------------------------------------------------------------------------


class Tagged(nn.BatchNorm2d):
    """A user's subclass: converting it would drop what it adds."""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.BatchNorm2d(4)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            shared,
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            bnlab.nn.BatchNorm2d(4, momentum=None, strict=True),
            nn.Conv2d(4, 4, 1),
            shared,  # the same layer twice
            bnlab.nn.BatchRenorm2d(4),
            bnlab.nn.GhostBatchNorm2d(4, virtual_batch_size=2),
            Tagged(4),
            nn.SyncBatchNorm(4),
            nn.InstanceNorm2d(4),
            bnlab.nn.FrozenBatchNorm2d(4),
        )
        self.block = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.BatchNorm3d(3, affine=False))
        self.head = nn.Sequential(
            nn.Linear(4 + 3, 6),
            nn.BatchNorm1d(6, track_running_stats=False),
            bnlab.nn.BatchNorm(6),
            nn.LayerNorm(6),
        )

    def forward(self, x2, x3):
        h = [self.features[:7](x2).mean((2, 3)), self.block(x3).relu().mean((2, 3, 4))]
        return self.head(torch.cat(h, 1))


def net_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 5, 5, generator=g), torch.randn(6, 2, 3, 4, 4, generator=g)


def trained_net():
    torch.manual_seed(0)
    net = Net()
    net.features[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for i in range(2):
        opt.zero_grad()
        net(*net_inputs(10 + i)).square().sum().backward()
        opt.step()
    return net, opt


def convert_quietly(model, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert_sync_batchnorm(model, *args, **kwargs)
    return model, [w for w in caught if issubclass(w.category, bnlab.nn.ConversionWarning)]


CONVERTED = ["features.1", "features.4", "features.6", "block.1", "head.1", "head.2"]
LEFT = {
    "features.7": "BatchRenorm2d",
    "features.8": "GhostBatchNorm2d",
    "features.9": "Tagged",
    "features.10": "SyncBatchNorm",
}


def test_convert_swaps_exactly_the_plain_batch_norms_and_reports_the_rest():
    net, _ = trained_net()
    before = dict(net.named_modules(remove_duplicate=False))
    net, caught = convert_quietly(net)
    after = dict(net.named_modules(remove_duplicate=False))
    for name in CONVERTED:
        assert type(after[name]) is SyncBatchNorm, name
    for name, module in after.items():
        if name not in CONVERTED:
            assert module is before[name], f"{name} was replaced"
    assert after["features.1"] is after["features.6"], "a shared layer must stay one layer"
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith(f"bnlab.convert_sync_batchnorm left {len(LEFT)} batch-norm layer(s)")
    for name, cls in LEFT.items():
        assert f"{name} (" in message and cls in message, (name, message)
    assert "would silently drop" in message  # why renorm and ghost stay
    for quiet in ("InstanceNorm", "FrozenBatchNorm", "LayerNorm"):
        assert quiet not in message


def test_convert_keeps_every_piece_of_state():
    net, opt = trained_net()
    old = dict(net.named_modules())
    tensors = {name: t for name, t in [*net.named_parameters(), *net.named_buffers()]}
    state = copy.deepcopy(net.state_dict())
    net.block[1].eval()
    net.features[4].bias.requires_grad_(False)
    calls = []
    handle = net.head[1].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    net.head[2].note = "kept"
    net, _ = convert_quietly(net)
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        assert t is tensors[name], f"{name} is a new tensor"
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0, msg=key)
    assert net.block[1].training is False and net.head[1].training is True
    assert net.features[4].strict is True and net.features[4].momentum is None
    assert net.head[1].track_running_stats is False and net.head[1].running_mean is None
    assert net.head[2].note == "kept"
    assert net.features[4].bias.requires_grad is False  # as it was set before the swap
    assert old["head.2"].weight is net.head[2].weight
    net(*net_inputs())
    assert calls == ["SyncBatchNorm"]
    handle.remove()
    net(*net_inputs())
    assert calls == ["SyncBatchNorm"], "the hook handle taken before the swap no longer works"
    # an optimizer built before the swap still trains the converted layers
    weight = net.features[1].weight.detach().clone()
    opt.zero_grad()
    net(*net_inputs(3)).square().sum().backward()
    opt.step()
    assert not torch.equal(weight, net.features[1].weight)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_converted_model_computes_the_same_without_process_group(training):
    net, _ = trained_net()
    twin = copy.deepcopy(net)
    net.train(training), twin.train(training)
    net, _ = convert_quietly(net)
    net.double(), twin.double()  # conversion is checked in float64, where the flat bound holds
    for seed in range(2):
        inputs = [t.double() if t.is_floating_point() else t for t in net_inputs(seed)]
        assert_close(net(*inputs), twin(*inputs), torch.float64, FORWARD)
    for (name, a), (_, b) in zip(net.state_dict().items(), twin.state_dict().items()):
        assert_close(
            a, b, a.dtype, FORWARD, msg=name
        ) if a.is_floating_point() else torch.testing.assert_close(a, b, msg=name)


def test_converted_layer_keeps_its_input_rank_check():
    bn, _ = convert_quietly(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(4, 3))
    any_rank, _ = convert_quietly(bnlab.nn.BatchNorm(3))
    assert any_rank(torch.randn(4, 3)).shape == (4, 3)


def test_convert_root_and_process_group_and_timeout():
    group = object()  # the converter only stores it; no process group is needed to convert
    old = bnlab.nn.BatchNorm1d(5)
    new, caught = convert_quietly(old, group, timeout=3)
    assert type(new) is SyncBatchNorm and new is not old and not caught
    assert new.process_group is group and new.timeout == datetime.timedelta(seconds=3)
    assert new.weight is old.weight and new._sync_calls == 0


def test_convert_leaves_sync_layers_and_reports_another_group():
    model = nn.Sequential(SyncBatchNorm(3), SyncBatchNorm(3, process_group="a"))
    same, caught = convert_quietly(model)
    assert not caught and all(type(m) is SyncBatchNorm for m in same)
    _, caught = convert_quietly(model, "b")
    assert len(caught) == 1 and "0 (" in str(caught[0].message) and "1 (" in str(caught[0].message)
    assert "another process group" in str(caught[0].message)
    assert model[1].process_group == "a"


def test_torch_spelling_of_the_converter():
    net = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))
    assert type(net[0]) is SyncBatchNorm


def test_public_names():
    assert bnlab.nn.SyncBatchNorm is bnlab.nn.sync.SyncBatchNorm
    assert bnlab.convert_sync_batchnorm is bnlab.nn.convert_sync_batchnorm
    assert bnlab.nn.convert_sync_batchnorm is bnlab.nn.sync.convert_sync_batchnorm
    assert {"SyncBatchNorm", "convert_sync_batchnorm"} <= set(bnlab.nn.__all__)
    assert "convert_sync_batchnorm" in bnlab.__all__
    assert issubclass(bnlab.distributed.SyncBatchNormError, RuntimeError)
