"""bnlab.convert / revert on timm's and torchvision's normalization layers and whole timm models:
float64 training steps and eval equal the unconverted modules' (outputs 1e-7, gradients 1e-6,
running statistics 1e-9), state_dict keys are the same and checkpoints load both ways."""

import copy
import warnings

import pytest
import torch
from torch import nn

import bnlab
from bnlab import checks
from torchvision_standin import import_timm

timm = import_timm()
from timm.layers import activations as timm_act  # noqa: E402
from timm.layers import activations_me as timm_act_me  # noqa: E402
from timm.layers import norm_act  # noqa: E402

F64 = torch.float64
TOL = {"out": 1e-7, "grad": 1e-6, "stats": 1e-9}
DropAct = bnlab.nn.BatchNormDropAct2d


@pytest.fixture(autouse=True)
def one_thread():
    """Small float64 tensors: one thread is faster, and far faster on a loaded machine (OpenMP
    threads waiting for a busy core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# activation module -> the fused name bnlab should use for it (when its op has that name)
ACTS = [
    (nn.Identity, (), "identity"),
    (nn.ReLU, (), "relu"),
    (nn.ReLU, (True,), "relu"),  # in place, as timm builds it
    (nn.LeakyReLU, (0.2,), "leaky_relu"),
    (nn.ELU, (0.7,), "elu"),
    (nn.SiLU, (), "silu"),
    (nn.Hardswish, (), "hardswish"),
    (nn.GELU, (), "gelu"),
    (nn.GELU, ("tanh",), "gelu_tanh"),
    (nn.Hardsigmoid, (), "hardsigmoid"),
    (timm_act.Swish, (), "silu"),
    (timm_act.HardSwish, (), "hardswish"),
    (timm_act.HardSigmoid, (), "hardsigmoid"),
    (timm_act.GELU, (), "gelu"),
    (timm_act.GELUTanh, (), "gelu_tanh"),
    (timm_act_me.SwishMe, (), "silu"),
    (timm_act_me.HardSwishMe, (), "hardswish"),
    (timm_act_me.HardSigmoidMe, (), "hardsigmoid"),
    (nn.PReLU, (3,), None),  # no fused counterpart: batch norm, then the module's own PReLU
    (nn.Tanh, (), None),
    (timm_act.PReLU, (3,), None),  # a subclass of nn.PReLU with its own forward
]


def act_id(case):
    cls, args, _ = case
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}{''.join(f'-{a}' for a in args)}"


def timm_bn_act(act=None, drop=None, seed=0, **kw):
    """A timm BatchNormAct2d(3) with random affine parameters and running statistics."""
    torch.manual_seed(seed)
    m = norm_act.BatchNormAct2d(3, **kw).to(F64)
    m.act = nn.ReLU() if act is None else act.to(F64)
    m.drop = nn.Identity() if drop is None else drop
    with torch.no_grad():
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
        if m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    return m


def quiet_convert(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return bnlab.convert(model)


def step(model, x, seed):
    """Forward + backward with a fixed upstream gradient: output, input grad, parameter grads."""
    x = x.clone().requires_grad_()
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)  # the same dropout mask on both sides
    out = model(x)
    g = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    out.backward(g)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_close(a, b, tol):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def assert_same_training(ref, new, x_shape=(4, 3, 5, 5), steps=2):
    """Two float64 training steps and an eval pass: outputs, gradients, running statistics."""
    for seed in range(steps):
        x = torch.randn(x_shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 2 + 1
        (out, gx, gp), (ref_out, ref_gx, ref_gp) = step(new, x, seed), step(ref, x, seed)
        assert_close(out, ref_out, TOL["out"])
        assert_close(gx, ref_gx, TOL["grad"])
        assert gp.keys() == ref_gp.keys()
        for n in gp:
            assert_close(gp[n], ref_gp[n], TOL["grad"])
        assert_states_close(new, ref)
    new.eval(), ref.eval()
    x = torch.randn(x_shape, dtype=F64)
    with torch.no_grad():
        assert_close(new(x), ref(x), TOL["out"])


def assert_states_close(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert_close(sa[k], sb[k], 0 if k.endswith("num_batches_tracked") else TOL["stats"])


# ------------------------------------------------------------------------------- BatchNormAct2d


@pytest.mark.parametrize("case", ACTS, ids=act_id)
def test_bn_act_train_step_and_eval_match_timm(case):
    cls, args, name = case
    ref = timm_bn_act(cls(*args))
    new = quiet_convert(copy.deepcopy(ref))
    assert type(new) is DropAct and isinstance(new, bnlab.nn.BatchNorm2d)
    assert type(new.act) is cls and type(new.drop) is nn.Identity
    assert new.fused() == ((name, new.fused()[1]) if name in checks.ACTIVATIONS else None)
    assert_same_training(ref, new)


@pytest.mark.parametrize(
    "kw",
    [dict(momentum=None), dict(track_running_stats=False), dict(affine=False), dict(eps=1e-3)],
    ids=["cumulative", "untracked", "no-affine", "eps"],
)
@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU, nn.PReLU], ids=lambda c: c.__name__)
def test_bn_act_options_match_timm(kw, act):
    ref = timm_bn_act(act(), **kw)
    new = quiet_convert(copy.deepcopy(ref))
    assert_same_training(ref, new, steps=3)
    if kw.get("momentum", 0.1) is None:
        assert new.num_batches_tracked.item() == 3


def test_bn_act_dropout_in_training_runs_unfused_with_the_same_mask():
    ref = timm_bn_act(nn.SiLU(), drop=nn.Dropout(0.3))
    new = quiet_convert(copy.deepcopy(ref))
    assert new.fused() is None  # the dropout acts in training
    assert_same_training(ref, new)
    new.eval()
    assert new.fused() == (None if "silu" not in checks.ACTIVATIONS else ("silu", new.fused()[1]))


def test_bn_act_keeps_drop_and_act_objects_and_hooks():
    ref = timm_bn_act(nn.LeakyReLU(0.1), drop=nn.Dropout(0.0))
    act, drop, calls = ref.act, ref.drop, []
    ref.act.register_forward_hook(lambda m, i, o: calls.append("act"))
    new = quiet_convert(ref)
    assert new.act is act and new.drop is drop and new.weight is ref.weight
    assert new.fused() is None  # a hook on act: it must run as its own module
    new(torch.randn(2, 3, 4, 4, dtype=F64))
    assert calls == ["act"]


@pytest.mark.parametrize("act", [nn.SiLU(), nn.PReLU(3)], ids=["silu", "prelu"])
def test_bn_act_state_dict_keys_and_checkpoints_both_ways(act):
    ref = timm_bn_act(act)
    ref(torch.randn(4, 3, 2, 2, dtype=F64))  # num_batches_tracked 1
    new = quiet_convert(copy.deepcopy(ref))
    assert list(new.state_dict()) == list(ref.state_dict())
    assert new.state_dict()._metadata == ref.state_dict()._metadata
    fresh_bnlab = quiet_convert(timm_bn_act(copy.deepcopy(act), seed=5))
    fresh_bnlab.load_state_dict(ref.state_dict(), strict=True)  # timm checkpoint -> bnlab
    assert_states_close(fresh_bnlab, ref)
    fresh_timm = timm_bn_act(copy.deepcopy(act), seed=6)
    fresh_timm.load_state_dict(new.state_dict(), strict=True)  # bnlab checkpoint -> timm
    assert_states_close(fresh_timm, ref)


def test_bn_act_revert_gives_timm_class_back():
    ref = timm_bn_act(nn.Hardswish())
    new = quiet_convert(copy.deepcopy(ref))
    act = new.act
    back, report = bnlab.revert(new, report=True)
    assert type(back) is norm_act.BatchNormAct2d and back.act is act
    assert report.num_converted == 1 and report.num_left == 0
    assert sorted(vars(back)) == sorted(vars(ref)) and repr(back) == repr(ref)
    assert_same_training(ref, back, steps=1)


def test_sync_bn_act_becomes_drop_act_for_one_process_use():
    ref = timm_bn_act(nn.SiLU())
    sync = norm_act.convert_sync_batchnorm(copy.deepcopy(ref))
    assert type(sync) is norm_act.SyncBatchNormAct
    with pytest.warns(bnlab.ConversionWarning, match="SyncBatchNormAct.*one-process use"):
        new = bnlab.convert(sync)
    assert type(new) is DropAct and new.act is sync.act
    assert_same_training(ref, new)
    assert type(bnlab.revert(new)) is norm_act.SyncBatchNormAct


def test_sync_bn_act_without_drop_and_act_gets_identities_and_loses_them_on_revert():
    sync = norm_act.SyncBatchNormAct(3)  # as built directly: no drop, no act
    with pytest.warns(bnlab.ConversionWarning):
        new = bnlab.convert(sync)
    assert type(new.act) is nn.Identity and type(new.drop) is nn.Identity
    back = bnlab.revert(new)
    assert type(back) is norm_act.SyncBatchNormAct and not hasattr(back, "act")
    assert list(back.state_dict()) == list(sync.state_dict())


def test_drop_act_rejects_non_module_act():
    with pytest.raises(TypeError, match="act must be an nn.Module"):
        DropAct(3, act="relu")


# ---------------------------------------------------------------------------- frozen batch norm


def frozen_torchvision():
    from torchvision.ops.misc import FrozenBatchNorm2d

    m = FrozenBatchNorm2d(3)
    torch.manual_seed(1)
    for b in m.buffers():
        b.copy_(torch.rand_like(b) + 0.5)
    return m


def test_frozen_batch_norm_both_ways():
    ref = frozen_torchvision()
    new = quiet_convert(copy.deepcopy(ref))
    assert type(new) is bnlab.nn.FrozenBatchNorm2d and new.num_features == 3
    assert list(new.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(new(x), ref(x), atol=1e-6, rtol=1e-6)
    fresh = bnlab.nn.FrozenBatchNorm2d(3)
    fresh.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fresh(x), ref(x), atol=1e-6, rtol=1e-6)
    back = bnlab.revert(new)
    assert type(back) is type(ref) and vars(back).keys() == vars(ref).keys()
    torch.testing.assert_close(back(x), ref(x), atol=0, rtol=0)


def test_timm_frozen_model_every_frozen_layer_converted_and_back():
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), timm_bn_act(nn.SiLU())
    ).float()
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    frozen = norm_act.freeze_batch_norm_2d(model).eval()
    x = torch.randn(2, 3, 4, 4)
    expected, keys = frozen(x), list(frozen.state_dict())
    act = frozen[3].act
    new, report = bnlab.convert(copy.deepcopy(frozen), report=True)
    assert type(new[1]) is bnlab.nn.FrozenBatchNorm2d
    assert type(new[3]) is bnlab.nn.FrozenBatchNormAct2d and type(new[3].act) is type(act)
    assert (report.num_converted, report.num_left) == (2, 0)
    assert list(new.state_dict()) == keys
    torch.testing.assert_close(new(x), expected, atol=1e-6, rtol=1e-6)
    back = bnlab.revert(new)
    assert type(back[3]) is norm_act.FrozenBatchNormAct2d
    assert vars(back[3]).keys() == vars(frozen[3]).keys()
    torch.testing.assert_close(back(x), expected, atol=0, rtol=0)


# -------------------------------------------------------------------------------- whole models

MODELS = ["efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "densenet121"]


def batch_norms(model):
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) or "BatchNorm" in type(m).__name__
    ]


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_fully_converted_and_trains_like_timm(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=5).to(F64)
    before = batch_norms(ref)
    new, report = bnlab.convert(copy.deepcopy(ref), report=True)
    after = dict(new.named_modules())
    assert before and report.num_left == 0 and report.num_converted == len(before)
    for n, _ in before:  # every batch norm is bnlab's now (100%)
        assert type(after[n]).__module__.startswith("bnlab."), n
    assert_same_training(ref, new, x_shape=(2, 3, 32, 32), steps=1)
    back = bnlab.revert(new)
    assert [type(m) for m in back.modules()] == [type(m) for m in ref.modules()]
    assert_states_close(back, ref)


SAMPLE = [
    "resnet50",
    "cspresnet50",
    "dla34",
    "hrnet_w18_small",
    "levit_128s",
    "efficientvit_m0",
    "repvit_m0_9",
    "ghostnet_100",
    "rexnet_100",
    "lcnet_050",
    "mobilevitv2_050",
    "coatnet_0_224",
]


@pytest.mark.parametrize("name", SAMPLE)
def test_timm_sample_every_batch_norm_converted(name):
    """Coverage only (no weights, no compute): the model on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    before = batch_norms(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # other norm layers (e.g. timm's LayerNorm2d) are left
        new, report = bnlab.convert(model, report=True)
    after = dict(new.named_modules())
    assert before and report.num_converted >= len(before)
    assert [n for n, _ in before if not type(after[n]).__module__.startswith("bnlab.")] == []


def test_split_batch_norm_left_and_reported_by_its_forward():
    from timm.layers.split_batchnorm import SplitBatchNorm2d

    model = nn.Sequential(SplitBatchNorm2d(3))
    with pytest.warns(bnlab.ConversionWarning, match="SplitBatchNorm2d .*defines forward"):
        _, report = bnlab.convert(model, report=True)
    assert type(model[0]) is SplitBatchNorm2d
    # its auxiliary BatchNorm2d layers are plain torch.nn ones: converted
    assert report.num_left == 1 and report.num_converted == 1


@pytest.mark.parametrize("case", ACTS[:10], ids=act_id)
def test_drop_act_runs_the_fused_op_exactly_when_it_has_the_activation(case, monkeypatch):
    cls, args, name = case
    calls, decide = [], bnlab.functional.eager_path

    def spy(*a):  # the module decides its path once per signature: with the fused activation
        calls.append(a[6])
        return decide(*a)

    monkeypatch.setattr(bnlab.functional, "eager_path", spy)
    module = DropAct(3, momentum=None, act=cls(*args), dtype=F64)
    ref = nn.Sequential(nn.BatchNorm2d(3, momentum=None, dtype=F64), cls(*args))
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    torch.testing.assert_close(module(x), ref(x), atol=TOL["out"], rtol=TOL["out"])
    assert calls == [name if name in checks.ACTIVATIONS else "identity"]
    assert_close(module.running_var, ref[0].running_var, TOL["stats"])
