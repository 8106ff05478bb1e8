"""bnlab.inference: population statistics (Algorithm 2), freeze and fold, for bnlab and torch.nn
BNs.

Every batch norm is randomized away from the identity (gamma of both signs, non-zero beta and
running statistics): with gamma = 1, beta = 0, mean = 0, var = 1 most folding bugs would not show.
"""

import copy
import gc
import re
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnlab
from bnlab.functional import ACTIVATIONS
from bnlab.inference import (
    batch_norm_layers,
    batch_norms_in_graph,
    fold,
    freeze,
    population_statistics,
)
from bnlab.nn import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormAct,
    FrozenBatchNormAct2d,
)

BN = {
    "torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "bnlab": {1: bnlab.nn.BatchNorm1d, 2: bnlab.nn.BatchNorm2d, 3: bnlab.nn.BatchNorm3d},
}
FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN_DIM = {2: 1, 3: 1, 4: 2, 5: 3}  # input rank -> BatchNorm{1,2,3}d
SPATIAL = {2: (), 3: (5,), 4: (3, 4), 5: (2, 3, 2)}
LIBS = [("bnlab", "torch"), ("torch", "bnlab")]
LIB = pytest.mark.parametrize("lib", ["bnlab", "torch"])
MIXED = pytest.mark.parametrize("libs", LIBS, ids="-".join)
SIZES = {"equal": [6, 6, 6, 6, 6], "unequal": [3, 7, 2, 11, 5]}


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for bn in batch_norm_layers(model).values():
        c = bn.num_features
        with torch.no_grad():
            if bn.weight is not None:
                sign = torch.where(torch.rand(c, generator=g) < 0.3, -1.0, 1.0)
                bn.weight.copy_(sign * (torch.rand(c, generator=g) + 0.5))
            if bn.bias is not None:
                bn.bias.copy_(torch.randn(c, generator=g))
            if bn.running_mean is not None:
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                bn.num_batches_tracked.fill_(7)
    return model


def data(shape, seed, dtype=torch.float64):
    """Channel c ~ (c + 1) * N(1, 1): different means and spreads per channel."""
    g = torch.Generator().manual_seed(seed)
    scale = (torch.arange(shape[1], dtype=torch.float64) + 1).view(1, -1, *[1] * (len(shape) - 2))
    return ((torch.randn(shape, generator=g, dtype=torch.float64) + 1) * scale).to(dtype)


class Net(nn.Module):
    """Children by keyword; ``forward(self, x)`` given as a function of (module, x) (traceable by
    fx)."""

    def __init__(self, forward, **children):
        super().__init__()
        self.fn = forward
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x):
        return self.fn(self, x)


class TwoInputNet(Net):
    def forward(self, x, shift=0.0):
        return self.fn(self, x, shift)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, saved, skip=()):
    now = model.state_dict()
    assert set(now) == set(saved)
    for key, value in saved.items():
        if not key.endswith(skip):
            assert torch.equal(now[key], value), key


# ---- population_statistics -------------------------------------------------------------------


def train_bn(bn, x):
    """A batch norm in training mode, written out: batch statistics over N and spatial dims."""
    dims, shape = [0, *range(2, x.dim())], (1, -1, *[1] * (x.dim() - 2))
    y = (x - x.mean(dims, keepdim=True)) / torch.sqrt(
        x.var(dims, correction=0, keepdim=True) + bn.eps
    )
    return y * bn.weight.view(shape) + bn.bias.view(shape) if bn.weight is not None else y


def mix(layer, x):
    """A Linear or 1x1 conv, written out as a channel mix."""
    w = layer.weight.reshape(layer.weight.shape[0], -1)
    return torch.einsum("oc,nc...->no...", w, x) + layer.bias.view(1, -1, *[1] * (x.dim() - 2))


def two_bn_model(rank, libs, c=3, d=4):
    dim = BN_DIM[rank]
    layer = nn.Linear(c, d) if rank == 2 else CONV[rank - 2](c, d, 1)
    return randomize(nn.Sequential(BN[libs[0]][dim](c), layer, BN[libs[1]][dim](d)).double())


def expected(xs, kind, literal=False):
    """(E[x], Var[x]) per channel of the inputs ``xs`` (one tensor per batch), from the formulas."""
    flat = [x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs]
    every = torch.cat(flat, 1)
    if literal:  # Algorithm 2 as printed, for equal batch sizes m: E_B[mu_B], m/(m-1) E_B[var_B]
        m = flat[0].shape[1]
        mean = torch.stack([f.mean(1) for f in flat]).mean(0)
        return mean, m / (m - 1) * torch.stack([f.var(1, correction=0) for f in flat]).mean(0)
    if kind == "population":
        return every.mean(1), every.var(1, correction=1)
    num = sum(f.shape[1] * f.var(1, correction=0) for f in flat)  # sum m_b var_b / sum (m_b - 1)
    return every.mean(1), num / sum(f.shape[1] - 1 for f in flat)


def assert_stats(bn, stats, atol=1e-10, rtol=1e-10):
    torch.testing.assert_close(bn.running_mean, stats[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(bn.running_var, stats[1], atol=atol, rtol=rtol)


@pytest.mark.parametrize("variance", ["batch", "population"])
@pytest.mark.parametrize("sizes", list(SIZES))
@MIXED
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_population_statistics_exact(rank, libs, sizes, variance):
    model = two_bn_model(rank, libs)
    batches = [data((n, 3, *SPATIAL[rank]), seed=i) for i, n in enumerate(SIZES[sizes])]
    report = population_statistics(model, batches, variance=variance)
    second = [mix(model[1], train_bn(model[0], x)) for x in batches]  # upstream BN in training mode
    literal = sizes == "equal" and variance == "batch"
    assert_stats(model[0], expected(batches, variance, literal))
    assert_stats(model[2], expected(second, variance, literal))
    m = sum(x.numel() // x.shape[1] for x in batches)
    assert report.values == {"0": m, "2": m}
    assert (report.batches, report.skipped, report.untouched, report.variance) == (
        5,
        0,
        {},
        variance,
    )


@pytest.mark.parametrize("variance", ["batch", "population"])
@LIB
@pytest.mark.parametrize("rank", [2, 4])
def test_population_statistics_far_from_zero(rank, lib, variance):
    # 1e6 + N(0, 1) in float64: one ulp at 1e6 is 1.2e-10, so the mean is checked relatively (1e-13,
    # ~100 ulps: any summation order passes); the O(1) variance absolutely to 1e-10, which a
    # one-pass E[x^2] - E[x]^2 (error ~1e12 * 1e-16 = 1e-4) misses by far.
    model = randomize(nn.Sequential(BN[lib][BN_DIM[rank]](3)).double())
    g = torch.Generator().manual_seed(1)
    batches = [
        1e6 + torch.randn((n, 3, *SPATIAL[rank]), generator=g, dtype=torch.float64)
        for n in SIZES["unequal"]
    ]
    population_statistics(model, batches, variance=variance)
    mean, var = expected(batches, variance)
    torch.testing.assert_close(model[0].running_mean, mean, atol=0, rtol=1e-13)
    torch.testing.assert_close(model[0].running_var, var, atol=1e-10, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@MIXED
def test_population_statistics_skips_non_finite_batches(libs, bad):
    good = [data((n, 3, 3, 4), seed=i) for i, n in enumerate(SIZES["unequal"])]
    broken = data((4, 3, 3, 4), seed=9)
    broken[1, 2, 0, 1] = bad
    reference = two_bn_model(4, libs)
    model = copy.deepcopy(reference)
    population_statistics(reference, good)
    report = population_statistics(model, [good[0], broken, *good[1:], broken.clone()])
    assert (report.batches, report.skipped) == (7, 2)
    assert report.values == {"0": sum(SIZES["unequal"]) * 12, "2": sum(SIZES["unequal"]) * 12}
    for ours, theirs in ((model[0], reference[0]), (model[2], reference[2])):
        assert_stats(ours, (theirs.running_mean, theirs.running_var), atol=1e-12, rtol=1e-12)
        assert int(ours.num_batches_tracked) == 7


@MIXED
def test_population_statistics_skips_batch_whole(libs):
    poison = Net(lambda s, x: x * (float("inf") if x.shape[0] == 4 else 1.0))  # only the deeper BN
    model = randomize(nn.Sequential(BN[libs[0]][1](3), poison, BN[libs[1]][1](3)).double())
    good = [data((n, 3), seed=i) for i, n in enumerate(SIZES["unequal"])]
    report = population_statistics(model, [*good[:2], data((4, 3), 9), *good[2:]])
    assert (report.batches, report.skipped) == (6, 1)
    assert_stats(
        model[0], expected(good, "batch")
    )  # the first BN saw finite values, yet skipped them
    assert_stats(model[2], expected([train_bn(model[0], x) for x in good], "batch"))


def test_population_statistics_skips_non_finite_with_strict_bnlab_layer():
    model = randomize(nn.Sequential(bnlab.nn.BatchNorm1d(3, strict=True)).double())
    batches = [
        data((5, 3), 0),
        torch.full((5, 3), float("nan"), dtype=torch.float64),
        data((4, 3), 1),
    ]
    report = population_statistics(model, batches)
    assert report.skipped == 1
    assert_stats(model[0], expected([batches[0], batches[2]], "batch"))


def test_population_statistics_leaves_modes_parameters_and_buffers():
    model = randomize(
        Net(
            lambda s, x: s.sub(s.bn1(s.drop(s.lin(s.bn0(x)))) * s.scale),
            bn0=bnlab.nn.BatchNorm1d(4),
            lin=nn.Linear(4, 4),
            drop=nn.Dropout(0.5),
            bn1=nn.BatchNorm1d(4),
            sub=nn.Sequential(nn.Linear(4, 3), bnlab.nn.BatchNorm1d(3)),
        ).double()
    )
    model.register_buffer("scale", torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
    model.eval()
    model.bn1.train()
    model.sub.train()  # one subtree in training mode, the Dropout in eval
    modes = {name: m.training for name, m in model.named_modules()}
    saved = snapshot(model)
    batches = [data((n, 4), seed=i) for i, n in enumerate(SIZES["unequal"])]
    population_statistics(model, batches)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert_same_state(model, saved, skip=("running_mean", "running_var"))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    # the Dropout stayed in eval (identity): the deeper layers saw the deterministic inputs
    h = [model.lin(train_bn(model.bn0, x)) for x in batches]
    assert_stats(model.bn1, expected(h, "batch"))
    h = [mix(model.sub[0], train_bn(model.bn1, x) * model.scale) for x in h]
    assert_stats(model.sub[1], expected(h, "batch"))


@MIXED
def test_population_statistics_reports_untracked_layers(libs):
    model = randomize(
        nn.Sequential(
            BN[libs[0]][1](3, track_running_stats=False), nn.Linear(3, 4), BN[libs[1]][1](4)
        ).double()
    )
    batches = [data((n, 3), seed=i) for i, n in enumerate(SIZES["unequal"])]
    report = population_statistics(model, batches)
    assert list(report.untouched) == ["0"] and "track_running_stats" in report.untouched["0"]
    assert list(report.values) == ["2"]
    assert model[0].running_mean is None and model[0].running_var is None
    assert_stats(
        model[2], expected([mix(model[1], train_bn(model[0], x)) for x in batches], "batch")
    )


@LIB
def test_population_statistics_rejects_bad_models_and_arguments(lib):
    model = randomize(Net(lambda s, x: s.bn(s.lin(s.bn(x))), bn=BN[lib][1](3), lin=nn.Linear(3, 3)))
    model.double().eval()
    saved = snapshot(model)
    with pytest.raises(ValueError, match="more than once"):  # one BN, two call sites
        population_statistics(model, [data((5, 3), 0)])
    assert_same_state(model, saved)
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="batch-norm"):
        population_statistics(nn.Sequential(nn.Linear(3, 3)), [torch.randn(4, 3)])
    with pytest.raises(ValueError, match="variance"):
        population_statistics(nn.Sequential(BN[lib][1](3)), [torch.randn(4, 3)], variance="ema")


@pytest.mark.parametrize("style", ["tuple", "list", "dict", "custom"])
def test_population_statistics_batch_styles(style):
    model = randomize(
        TwoInputNet(lambda s, x, shift: s.bn(x + shift), bn=bnlab.nn.BatchNorm1d(3)).double()
    )
    xs = [data((n, 3), seed=i) for i, n in enumerate(SIZES["unequal"])]
    make = {
        "tuple": lambda x: (x, 1.5),
        "list": lambda x: [x, 1.5],
        "dict": lambda x: {"x": x, "shift": 1.5},
        "custom": lambda x: {"data": x},
    }[style]
    forward = (lambda m, b: m(b["data"] * 2.0, shift=-1.0)) if style == "custom" else None
    population_statistics(model, [make(x) for x in xs], forward=forward)
    seen = [2.0 * x - 1.0 for x in xs] if style == "custom" else [x + 1.5 for x in xs]
    assert_stats(model.bn, expected(seen, "batch"))


def _distributed_worker(rank, init, model_path, batches_path, out_dir):
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        model, batches, out = (
            torch.load(model_path, weights_only=False),
            torch.load(batches_path)[rank],
            {},
        )
        for kind in ("batch", "population"):
            local = copy.deepcopy(model)
            report = population_statistics(local, batches, variance=kind)
            out[kind] = (local.state_dict(), report.values, report.batches)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        gc.collect()  # gloo can abort at exit while collectives' objects are still alive
        dist.destroy_process_group()


def test_population_statistics_distributed(tmp_path):
    model = two_bn_model(4, ("bnlab", "torch"))
    shards = [[data((n, 3, 3, 4), seed=10 + n) for n in sizes] for sizes in ([3, 7], [2, 11, 5])]
    torch.save(model, tmp_path / "model.pt")
    torch.save(shards, tmp_path / "batches.pt")
    args = (
        f"file://{tmp_path / 'init'}",
        str(tmp_path / "model.pt"),
        str(tmp_path / "batches.pt"),
        str(tmp_path),
    )
    context = mp.start_processes(
        _distributed_worker, args=args, nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises ProcessRaisedException if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 120 s")
    for kind in ("batch", "population"):
        single = copy.deepcopy(model)
        report = population_statistics(single, shards[0] + shards[1], variance=kind)
        for rank in (0, 1):
            state, values, batches = torch.load(tmp_path / f"rank{rank}.pt")[kind]
            assert values == report.values and batches == len(shards[rank])
            for key in ("0.running_mean", "0.running_var", "2.running_mean", "2.running_var"):
                torch.testing.assert_close(
                    state[key], single.state_dict()[key], atol=1e-10, rtol=1e-10
                )


# ---- freeze ----------------------------------------------------------------------------------

FROZEN_KEYS = ["weight", "bias", "running_mean", "running_var"]  # torchvision's FrozenBatchNorm2d


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=str)
@LIB
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_freeze_matches_eval(rank, lib, dtype, tol):
    dim = BN_DIM[rank]
    model = randomize(nn.Sequential(BN[lib][dim](3), nn.ReLU())).to(dtype).eval()
    x = data((4, 3, *SPATIAL[rank]), 0, dtype=dtype)
    out = model(x)
    assert freeze(model) is model and type(model[0]) is FROZEN[dim]
    assert model[0].num_features == 3 and not batch_norm_layers(model)
    torch.testing.assert_close(model(x), out, atol=tol, rtol=tol)
    assert list(model[0].state_dict()) == FROZEN_KEYS
    checkpoint = randomize(nn.Sequential(BN[lib][dim](3)), seed=5).to(dtype).state_dict()
    assert "0.num_batches_tracked" in checkpoint  # a BatchNorm checkpoint loads strictly
    model.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(model[0].state_dict()[k], checkpoint[f"0.{k}"]) for k in FROZEN_KEYS)


@pytest.mark.parametrize(
    "cls,frozen",
    [
        (nn.BatchNorm2d, FrozenBatchNorm2d),
        (bnlab.nn.BatchNorm2d, FrozenBatchNorm2d),
        (bnlab.nn.BatchNorm, FrozenBatchNorm),
    ],
    ids=str,
)
def test_freeze_model_that_is_a_batch_norm(cls, frozen):
    bn = randomize(cls(3)).double().eval()
    x = data((2, 3, 4, 4), 0)
    assert type(freeze(bn)) is frozen
    torch.testing.assert_close(freeze(bn)(x), bn(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"bias": False}], ids=str)
def test_freeze_without_affine_parameters(kwargs):
    model = randomize(nn.Sequential(bnlab.nn.BatchNorm2d(3, **kwargs))).double().eval()
    x = data((2, 3, 4, 4), 0)
    out = model(x)
    freeze(model)
    if "affine" in kwargs:
        assert torch.equal(model[0].weight, torch.ones(3, dtype=torch.float64))
    assert torch.equal(model[0].bias, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(model(x), out, atol=1e-12, rtol=1e-12)


def test_freeze_keeps_shared_layer_shared():
    bn = nn.BatchNorm1d(3)
    model = randomize(nn.Sequential(bn, nn.Linear(3, 3), bn)).double().eval()
    x = data((4, 3), 0)
    out = model(x)
    freeze(model)
    assert model[0] is model[2] and type(model[0]) is FrozenBatchNorm1d
    torch.testing.assert_close(model(x), out, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("key", ["running_mean", "running_var"])
def test_freeze_rejects_bad_models(key, value):
    model = nn.Sequential(
        nn.Linear(3, 3), nn.Sequential(nn.BatchNorm1d(3), bnlab.nn.BatchNorm1d(3))
    )
    getattr(model[1][1], key)[1] = value
    with pytest.raises(ValueError, match=re.escape("'1.1'") + ".*" + key):
        freeze(model)
    assert isinstance(model[1][0], nn.BatchNorm1d)  # nothing replaced before the error
    with pytest.raises(ValueError, match="track_running_stats"):
        freeze(nn.Sequential(bnlab.nn.BatchNorm1d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match="batch-norm"):
        freeze(nn.Sequential(nn.Linear(3, 3)))


class TorchBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d convention on a torch.nn batch norm: act(drop(batch_norm(x))). fx
    cannot trace into ``super().forward`` (its input check): fold keeps it whole."""

    def __init__(self, c, act=None, drop=None):
        super().__init__(c)
        self.drop = drop or nn.Identity()
        self.act = act or nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class TracedBatchNormAct2d(TorchBatchNormAct2d):
    """As timm's BatchNormAct2d: torch's forward written out, traceable by fx (a functional
    batch_norm call), with a shape check fx records as a use of the input's ``ndim``."""

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        x = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(self.drop(x))


class BnlabBatchNormAct2d(bnlab.nn.BatchNorm2d):
    """The same convention on a bnlab batch norm (a bnlab.nn module: fx keeps it whole)."""

    def __init__(self, c, act=None, drop=None):
        super().__init__(c)
        self.drop = drop or nn.Dropout(0.5)
        self.act = act or nn.GELU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


BN_ACT = {
    "torch-subclass": TorchBatchNormAct2d,
    "traced-subclass": TracedBatchNormAct2d,
    "bnlab-subclass": BnlabBatchNormAct2d,
}


@pytest.mark.parametrize("cls", list(BN_ACT))
def test_freeze_keeps_drop_and_activation_modules(cls):
    act, drop = nn.Hardswish(), nn.Dropout(0.3)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 1), BN_ACT[cls](4, act, drop))).double()
    x = data((2, 3, 5, 5), 0)
    out = model.eval()(x)
    freeze(model)
    assert type(model[1]) is FrozenBatchNormAct2d and not batch_norm_layers(model)
    assert model[1].act is act and model[1].drop is drop  # the same objects
    assert list(model[1].state_dict()) == FROZEN_KEYS
    torch.testing.assert_close(model(x), out, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "cls,activation",
    [(bnlab.nn.BatchNormAct2d, a) for a in ACTIVATIONS]
    + [(bnlab.nn.InPlaceABN2d, a) for a in bnlab.checks.INVERTIBLE_ACTIVATIONS],
    ids=str,
)
def test_freeze_keeps_bnlab_activation(cls, activation):
    param = 0.2 if activation in ("leaky_relu", "elu") else None  # the others take none
    model = randomize(nn.Sequential(cls(4, activation=activation, activation_param=param)))
    model = model.double()
    x = data((2, 4, 3, 3), 0)
    out = model.eval()(x.clone())  # the in-place mode writes over its input
    checked = (model[0].activation, model[0].activation_param)
    assert type(freeze(model)[0]) is FrozenBatchNormAct2d
    assert (model[0].act.activation, model[0].act.activation_param) == checked
    torch.testing.assert_close(model(x), out, atol=1e-12, rtol=1e-12)


def test_frozen_batch_norm_act_module():
    act = nn.PReLU(4)
    frozen = FrozenBatchNormAct2d(4, act=act).double()
    assert list(frozen.state_dict()) == [*FROZEN_KEYS, "act.weight"]
    plain = FrozenBatchNorm2d(4).double()
    for module in (frozen, plain):
        module.load_state_dict(
            randomize(nn.Sequential(nn.BatchNorm2d(4))).double()[0].state_dict(), strict=False
        )
    x = data((2, 4, 3, 3), 0)
    torch.testing.assert_close(frozen(x), act(plain(x)), atol=0, rtol=0)
    with pytest.raises(ValueError, match="FrozenBatchNormAct.from_batch_norm"):
        FrozenBatchNorm2d.from_batch_norm(TorchBatchNormAct2d(4))
    with pytest.raises(ValueError, match="FrozenBatchNormAct.from_batch_norm"):
        FrozenBatchNorm.from_batch_norm(bnlab.nn.BatchNormAct2d(4))


class OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_freeze_refuses_batch_norm_subclass_it_does_not_know():
    model = nn.Sequential(nn.BatchNorm2d(3), OwnForward(3))
    with pytest.raises(ValueError, match=re.escape("'1'") + ".*OwnForward.*overrides forward"):
        freeze(model)
    assert type(model[0]) is nn.BatchNorm2d  # nothing replaced before the error


# ---- fold ------------------------------------------------------------------------------------


def check_fold(model, x, folded=None, frozen=None, tol=1e-12):
    """Fold ``model``; check the report, the output, that ``model`` is untouched; return (gm,
    report)."""
    saved, types = snapshot(model), [type(m) for m in model.modules()]
    gm, report = fold(model, x)
    assert_same_state(model, saved)
    assert [type(m) for m in model.modules()] == types
    if folded is not None:
        assert report.folded == folded
    if frozen is not None:
        assert set(report.frozen) == set(frozen)
        for name, words in frozen.items():
            assert all(w in report.frozen[name] for w in words), report.frozen[name]
    called = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert not any(
        isinstance(m, (nn.modules.batchnorm._BatchNorm, bnlab.nn.BatchNorm))
        for m in called.values()
    )
    assert {t for t, m in called.items() if isinstance(m, FrozenBatchNorm)} == set(report.frozen)
    expected_out, out = model(x), gm(x)
    error = (out.double() - expected_out.double()).abs().max().item()
    assert report.max_abs_error == pytest.approx(error, rel=1e-9, abs=1e-300)
    torch.testing.assert_close(out, expected_out, atol=tol, rtol=tol)
    return gm, report


AFTER = [("Linear", 1)] + [
    (f"{k}{d}d", g) for d in (1, 2, 3) for k in ("Conv", "ConvTranspose") for g in (1, 2)
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@LIB
@pytest.mark.parametrize("layer,groups", AFTER, ids=str)
def test_fold_after(layer, groups, lib, bias):
    dim = 1 if layer == "Linear" else int(layer[-2])
    if layer == "Linear":
        first, x = nn.Linear(4, 6, bias=bias), data((5, 4), 0)
    else:  # 4 in, 6 out channels: a mixed-up in/out axis cannot go unnoticed
        cls, extra = (
            (CONV_T[dim], {"output_padding": 1}) if "Transpose" in layer else (CONV[dim], {})
        )
        first = cls(4, 6, 3, stride=2, dilation=2, padding=1, groups=groups, bias=bias, **extra)
        x = data((2, 4, *[7] * dim), 0)
    model = randomize(nn.Sequential(first, BN[lib][dim](6), nn.ReLU())).double().eval()
    gm, _ = check_fold(model, x, folded=[("1", "0", "after")], frozen={})
    if not bias:  # the fold adds a bias to the copy, none to the original
        assert model[0].bias is None and gm.get_submodule("0").bias is not None


BEFORE = [("Linear", 0, "zeros", 1)] + [
    (f"Conv{d}d", p, mode, g)
    for d in (1, 2, 3)
    for p, mode, g in [
        (0, "zeros", 1),
        (0, "zeros", 2),
        (1, "reflect", 2),
        (1, "replicate", 2),
        (1, "circular", 2),
        (1, "zeros", 2),
    ]
]


@LIB
@pytest.mark.parametrize("layer,padding,mode,groups", BEFORE, ids=str)
def test_fold_before(layer, padding, mode, groups, lib):
    if layer == "Linear":
        dim, second, x = 1, nn.Linear(4, 6, bias=False), data((5, 4), 0)
    else:
        dim = int(layer[-2])
        second = CONV[dim](
            4,
            6,
            3,
            stride=2,
            dilation=2 if padding == 0 else 1,
            padding=padding,
            padding_mode=mode,
            groups=groups,
        )
        x = data((2, 4, *[7] * dim), 0)
    model = randomize(nn.Sequential(BN[lib][dim](4), second)).double().eval()
    if padding and mode == "zeros":  # a folded shift would leak into the zero padding
        gm, _ = check_fold(model, x, folded=[], frozen={"0": ["pad"]})
        assert type(gm.get_submodule("0")) is FROZEN[dim]
    else:
        check_fold(model, x, folded=[("0", "1", "before")], frozen={})


@LIB
@pytest.mark.parametrize("padding,mode", [(0, "zeros"), (1, "reflect"), (1, "zeros")], ids=str)
def test_fold_bn_whose_input_is_used_elsewhere(padding, mode, lib):
    def forward(s, x):  # conv1 -> (bn -> conv2) + conv1's output
        h = s.conv1(x)
        out = s.conv2(s.bn(h))
        return out + h[..., : out.shape[-2], : out.shape[-1]]

    model = (
        randomize(
            Net(
                forward,
                conv1=nn.Conv2d(4, 4, 3, padding=1),
                bn=BN[lib][2](4),
                conv2=nn.Conv2d(4, 4, 3, padding=padding, padding_mode=mode),
            )
        )
        .double()
        .eval()
    )
    if mode == "zeros" and padding:
        check_fold(
            model, data((2, 4, 6, 6), 0), folded=[], frozen={"bn": ["used elsewhere", "pad"]}
        )
    else:
        check_fold(model, data((2, 4, 6, 6), 0), folded=[("bn", "conv2", "before")], frozen={})


def shared_bn(bn):
    return Net(
        lambda s, x: s.bn(s.c1(x)) + s.bn(s.c2(x)),
        c1=nn.Conv2d(4, 4, 3),
        c2=nn.Conv2d(4, 4, 3),
        bn=bn,
    )


UNFOLDABLE = {  # model for a library, input shape, words in the reason the BN was frozen
    "output-used-twice": (
        lambda lib: Net(
            lambda s, x: (lambda y: s.conv(y) + y)(s.bn(x.relu())),
            bn=BN[lib][2](4),
            conv=nn.Conv2d(4, 4, 1),
        ),
        (2, 4, 5, 5),
        ["not used by exactly one layer"],
    ),
    "shared-bn": (lambda lib: shared_bn(BN[lib][2](4)), (2, 4, 6, 6), ["shared by 2 call sites"]),
    "shared-conv": (
        lambda lib: Net(
            lambda s, x: s.conv(torch.relu(s.bn(s.conv(x)))),
            conv=nn.Conv2d(4, 4, 1),
            bn=BN[lib][2](4),
        ),
        (2, 4, 5, 5),
        ["conv is shared by 2 call sites"],
    ),
    "linear-rank3": (
        lambda lib: nn.Sequential(nn.Linear(4, 6), BN[lib][1](5)),
        (2, 5, 4),
        ["rank-3"],
    ),
    "before-transpose": (
        lambda lib: nn.Sequential(BN[lib][2](4), nn.ConvTranspose2d(4, 3, 2, stride=2)),
        (2, 4, 5, 5),
        ["ConvTranspose2d is not a Linear/Conv"],
    ),
}


@LIB
@pytest.mark.parametrize("case", list(UNFOLDABLE))
def test_fold_freezes_what_cannot_fold(case, lib):
    build, shape, words = UNFOLDABLE[case]
    model = randomize(build(lib)).double().eval()
    (name,) = batch_norm_layers(model)
    gm, _ = check_fold(model, data(shape, 0), folded=[], frozen={name: words})
    assert type(gm.get_submodule(name)) is FROZEN[BN_DIM[len(shape)]]


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"bias": False}], ids=str)
@pytest.mark.parametrize("side", ["after", "before"])
def test_fold_without_affine_parameters(side, kwargs):
    bn, conv = bnlab.nn.BatchNorm2d(4, **kwargs), nn.Conv2d(4, 4, 3, groups=2)
    model = randomize(
        nn.Sequential(conv, bn) if side == "after" else nn.Sequential(bn, conv)
    ).double()
    folded = [("1", "0", "after")] if side == "after" else [("0", "1", "before")]
    check_fold(model.eval(), data((2, 4, 6, 6), 0), folded=folded, frozen={})


def test_fold_reaches_batch_norms_inside_bnlab_containers():
    """bnlab's own containers (lab models) are traced through: their BNs fold, none is left."""
    from bnlab.lab.models import SmallResNet

    model = randomize(SmallResNet(width=8).eval())
    x = data((2, 3, 16, 16), 0, dtype=torch.float32)
    gm, report = fold(model, x)
    assert len(report.folded) == len(batch_norm_layers(model)) == 8 and not report.frozen
    assert not batch_norm_layers(gm)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_freezes_batch_norms_the_trace_keeps_inside_a_leaf(monkeypatch):
    from bnlab import inference

    class Leaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x))

    model = randomize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), Leaf()).eval())
    keep_whole = inference._Tracer.is_leaf_module
    monkeypatch.setattr(
        inference._Tracer,
        "is_leaf_module",
        lambda self, m, name: isinstance(m, Leaf) or keep_whole(self, m, name),
    )
    x = data((2, 3, 4, 4), 0, dtype=torch.float32)
    gm, report = fold(model, x)
    assert [bn for bn, _, _ in report.folded] == ["1"]
    assert list(report.frozen) == ["2.bn"] and "keeps whole" in report.frozen["2.bn"]
    assert isinstance(gm.get_submodule("2.bn"), FrozenBatchNorm2d)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def fold_clean(model, x, tol):
    """Fold; check that no batch norm is left and the output; return (gm, report)."""
    gm, report = fold(model, x)
    assert batch_norms_in_graph(gm) == [] and not batch_norm_layers(gm)
    error = (gm(x) - model(x)).abs().max().item()
    assert error <= tol and report.max_abs_error == pytest.approx(error, rel=1e-9, abs=1e-300)
    return gm, report


FUNCTIONAL = {
    "F.batch_norm": lambda s, x: nn.functional.batch_norm(
        x, s.mean, s.var, s.weight, s.bias, False, 0.1, 1e-3
    ),
    "torch.batch_norm": lambda s, x: torch.batch_norm(
        x, s.weight, s.bias, s.mean, s.var, False, 0.1, 1e-3, False
    ),
    "no-affine": lambda s, x: nn.functional.batch_norm(x, s.mean, s.var, eps=1e-3),
}


class Functional(nn.Module):
    """A batch norm written as a functional call on the module's own tensors."""

    def __init__(self, call, c=4):
        super().__init__()
        self.call = call
        g = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.rand(c, generator=g) + 0.5)
        self.bias = nn.Parameter(torch.randn(c, generator=g))
        self.register_buffer("mean", torch.randn(c, generator=g))
        self.register_buffer("var", torch.rand(c, generator=g) + 0.5)

    def forward(self, x):
        return self.call(self, x)


@pytest.mark.parametrize("call", list(FUNCTIONAL))
def test_fold_functional_batch_norm_calls(call):
    def forward(s, x):  # conv -> bn (folds after); relu -> bn -> 3x3 zero-padded conv (frozen)
        return s.conv2(s.bn2(torch.relu(s.bn1(s.conv1(x)))))

    model = Net(
        forward,
        conv1=nn.Conv2d(3, 4, 3),
        bn1=Functional(FUNCTIONAL[call]),
        bn2=Functional(FUNCTIONAL[call]),
        conv2=nn.Conv2d(4, 2, 3, padding=1),
    )
    model = model.double().eval()
    gm, report = fold_clean(model, data((2, 3, 6, 6), 0), tol=1e-12)
    assert report.folded == [("bn1", "conv1", "after")]
    assert list(report.frozen) == ["bn2"] and "pad" in report.frozen["bn2"]
    assert type(gm.get_submodule("bn2.frozen")) is FrozenBatchNorm2d


def test_fold_refuses_functional_batch_norm_without_fixed_statistics():
    batch_stats = Functional(lambda s, x: nn.functional.batch_norm(x, None, None, training=True))
    computed = Functional(  # a parameter is a graph value (a buffer would be a constant)
        lambda s, x: nn.functional.batch_norm(x, s.mean, s.var, s.weight * 2)
    )
    x = data((2, 4, 3, 3), 0)
    with pytest.raises(ValueError, match="batch statistics"):
        fold(nn.Sequential(nn.BatchNorm2d(4), batch_stats).double().eval(), x)
    with pytest.raises(ValueError, match="weight from a computation"):
        fold(nn.Sequential(nn.BatchNorm2d(4), computed).double().eval(), x)


@pytest.mark.parametrize("cls", [*BN_ACT, "bnlab.BatchNormAct2d"])
def test_fold_batch_norm_act_modules_keeps_activation(cls):
    def bn_act(c):
        if cls == "bnlab.BatchNormAct2d":
            return bnlab.nn.BatchNormAct2d(c, activation="elu")
        return BN_ACT[cls](c)

    def forward(s, x):  # conv -> bn+act (folds); + x -> bn+act (frozen: input not from a layer)
        return s.bn2(s.bn1(s.conv(x)) + x)

    model = randomize(
        Net(forward, conv=nn.Conv2d(4, 4, 3, padding=1), bn1=bn_act(4), bn2=bn_act(4))
    )
    model = model.double().eval()
    gm, report = fold_clean(model, data((2, 4, 5, 5), 0), tol=1e-12)
    assert report.folded == [("bn1", "conv", "after")]
    assert list(report.frozen) == ["bn2"] and "from a layer" in report.frozen["bn2"]
    if cls == "traced-subclass":  # traced into: functional calls, drop and act calls stay
        assert type(gm.get_submodule("bn2.frozen")) is FrozenBatchNorm2d
        assert {"bn1.drop", "bn1.act", "bn2.drop", "bn2.act"} <= _call_targets(gm)
    else:  # module calls: the folded one's drop and act stay, the frozen one keeps them
        assert type(gm.get_submodule("bn2")) is FrozenBatchNormAct2d
        assert {"bn1", "bn2"} <= _call_targets(gm) and type(gm.bn1) is nn.Sequential
        assert list(gm.bn1) == [gm.bn1.drop, gm.bn1.act]
        assert type(gm.bn2.act) is type(gm.bn1.act)  # SiLU, GELU, or bnlab's elu as a module


def _call_targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


def test_fold_freezes_a_model_fx_cannot_trace():
    def forward(s, x):  # control flow on a tensor's value: fx cannot trace it
        h = s.bn(s.conv(x))
        return s.act(h) if h.sum() > 0 else -s.act(h)

    model = randomize(
        Net(
            forward,
            conv=nn.Conv2d(3, 4, 1),
            bn=TorchBatchNormAct2d(4),
            act=bnlab.nn.BatchNormAct2d(4),
        )
    )
    model = model.double().eval()
    x = data((2, 3, 4, 4), 0)
    out, saved = model(x), snapshot(model)
    folded, report = fold(model, x)
    assert not isinstance(folded, torch.fx.GraphModule) and not batch_norm_layers(folded)
    assert report.untraced and "trace" in report.untraced and "not traced" in str(report)
    assert set(report.frozen) == {"bn", "act"} and not report.folded
    assert isinstance(folded.bn, FrozenBatchNormAct) and isinstance(folded.act, FrozenBatchNormAct)
    torch.testing.assert_close(folded(x), out, atol=1e-12, rtol=1e-12)
    assert_same_state(model, saved)
