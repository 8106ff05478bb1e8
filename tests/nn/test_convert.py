"""bnlab.convert / bnlab.revert and checkpoint compatibility with torch.nn's normalization
layers."""

import copy
import importlib
import re
import warnings

import pytest
import torch
from torch import nn

import bnlab

F64 = torch.float64
TOL = {F64: 1e-10, torch.float32: 1e-5}
TO_BNLAB = {
    nn.BatchNorm1d: bnlab.nn.BatchNorm1d,
    nn.BatchNorm2d: bnlab.nn.BatchNorm2d,
    nn.BatchNorm3d: bnlab.nn.BatchNorm3d,
    nn.LayerNorm: bnlab.nn.LayerNorm,
}
TO_TORCH = {v: k for k, v in TO_BNLAB.items()}


def close(a, b, dtype=F64):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


def assert_state_equal(a, b, dtype=F64):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert (sa[k].dtype, sa[k].shape) == (sb[k].dtype, sb[k].shape), k
        close(sa[k], sb[k], dtype)


class Net(nn.Module):  # a custom container, with a norm layer as a direct child
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Sequential(
                nn.Conv2d(4, 4, 3, padding=1, bias=False),
                nn.BatchNorm2d(4, affine=False),
                nn.ReLU(),
            ),
            nn.BatchNorm2d(4, track_running_stats=False, momentum=0.3),
        )
        self.block = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.BatchNorm3d(3, momentum=None))
        self.head = nn.Sequential(
            nn.Linear(7, 6), nn.BatchNorm1d(6, bias=False), nn.ReLU(), nn.Linear(6, 5)
        )
        self.norm = nn.LayerNorm(5)

    def forward(self, x2, x3):
        h = torch.cat([self.features(x2).mean((2, 3)), self.block(x3).relu().mean((2, 3, 4))], 1)
        return self.norm(self.head(h))


def inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 5, 5, generator=g, dtype=dtype), torch.randn(
        6, 2, 3, 4, 4, generator=g, dtype=dtype
    )


def step(model, opt, dtype=F64, seed=1):
    opt.zero_grad()
    model(*inputs(dtype, seed)).square().sum().backward()
    opt.step()


def trained_net(dtype=F64, steps=3):
    torch.manual_seed(0)
    net = Net().to(dtype)
    net.features[0].weight.requires_grad_(False)
    net.block[1].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for i in range(steps):
        step(net, opt, dtype, seed=10 + i)
    return net


def set_mode(net, mode):
    net.train(mode not in ("eval", "untracked-eval"))
    if mode.startswith("untracked"):  # tracking switched off after training: buffers kept
        net.features[1].track_running_stats = net.block[1].track_running_stats = False
    if mode == "mixed":
        for m in (net.block, net.features[3], net.head[1]):
            m.eval()


def run(net, dtype, seed=1):
    """Forward + backward: output, input grads and every trainable parameter's grad."""
    x2, x3 = (x.requires_grad_() for x in inputs(dtype, seed))
    for p in net.parameters():
        p.grad = None
    out = net(x2, x3)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype))
    return (
        out.detach(),
        x2.grad,
        x3.grad,
        {n: p.grad for n, p in net.named_parameters() if p.requires_grad},
    )


# ---------------------------------------------------------------------------------------- convert


def test_convert_types_identity_and_modes():
    net = trained_net()
    set_mode(net, "mixed")
    before = {n: (type(m), m.training, m) for n, m in net.named_modules()}
    params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
    flags = {n: p.requires_grad for n, p in params.items()}
    assert net.block[1].num_batches_tracked.item() == 3 and net.head[1].running_var.ne(1).any()
    assert bnlab.convert(net) is net
    for n, m in net.named_modules():
        cls, training, old = before[n]
        assert m.training == training, n
        assert (type(m), m is old) == (
            (TO_BNLAB[cls], False) if cls in TO_BNLAB else (cls, True)
        ), n
    assert sum(type(m) in TO_TORCH for m in net.modules()) == 6
    assert dict(net.named_parameters()).keys() == params.keys()
    assert dict(net.named_buffers()).keys() == buffers.keys()
    for n, p in net.named_parameters():
        assert p is params[n] and p.requires_grad == flags[n] and p.dtype == F64, n
        assert p.device.type == "cpu"
    assert all(b is buffers[n] for n, b in net.named_buffers())
    assert net.features[4].running_mean is None and net.head[1].bias is None
    assert net.block[1].momentum is None and net.features[3][1].weight is None


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed", "untracked-train", "untracked-eval"])
def test_convert_same_outputs_grads_and_stats(mode, dtype):
    ref = trained_net(dtype)
    net = bnlab.convert(copy.deepcopy(ref))
    for model in (ref, net):
        set_mode(model, mode)
    for seed in (1, 2):  # two steps: running stats / num_batches_tracked evolve identically
        got, want = run(net, dtype, seed), run(ref, dtype, seed)
        for g, w in zip(got[:3], want[:3]):
            close(g, w, dtype)
        assert got[3].keys() == want[3].keys() and len(got[3]) == 16
        for n in want[3]:
            close(got[3][n], want[3][n], dtype)
        assert_state_equal(net, ref, dtype)
    nbt = net.block[1].num_batches_tracked.item()
    assert nbt == (5 if mode == "train" else 3) == ref.block[1].num_batches_tracked.item()


def test_optimizer_built_before_conversion_still_updates_model():
    ref, net = trained_net(), trained_net()
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        for m in (ref, net)
    ]
    frozen = net.features[0].weight.clone()
    bnlab.convert(net)
    for seed in range(3):
        step(ref, opts[0], seed=seed)
        step(net, opts[1], seed=seed)
    assert_state_equal(net, ref)
    assert not torch.equal(net.head[1].weight, trained_net().head[1].weight)
    assert torch.equal(net.features[0].weight, frozen)


def test_hooks_survive_conversion():
    net, calls = trained_net(), []
    net.features[1].register_forward_hook(lambda m, i, o: calls.append(("fwd", type(m))))
    net.features[1].register_forward_pre_hook(lambda m, i: calls.append(("pre", type(m))))
    net.norm.register_forward_hook(lambda m, i, o: o * 2)
    ref = copy.deepcopy(net)
    bnlab.convert(net)
    calls.clear()
    out = net(*inputs(F64))
    assert calls == [("pre", bnlab.nn.BatchNorm2d), ("fwd", bnlab.nn.BatchNorm2d)]
    close(out, ref(*inputs(F64)))


def test_hook_handle_removes_after_conversion():
    model, calls = nn.Sequential(nn.BatchNorm2d(3)), []
    handle = model[0].register_forward_hook(lambda m, i, o: calls.append(1))
    bnlab.convert(model)
    handle.remove()
    model(torch.randn(2, 3, 4, 4))
    assert calls == []


def test_shared_module_stays_shared():
    bn = nn.BatchNorm1d(4)
    model = bnlab.convert(nn.Sequential(bn, nn.ReLU(), bn))
    assert model[0] is model[2]


class MyBN(nn.BatchNorm2d):  # sets a BatchNorm2d up differently, computes the same
    def __init__(self, num_features):
        super().__init__(num_features, momentum=0.3)
        self.tag = "mine"


class MyForwardBN(nn.BatchNorm2d):  # computes something else: must not pass for its base
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "factory,reason",
    [
        (
            lambda: MyForwardBN(4),
            "a subclass of torch.nn.modules.batchnorm.BatchNorm2d that "
            "defines forward, which bnlab cannot take over",
        ),
        (lambda: nn.InstanceNorm2d(4), "no registered conversion"),
        (lambda: nn.LazyBatchNorm2d(), "no registered conversion"),
    ],
    ids=["subclass-forward", "instance", "lazy"],
)
def test_unconvertible_layers_left_and_reported(factory, reason):
    odd = factory()
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), odd))
    with pytest.warns(bnlab.ConversionWarning) as record:
        assert bnlab.convert(model) is model
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller
    msg, cls = str(record[0].message), type(odd)
    name = f"{cls.__module__}.{cls.__qualname__}"
    assert f"left 1 x {name} (1.1): {reason}" in msg, msg
    assert "left 1 normalization layer(s)" in msg
    assert model[1][1] is odd and type(odd) is cls and type(model[0]) is bnlab.nn.BatchNorm2d
    with pytest.warns(bnlab.ConversionWarning, match=re.escape(f"{name} (<root>)")):
        assert bnlab.convert(odd) is odd


def test_subclass_with_only_init_converts_as_its_base_and_reverts_to_itself():
    ref = nn.Sequential(MyBN(4)).to(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net, report = bnlab.convert(copy.deepcopy(ref), report=True)
    assert type(net[0]) is bnlab.nn.BatchNorm2d and net[0].tag == "mine"
    assert "converted as its base torch.nn.modules.batchnorm.BatchNorm2d" in str(report)
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    close(net(x), ref(x))
    assert_state_equal(net, ref)
    back = bnlab.revert(net)
    assert type(back[0]) is MyBN and back[0].momentum == 0.3 and back[0].tag == "mine"
    assert vars(back[0]).keys() == vars(ref[0]).keys()


def test_sync_batch_norm_converted_for_one_process_use_and_reverted():
    ref = nn.Sequential(nn.SyncBatchNorm(4, momentum=None)).to(F64)
    net = copy.deepcopy(ref)
    with pytest.warns(bnlab.ConversionWarning, match="one-process use") as record:
        bnlab.convert(net)
    assert len(
        record
    ) == 1 and "left 0 normalization layer(s) unchanged and converted 1 with a caveat" in str(
        record[0].message
    )
    assert type(net[0]) is bnlab.nn.BatchNorm
    for seed in range(2):
        x = torch.randn(3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))
        close(net(x), ref(x))
    assert_state_equal(net, ref)
    back = bnlab.revert(net)
    assert type(back[0]) is nn.SyncBatchNorm and back[0].process_group is None


# -------------------------------------------------------------------------------------- registry


class Scaled(nn.Module):
    """A third-party batch norm: BatchNorm2d's state under its own class."""

    def __init__(self, c):
        super().__init__()
        self.inner = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.inner(x)


class OwnBN(nn.Module):  # BatchNorm2d's parameters and buffers, not a torch.nn subclass
    def __init__(self, c):
        super().__init__()
        ref = nn.BatchNorm2d(c)
        self.__dict__.update({k: copy.copy(v) for k, v in vars(ref).items()})

    forward = nn.BatchNorm2d.forward
    _check_input_dim = nn.BatchNorm2d._check_input_dim


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry for the test (registrations are process-wide)."""
    module = importlib.import_module("bnlab.nn.convert")
    monkeypatch.setattr(module, "_REGISTRY", dict(module._REGISTRY))


@pytest.mark.parametrize("by", ["class", "name"])
def test_register_conversion_both_ways(registry, by):
    key = OwnBN if by == "class" else f"{OwnBN.__module__}.{OwnBN.__qualname__}"
    bnlab.nn.register_conversion(
        key, lambda m: bnlab.nn.rebuild(m, bnlab.nn.BatchNorm2d), bnlab.nn.rebuild
    )
    ref = nn.Sequential(OwnBN(3), nn.ReLU(), OwnBN(3)).to(F64)
    net, report = bnlab.convert(copy.deepcopy(ref), report=True)
    assert [type(m) for m in net] == [bnlab.nn.BatchNorm2d, nn.ReLU, bnlab.nn.BatchNorm2d]
    assert (report.num_converted, report.num_left) == (2, 0)
    assert list(report.converted) == [f"{OwnBN.__module__}.OwnBN"]
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    close(net(x), ref(x))
    assert_state_equal(net, ref)
    back, report = bnlab.revert(net, report=True)
    assert [type(m) for m in back] == [OwnBN, nn.ReLU, OwnBN] and report.num_converted == 2


def test_registered_class_without_revert_is_left_by_revert_and_reported(registry):
    bnlab.nn.register_conversion(OwnBN, lambda m: bnlab.nn.rebuild(m, bnlab.nn.BatchNorm2d))
    net = bnlab.convert(nn.Sequential(OwnBN(3)))
    with pytest.warns(bnlab.ConversionWarning, match=r"converted from .*OwnBN, no revert"):
        back, report = bnlab.revert(net, report=True)
    assert type(back[0]) is bnlab.nn.BatchNorm2d and report.num_left == 1


def test_exact_registration_overrides_base_class_rule(registry):
    bnlab.nn.register_conversion(MyForwardBN, lambda m: bnlab.nn.rebuild(m, Scaled))
    net = bnlab.convert(nn.Sequential(MyForwardBN(2)))
    assert type(net[0]) is Scaled


@pytest.mark.parametrize(
    "args,match",
    [
        (("BatchNorm2d", bnlab.nn.rebuild), "qualified name 'package.module.Class'"),
        ((int, bnlab.nn.rebuild), "nn.Module subclass"),
        ((OwnBN, "rebuild"), "to_bnlab must be callable, got str"),
        ((OwnBN, bnlab.nn.rebuild, 3), "to_original must be callable, got int"),
    ],
)
def test_register_conversion_rejects_bad_arguments(registry, args, match):
    with pytest.raises(TypeError, match=re.escape(match)):
        bnlab.nn.register_conversion(*args)


def test_report_groups_by_class_one_short_line_each():
    model = nn.Sequential(*[nn.BatchNorm2d(2) for _ in range(50)], nn.InstanceNorm1d(2))
    model.extend(nn.InstanceNorm1d(2) for _ in range(40))
    with pytest.warns(bnlab.ConversionWarning) as record:
        _, report = bnlab.convert(model, report=True)
    assert (report.num_converted, report.num_left) == (50, 41)
    assert [len(c.layers) for c in report.converted.values()] == [50]
    assert report.left["torch.nn.modules.instancenorm.InstanceNorm1d"].layers[:2] == ["50", "51"]
    text = str(report)
    assert len(text.splitlines()) == 3 and max(map(len, text.splitlines())) < 200, text
    assert "50 converted, 41 left" in text and "(0, 1, 2, ...)" in text
    msg = str(record[0].message)
    assert len(msg.splitlines()) == 2 and len(msg) < 300, msg


@pytest.mark.parametrize("cls", list(TO_BNLAB))
def test_root_layer_returns_new_bnlab_module(cls):
    old = cls(3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = bnlab.convert(old)
    assert type(new) is TO_BNLAB[cls] and new is not old and type(old) is cls
    assert not new.training and new.weight is old.weight and new.bias is old.bias
    if cls is not nn.LayerNorm:
        assert new.running_mean is old.running_mean
        assert new.num_batches_tracked is old.num_batches_tracked


@pytest.mark.parametrize(
    "make",
    [
        trained_net,
        lambda: nn.Sequential(nn.Linear(2, 2)),
        lambda: nn.Sequential(nn.GroupNorm(2, 4), nn.RMSNorm(4)),
    ],
)
def test_no_warning_when_nothing_to_report(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnlab.revert(bnlab.convert(make()))


# ----------------------------------------------------------------------------------------- revert


def test_revert_restores_torch_types_with_trained_state():
    net = bnlab.convert(trained_net())
    net.features[1].strict, net.norm.backend = True, "composite"
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for seed in range(2):
        step(net, opt, seed=seed)
    set_mode(net, "mixed")
    snapshot = copy.deepcopy(net)
    modes = {n: m.training for n, m in net.named_modules()}
    assert bnlab.revert(net) is net
    for n, m in snapshot.named_modules():
        new = net.get_submodule(n)
        assert type(new) is TO_TORCH.get(type(m), type(m)) and new.training == modes[n], n
        assert "strict" not in vars(new) and "backend" not in vars(new)
    assert repr(net) == repr(trained_net())
    assert_state_equal(net, snapshot)
    assert net.block[1].num_batches_tracked.item() == 5
    for mode in ("mixed", "train", "eval"):
        set_mode(net, mode)
        set_mode(snapshot, mode)
        close(net(*inputs(F64)), snapshot(*inputs(F64)))
        assert_state_equal(net, snapshot)


def test_revert_reports_rank_agnostic_batchnorm():
    generic = bnlab.nn.BatchNorm(3)
    model = nn.Sequential(bnlab.nn.BatchNorm2d(3), nn.Sequential(generic))
    with pytest.warns(
        bnlab.ConversionWarning,
        match=re.escape("left 1 x bnlab.nn.batchnorm.BatchNorm (1.0): no torch.nn counterpart"),
    ):
        bnlab.revert(model)
    assert model[1][0] is generic and type(model[0]) is nn.BatchNorm2d


def test_revert_of_convert_is_identity_on_state_and_repr():
    ref = trained_net()
    state, text = ref.state_dict(), repr(ref)
    net = bnlab.revert(bnlab.convert(copy.deepcopy(ref)))
    new = net.state_dict()
    assert repr(net) == text and list(new) == list(state) and new._metadata == state._metadata
    for k in state:
        assert torch.equal(new[k], state[k]) and new[k].dtype == state[k].dtype, k


# ------------------------------------------------------------------------------------ checkpoints

SHAPES = {
    nn.BatchNorm1d: (5, 4, 3),
    nn.BatchNorm2d: (5, 4, 3, 3),
    nn.BatchNorm3d: (3, 4, 2, 3, 3),
    nn.LayerNorm: (2, 5, 3, 4),
}
BOOLS = (True, False)
BN_COMBOS = [(c, a, t, b) for c in list(SHAPES)[:3] for a in BOOLS for t in BOOLS for b in BOOLS]
LN_COMBOS = [(nn.LayerNorm, a, True, b) for a in BOOLS for b in BOOLS]


def build(cls, affine, track, bias, **kw):
    if cls in (nn.LayerNorm, bnlab.nn.LayerNorm):
        return cls((3, 4), elementwise_affine=affine, bias=bias, **kw)
    return cls(4, momentum=0.2, affine=affine, track_running_stats=track, bias=bias, **kw)


def perturbed(cls, affine, track, bias):
    torch.manual_seed(3)
    m = build(cls, affine, track, bias, dtype=F64)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    for _ in range(2):
        m(torch.randn(SHAPES[cls], dtype=F64) * 3 + 1)
    return m


def save_load(module, path):
    torch.save(module.state_dict(), path)
    return torch.load(path)


def assert_same_behaviour(a, b, shape):
    for training in (False, True):
        a.train(training)
        b.train(training)
        x = torch.randn(shape, dtype=F64)
        close(a(x), b(x))
        assert_state_equal(a, b)


@pytest.mark.parametrize("cls,affine,track,bias", BN_COMBOS + LN_COMBOS)
def test_checkpoint_round_trip(cls, affine, track, bias, tmp_path):
    fresh_t, fresh_b = build(cls, affine, track, bias), build(TO_BNLAB[cls], affine, track, bias)
    st, sb = fresh_t.state_dict(), fresh_b.state_dict()
    assert [(k, v.shape, v.dtype) for k, v in st.items()] == [
        (k, v.shape, v.dtype) for k, v in sb.items()
    ]
    assert st._metadata == sb._metadata and repr(fresh_t) == repr(fresh_b)
    src = perturbed(cls, affine, track, bias)
    for i, target in enumerate((TO_BNLAB[cls], cls)):  # torch -> bnlab -> torch
        dst = build(target, affine, track, bias, dtype=F64)
        dst.load_state_dict(save_load(src, tmp_path / f"{i}.pt"), strict=True)
        assert type(dst) is target
        assert_state_equal(dst, src)
        assert_same_behaviour(dst, src, SHAPES[cls])
        src = dst


@pytest.mark.parametrize("version", [1, None])
@pytest.mark.parametrize("prefix", ["", "0."])
@pytest.mark.parametrize("cls", list(SHAPES)[:3])
def test_old_checkpoint_without_num_batches_tracked(cls, prefix, version, tmp_path):
    def wrap(m):
        return nn.Sequential(m) if prefix else m

    sd = save_load(wrap(perturbed(cls, True, True, True)), tmp_path / "old.pt")
    del sd[prefix + "num_batches_tracked"]
    meta = sd._metadata[prefix[:-1]]
    meta.pop("version") if version is None else meta.update(version=version)
    loaded = []
    for target in (cls, TO_BNLAB[cls]):
        m = wrap(build(target, True, True, True, dtype=F64))
        (m[0] if prefix else m).num_batches_tracked.fill_(7)
        m.load_state_dict(copy.deepcopy(sd), strict=True)
        loaded.append(m)
    assert_state_equal(loaded[1], loaded[0])
    assert loaded[1].state_dict()[prefix + "num_batches_tracked"].item() == 7
    meta["version"] = 2  # a current checkpoint must have the key
    for target in (cls, TO_BNLAB[cls]):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            wrap(build(target, True, True, True)).load_state_dict(copy.deepcopy(sd), strict=True)


@pytest.mark.parametrize(
    "cls,args,kwargs",
    [
        (nn.BatchNorm1d, (7,), {}),
        (nn.BatchNorm2d, (3, 1e-3, None), {"affine": False}),
        (nn.BatchNorm3d, (2,), {"track_running_stats": False, "bias": False, "momentum": 0.5}),
        (nn.LayerNorm, (4,), {}),
        (nn.LayerNorm, ([2, 3], 1e-6, False), {}),
        (nn.LayerNorm, ((2, 3),), {"bias": False}),
    ],
)
def test_repr_matches_torch(cls, args, kwargs):
    ours = TO_BNLAB[cls]
    assert repr(ours(*args, **kwargs)) == repr(cls(*args, **kwargs))
    assert repr(nn.Sequential(ours(*args, **kwargs))) == repr(nn.Sequential(cls(*args, **kwargs)))
    assert "backend='composite'" in repr(ours(*args, **kwargs, backend="composite"))


@pytest.mark.parametrize(
    "cls,affine,track,bias", [c for c in BN_COMBOS if c[0] is nn.BatchNorm2d] + LN_COMBOS
)
def test_reset_methods_match_torch(cls, affine, track, bias):
    t = perturbed(cls, affine, track, bias)
    b = bnlab.convert(copy.deepcopy(t))
    ids = {k: id(v) for k, v in b.state_dict(keep_vars=True).items()}
    if cls is not nn.LayerNorm:
        if track:
            assert t.num_batches_tracked.item() == 2 and t.running_var.ne(1).all()
        t.reset_running_stats()
        b.reset_running_stats()
        assert_state_equal(b, t)
        if affine:  # parameters untouched by reset_running_stats
            assert not torch.equal(b.weight, torch.ones_like(b.weight))
    t.reset_parameters()
    b.reset_parameters()
    assert_state_equal(b, t)
    assert_state_equal(b, build(cls, affine, track, bias, dtype=F64))
    assert ids == {k: id(v) for k, v in b.state_dict(keep_vars=True).items()}  # reset in place
