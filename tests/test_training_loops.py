"""Batch norm in the training loops people write: gradient accumulation (bnlab.accumulate) and
gradient checkpointing, against the statistics of the values each layer saw (float64 reference
arithmetic in torch.float64)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnlab
import bnlab.nn as bn

MICRO, PARTS = 8, 4
BACKENDS = [None, "composite", "cpu", "native"]


def layer(kind: str, c: int, backend=None) -> nn.Module:
    if kind == "bn2d":
        return bn.BatchNorm2d(c, backend=backend)
    if kind == "bn1d":
        return bn.BatchNorm1d(c, backend=backend)
    if kind == "bn3d":
        return bn.BatchNorm3d(c, backend=backend)
    if kind == "act":
        return bn.BatchNormAct2d(c, activation="relu", backend=backend)
    if kind == "iabn":
        return bn.InPlaceABN2d(c, backend=backend)
    if kind == "ghost":
        return bn.GhostBatchNorm2d(c, virtual_batch_size=4, backend=backend)
    if kind == "renorm":
        return bn.BatchRenorm2d(c, backend=backend)
    if kind == "cumulative":
        return bn.BatchNorm2d(c, momentum=None, backend=backend)
    raise ValueError(kind)


def input_for(kind: str, n: int, dtype=torch.float64) -> torch.Tensor:
    shape = {"bn1d": (n, 3), "bn3d": (n, 3, 2, 3, 2)}.get(kind, (n, 3, 4, 5))
    return torch.randn(*shape, dtype=dtype) * 2 + 0.5


def merged(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel of every value the layer saw."""
    x = torch.cat(xs).double().transpose(0, 1).flatten(1)
    return x.mean(1), x.var(1, correction=1)


def pooled(xs: list[torch.Tensor], vbs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ghost batch norm's definition: the average over virtual batches of their mean and
    unbiased variance (every virtual batch of every micro-batch, equal sizes here)."""
    parts = [p for x in xs for p in x.split(vbs)]
    stats = [merged([p]) for p in parts]
    return torch.stack([m for m, _ in stats]).mean(0), torch.stack([v for _, v in stats]).mean(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bn1d", "bn2d", "bn3d", "act", "ghost", "renorm", "cumulative"])
def test_one_update_with_the_statistics_of_all_micro_batches(kind, backend):
    torch.manual_seed(0)
    model = layer(kind, 3, backend).double()
    before_mean, before_var = model.running_mean.clone(), model.running_var.clone()
    xs = [input_for(kind, MICRO) for _ in range(PARTS)]
    with bnlab.accumulate(model) as acc:
        for x in xs:
            model(x).square().sum().backward()
    mean, var = pooled(xs, 4) if kind == "ghost" else merged(xs)
    w = 1.0 if model.momentum is None else model.momentum
    expected_mean = (1 - w) * before_mean + w * mean
    expected_var = (1 - w) * before_var + w * var
    torch.testing.assert_close(model.running_mean, expected_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.running_var, expected_var, rtol=0, atol=1e-12)
    assert int(model.num_batches_tracked) == 1
    assert [(r.name, r.merged, r.skipped) for r in acc.report] == [("<root>", PARTS, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_first_layer_ends_as_after_one_forward_of_the_whole_batch(backend):
    torch.manual_seed(1)
    xs = [torch.randn(MICRO, 4, 6, 6) * 3 + 1 for _ in range(PARTS)]
    whole, accumulated = bn.BatchNorm2d(4, backend=backend), bn.BatchNorm2d(4, backend=backend)
    whole(torch.cat(xs))
    with bnlab.accumulate(accumulated):
        for x in xs:
            accumulated(x)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(accumulated, key), getattr(whole, key), rtol=1e-6, atol=1e-6
        )


def test_in_place_abn_records_what_it_normalized():
    torch.manual_seed(2)
    model = bn.InPlaceABN2d(3).double()
    xs = [input_for("iabn", MICRO) for _ in range(PARTS)]
    seen = [x.clone() for x in xs]
    with bnlab.accumulate(model):
        for x in xs:
            model(x)  # overwrites x
    mean, var = merged(seen)
    torch.testing.assert_close(model.running_mean, 0.1 * mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.running_var, 0.9 + 0.1 * var, rtol=0, atol=1e-12)


def test_deeper_layers_merge_what_they_saw_and_are_named():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), bn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), bn.BatchNorm2d(5)
    ).double()
    seen = {1: [], 4: []}
    for i in seen:
        model[i].register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].detach()))
    xs = [torch.randn(MICRO, 3, 6, 6, dtype=torch.float64) for _ in range(PARTS)]
    with bnlab.accumulate(model) as acc:
        for x in xs:
            model(x).sum().backward()
    for i in seen:
        mean, var = merged(seen[i])
        torch.testing.assert_close(model[i].running_mean, 0.1 * mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(model[i].running_var, 0.9 + 0.1 * var, rtol=0, atol=1e-12)
    assert sorted((r.name, r.merged) for r in acc.report) == [("1", PARTS), ("4", PARTS)]


def test_a_layer_called_twice_per_micro_batch_merges_every_call():
    torch.manual_seed(4)
    norm = bn.BatchNorm1d(3).double()
    xs = [torch.randn(MICRO, 3, dtype=torch.float64) for _ in range(2 * PARTS)]
    with bnlab.accumulate(norm) as acc:
        for a, b in zip(xs[::2], xs[1::2]):
            norm(a) + norm(b)
    mean, var = merged(xs)
    torch.testing.assert_close(norm.running_mean, 0.1 * mean, rtol=0, atol=1e-12)
    assert acc.report[0].merged == 2 * PARTS and int(norm.num_batches_tracked) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_micro_batches_are_left_out_and_counted(backend):
    torch.manual_seed(5)
    norm = bn.BatchNorm2d(3, backend=backend).double()
    xs = [input_for("bn2d", MICRO) for _ in range(PARTS)]
    bad = xs[1].clone()
    bad[0, 0, 0, 0] = float("nan")
    with bnlab.accumulate(norm) as acc:
        for x in (xs[0], bad, xs[2], xs[3]):
            norm(x)
    mean, var = merged([xs[0], xs[2], xs[3]])
    torch.testing.assert_close(norm.running_mean, 0.1 * mean, rtol=0, atol=1e-12)
    assert (acc.report[0].merged, acc.report[0].skipped) == (3, 1)
    assert int(norm.num_batches_tracked) == 1


def test_an_exception_inside_applies_nothing():
    norm = bn.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="boom"):
        with bnlab.accumulate(norm):
            norm(torch.randn(MICRO, 3))
            raise RuntimeError("boom")
    assert int(norm.num_batches_tracked) == 0
    assert torch.equal(norm.running_mean, torch.zeros(3))
    norm(torch.randn(MICRO, 3))  # and updates apply again after the context
    assert int(norm.num_batches_tracked) == 1


def test_layers_outside_the_model_update_as_usual():
    inside, outside = bn.BatchNorm1d(3), bn.BatchNorm1d(3)
    with bnlab.accumulate(inside):
        for _ in range(PARTS):
            inside(torch.randn(MICRO, 3))
            outside(torch.randn(MICRO, 3))
        assert int(inside.num_batches_tracked) == 0
    assert (int(inside.num_batches_tracked), int(outside.num_batches_tracked)) == (1, PARTS)


def checkpointed(blocks: nn.ModuleList, x: torch.Tensor, reentrant) -> torch.Tensor:
    for block in blocks:
        x = block(x) if reentrant is None else checkpoint(block, x, use_reentrant=reentrant)
    return x


def blocks(backend=None, momentum=0.1) -> nn.ModuleList:
    torch.manual_seed(6)
    return nn.ModuleList(
        nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1), bn.BatchNorm2d(3, momentum=momentum, backend=backend)
        )
        for _ in range(3)
    ).double()


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_checkpointed_model_updates_its_statistics_once_per_step(reentrant, backend, momentum):
    plain, ckpt = blocks(backend, momentum), blocks(backend, momentum)
    for step in range(3):
        x = torch.randn(MICRO, 3, 5, 5, dtype=torch.float64)
        outs, grads = [], []
        for model in (plain, ckpt):
            model.zero_grad()
            xm = x.clone().requires_grad_()
            y = checkpointed(model, xm, None if model is plain else reentrant)
            y.square().sum().backward()
            outs.append(y.detach())
            grads.append(xm.grad)
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert int(ckpt[0][1].num_batches_tracked) == 3


def test_checkpointing_inside_accumulate_records_each_micro_batch_once():
    model = blocks()
    xs = [torch.randn(MICRO, 3, 5, 5, dtype=torch.float64) for _ in range(PARTS)]
    with bnlab.accumulate(model) as acc:
        for x in xs:
            checkpointed(model, x.requires_grad_(), False).sum().backward()
    assert [r.merged for r in acc.report] == [PARTS] * 3
    assert int(model[0][1].num_batches_tracked) == 1


def merged_rows(parts: list[tuple[torch.Tensor, torch.Tensor, int]]):
    """Per step (row): Chan's merge of (mean, biased var, count) parts; unbiased var."""
    n = sum(k for _, _, k in parts)
    mean = sum(m * k for m, _, k in parts) / n
    m2 = sum(v * k + k * (m - mean).square() for m, v, k in parts)
    return mean, m2 / (n - 1)


@pytest.mark.parametrize("constant_prefix", [0, 3])
def test_bnlstm_merges_each_time_step_over_the_micro_batches(constant_prefix):
    torch.manual_seed(7)
    cell = bn.BNLSTMCell(3, 4, max_length=6).double()
    observed = []
    cell.observer = lambda which, t0, mean, var, count: observed.append(
        (which, t0, mean.detach().clone(), var.detach().clone(), count)
    )
    xs = [torch.randn(6, MICRO, 3, dtype=torch.float64) for _ in range(PARTS)]
    for x in xs:
        x[:constant_prefix] = 0.5  # the same pixels in every sequence: the constant path
    before = {k: v.clone() for k, v in cell.named_buffers()}
    with bnlab.accumulate(cell):
        for x in xs:
            cell.forward_sequence(x)[0].sum().backward()
    assert int(cell.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
    for which in "xhc":
        rows = {}
        for w, t0, mean, var, count in observed:
            if w == which:
                for s in range(mean.shape[0]):
                    rows.setdefault(t0 + s, []).append((mean[s], var[s], count))
        assert sorted(rows) == list(range(6))
        for t, parts in rows.items():
            assert len(parts) == PARTS
            mean, var = merged_rows(parts)
            expected_mean = 0.9 * before[f"running_mean_{which}"][t] + 0.1 * mean
            expected_var = 0.9 * before[f"running_var_{which}"][t] + 0.1 * var
            got_mean = getattr(cell, f"running_mean_{which}")[t]
            got_var = getattr(cell, f"running_var_{which}")[t]
            torch.testing.assert_close(got_mean, expected_mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(got_var, expected_var, rtol=0, atol=1e-11)


def test_bnlstm_input_statistics_equal_one_forward_of_the_whole_batch():
    torch.manual_seed(8)
    whole, accumulated = (bn.BNLSTMCell(3, 4, max_length=5).double() for _ in range(2))
    accumulated.load_state_dict(whole.state_dict())
    xs = [torch.randn(5, MICRO, 3, dtype=torch.float64) for _ in range(PARTS)]
    whole.forward_sequence(torch.cat(xs, 1))
    with bnlab.accumulate(accumulated):
        for x in xs:
            accumulated.forward_sequence(x)
    for key in ("running_mean_x", "running_var_x", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(accumulated, key), getattr(whole, key), rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("act", ["silu", "prelu"])  # fused, and BN then the module's activation
def test_a_converted_timm_layer_accumulates_like_a_first_layer(act):
    from torchvision_standin import import_timm

    timm = import_timm()
    torch.manual_seed(9)
    activation = nn.SiLU() if act == "silu" else nn.PReLU()
    whole = timm.layers.BatchNormAct2d(3, act_layer=type(activation)).double()
    accumulated = bnlab.convert(copy.deepcopy(whole))
    assert isinstance(accumulated, bn.BatchNormDropAct2d)
    xs = [input_for("bn2d", MICRO) for _ in range(PARTS)]
    whole(torch.cat(xs))
    with bnlab.accumulate(accumulated):
        for x in xs:
            accumulated(x).sum().backward()
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(accumulated, key), getattr(whole, key), rtol=0, atol=1e-12
        )
