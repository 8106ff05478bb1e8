"""bnlab.interop against Keras 3 itself (its torch backend) and against Flax's formulas.

Flax (jax) is not installed here: ``flax_eval`` and ``flax_train_step`` below are NumPy copies of
flax.linen.BatchNorm's computation (flax/linen/normalization.py: ``_compute_stats`` with
``use_fast_variance=True``, the ``batch_stats`` update, ``_normalize``)."""

import ast
import math
import os
import pathlib

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported anywhere

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bnlab  # noqa: E402
import bnlab.interop as interop  # noqa: E402

# Keras 3.15's variables and convert_to_numpy call np.array on objects whose __array__ predates
# NumPy 2's copy keyword
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

EVAL_TOL = 1e-6  # the acceptance bar: a Keras layer's float32 eval output, reproduced

INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@pytest.fixture(scope="module")
def keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"Keras runs on {keras.backend.backend()!r} here, not torch")
    return keras


# --------------------------------------------------------------------------- helpers


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in INT_VIEW:
        return torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))
    return torch.equal(a, b)


def numpy_bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(a.view(f"i{a.itemsize}"), b.view(f"i{b.itemsize}"))
    )


def assert_state_bitwise(got: dict, want: dict):
    assert list(got) == list(want)
    for key in want:
        assert bitwise_equal(got[key], want[key]), key


def special_values(n: int, dtype, generator) -> torch.Tensor:
    """Random values with the awkward ones in front: -0.0, inf, the smallest subnormal, nan."""
    values = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)
    tiny = torch.finfo(dtype).smallest_normal / 4
    awkward = torch.tensor([-0.0, math.inf, tiny, math.nan], dtype=dtype)
    values[: min(n, 4)] = awkward[: min(n, 4)]
    return values


def randomized(layer: torch.nn.Module, seed: int = 0, awkward: bool = False) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(layer, name)
            if t is None:
                continue
            if awkward:
                t.copy_(special_values(t.numel(), t.dtype, g))
            elif name in ("weight", "running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * 1.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5)
        layer.num_batches_tracked.fill_(7)
    return layer


def keras_values(c: int, rng) -> dict:
    return {
        "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": rng.normal(0.0, 0.5, c).astype(np.float32),
        "moving_mean": rng.normal(0.0, 0.5, c).astype(np.float32),
        "moving_variance": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def keras_layer(keras, input_shape, rng, **config):
    layer = keras.layers.BatchNormalization(**config)
    layer.build(input_shape)
    values = keras_values(input_shape[layer.axis], rng)
    layer.set_weights([values[w.name] for w in layer.weights])
    return layer


def to_numpy(keras, y) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(y))


def torch_eval(layer: torch.nn.Module, x: np.ndarray, axis: int) -> np.ndarray:
    """The torch layer (channels on dim 1) on ``x`` whose channels are on ``axis``."""
    layer.eval()
    with torch.no_grad():
        y = layer(torch.from_numpy(x).movedim(axis, 1))
    return y.movedim(1, axis).numpy()


def flax_eval(x, variables, config) -> np.ndarray:
    """flax.linen.BatchNorm(**config).apply(variables, x, use_running_average=True), in NumPy."""
    return _flax_normalize(x, variables["batch_stats"]["mean"], variables["batch_stats"]["var"],
                           variables.get("params", {}), config)  # fmt: skip


def _flax_normalize(x, mean, var, params, config):
    shape = [1] * x.ndim
    shape[config["axis"]] = -1
    y = x - mean.reshape(shape)
    mul = (np.float32(1) / np.sqrt(var + np.float32(config["epsilon"]))).astype(np.float32)
    if "scale" in params:
        mul = mul * params["scale"]
    y = y * mul.reshape(shape)
    if "bias" in params:
        y = y + params["bias"].reshape(shape)
    return y


def flax_train_step(x, variables, config):
    """One training call of flax.linen.BatchNorm with mutable batch_stats, in NumPy: the output
    and the new batch_stats (decay ``momentum``, fast biased variance clipped at 0)."""
    axis = config["axis"] % x.ndim
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    mu, mu2 = x.mean(reduce), np.square(x).mean(reduce)
    var = np.maximum(np.float32(0), mu2 - np.square(mu))
    d = np.float32(config["momentum"])
    stats = variables["batch_stats"]
    new = {"mean": d * stats["mean"] + (1 - d) * mu, "var": d * stats["var"] + (1 - d) * var}
    return _flax_normalize(x, mu, var, variables.get("params", {}), config), new


def batch_variances(x: np.ndarray, axis: int):
    """(biased, unbiased) per-channel variances of ``x``, in float64."""
    x = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    return x.var(0), x.var(0, ddof=1)


# --------------------------------------------------------------------------- momentum


def test_momentum_converts_to_the_value_people_write():
    assert interop.momentum_to_torch(0.99) == 0.01
    assert interop.momentum_to_torch(0.9) == 0.1
    assert interop.momentum_to_torch(0.999) == 0.001
    assert interop.momentum_from_torch(0.1) == 0.9
    assert interop.momentum_from_torch(0.01) == 0.99
    assert interop.momentum_to_torch(1.0) == 0.0 and interop.momentum_to_torch(0) == 1.0
    # what plain float subtraction would give instead
    assert 1 - 0.99 != 0.01 and 1 - (1 - 0.1) != 0.1
    # NumPy scalars are numbers too, converted from the float they hold (float32's 0.99 is
    # 0.9900000095367432)
    assert interop.momentum_to_torch(np.float32(0.5)) == 0.5
    assert interop.momentum_to_torch(np.float32(0.99)) == 0.0099999904632568


@given(st.integers(0, 10**15))
def test_momentum_round_trips_for_15_decimals(k):
    value = float(f"0.{k:015d}")
    assert interop.momentum_from_torch(interop.momentum_to_torch(value)) == value
    assert interop.momentum_to_torch(interop.momentum_from_torch(value)) == value
    assert interop.momentum_to_torch(value) == pytest.approx(1 - value, abs=1e-15)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf])
def test_momentum_out_of_range(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interop.momentum_to_torch(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interop.momentum_from_torch(bad)


def test_momentum_none_and_wrong_types():
    with pytest.raises(ValueError, match="cumulative average"):
        interop.momentum_from_torch(None)
    with pytest.raises(TypeError, match="float"):
        interop.momentum_to_torch("0.99")
    with pytest.raises(TypeError, match="float"):
        interop.momentum_from_torch(True)


# --------------------------------------------------------------------------- round trips

LAYERS = {
    "bnlab2d": lambda **kw: bnlab.nn.BatchNorm2d(6, **kw),
    "torch2d": lambda **kw: torch.nn.BatchNorm2d(6, **kw),
    "bnlab1d": lambda **kw: bnlab.nn.BatchNorm1d(5, **kw),
    "torch3d": lambda **kw: torch.nn.BatchNorm3d(4, **kw),
}
AFFINE = {"affine": {}, "plain": {"affine": False}, "no_bias": {"bias": False}}


def _round_trip_grid():
    for layer in LAYERS:
        for affine in AFFINE:
            for dtype in (torch.float32, torch.float64):
                yield layer, affine, dtype


GRID = list(_round_trip_grid())


@pytest.mark.parametrize("to", ["keras", "flax"])
@pytest.mark.parametrize("layer, affine, dtype", GRID)
@pytest.mark.parametrize("awkward", [False, True], ids=["random", "awkward"])
def test_torch_round_trip_is_bitwise(to, layer, affine, dtype, awkward):
    source = randomized(
        LAYERS[layer](eps=1e-3, momentum=0.03, dtype=dtype, **AFFINE[affine]), awkward=awkward
    )
    if to == "keras":
        state, config = interop.to_keras(source)
        result = interop.from_keras(state, config)
    else:
        state, config = interop.to_flax(source)
        result = interop.from_flax(state, config)
    rebuilt = result.build(type(source))
    assert rebuilt.extra_repr() == source.extra_repr()
    want = dict(source.state_dict())
    want["num_batches_tracked"] = torch.tensor(0)  # Keras and Flax keep no count
    assert_state_bitwise(result.state_dict, want)
    assert_state_bitwise(dict(rebuilt.state_dict()), want)
    assert result.kwargs["momentum"] == 0.03 and result.kwargs["eps"] == 1e-3


def test_to_keras_names_and_config():
    source = randomized(bnlab.nn.BatchNorm2d(3))
    weights, config = interop.to_keras(source)
    assert list(weights) == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert config == {"axis": -1, "momentum": 0.9, "epsilon": 1e-5, "center": True, "scale": True}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in weights.values())
    weights["gamma"][0] = 123.0  # a copy, not a view of the layer's storage
    assert source.weight[0] != 123.0
    weights, config = interop.to_keras(bnlab.nn.BatchNorm1d(3, bias=False), axis=1)
    assert list(weights) == ["gamma", "moving_mean", "moving_variance"]
    assert config["center"] is False and config["scale"] is True and config["axis"] == 1


def test_to_flax_names_and_config():
    variables, config = interop.to_flax(randomized(torch.nn.BatchNorm2d(3)))
    assert {k: sorted(v) for k, v in variables.items()} == {
        "params": ["bias", "scale"],
        "batch_stats": ["mean", "var"],
    }
    assert config == {
        "axis": -1,
        "momentum": 0.9,
        "epsilon": 1e-5,
        "use_bias": True,
        "use_scale": True,
    }
    variables, config = interop.to_flax(torch.nn.BatchNorm2d(3, affine=False))
    assert list(variables) == ["batch_stats"] and not config["use_bias"] | config["use_scale"]


def test_sources_model_prefix_and_state_dict():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), bnlab.nn.BatchNorm2d(3, eps=1e-4))
    randomized(model[1])
    direct = interop.to_keras(model[1])
    for source, prefix in [(model, "1"), (model, "1."), (model.state_dict(), "1.")]:
        weights, config = interop.to_keras(source, prefix, eps=1e-4)
        assert config == direct.config
        assert all(numpy_bitwise_equal(weights[k], direct.weights[k]) for k in direct.weights)
    # a state dict carries no hyper-parameters: torch's defaults, or the arguments
    assert interop.to_keras(model.state_dict(), "1.").config["epsilon"] == 1e-5
    assert interop.to_flax(model[1], momentum=0.2).config["momentum"] == 0.8


@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False), (0, 0)])
@pytest.mark.parametrize("decay, epsilon", [(0.99, 1e-3), (0.9, 1e-5), (0.997, 0.02)])
def test_keras_round_trip_is_bitwise(center, scale, decay, epsilon):
    values = keras_values(5, np.random.default_rng(1))
    weights = {
        k: v for k, v in values.items() if (center or k != "beta") and (scale or k != "gamma")
    }
    config = {"momentum": decay, "epsilon": epsilon, "center": bool(center), "scale": bool(scale)}
    result = interop.from_keras(weights, config)
    layer = result.build(bnlab.nn.BatchNorm1d)
    # Keras scale=False: torch has no beta without gamma, so the weight is ones, frozen
    assert result.frozen == (() if scale or not center else ("weight",))
    back = interop.to_keras(layer, scale=None if scale or not center else False)
    assert back.config == {"axis": -1, **config}
    assert list(back.weights) == list(weights)
    assert all(numpy_bitwise_equal(back.weights[k], weights[k]) for k in weights)


@pytest.mark.parametrize(
    "use_bias, use_scale", [(True, True), (False, True), (True, False), (0, 0)]
)
@pytest.mark.parametrize("nnx", [False, True], ids=["linen", "nnx"])
def test_flax_round_trip_is_bitwise(use_bias, use_scale, nnx):
    v = keras_values(4, np.random.default_rng(2))
    params = {"scale": v["gamma"], "bias": v["beta"]}
    params = {k: a for k, a in params.items() if {"scale": use_scale, "bias": use_bias}[k]}
    stats = {"mean": v["moving_mean"], "var": v["moving_variance"]}
    variables = {**params, **stats} if nnx else {"params": params, "batch_stats": stats}
    config = {"momentum": 0.9, "epsilon": 1e-4, "use_bias": bool(use_bias)}
    config["use_scale"] = bool(use_scale)
    layer = interop.from_flax(variables, config).build()
    back = interop.to_flax(layer, use_scale=None if use_scale or not use_bias else False)
    assert back.config == {"axis": -1, **config}
    assert sorted(back.variables.get("params", {})) == sorted(params)
    for collection, arrays in (("params", params), ("batch_stats", stats)):
        for k, a in arrays.items():
            assert numpy_bitwise_equal(back.variables[collection][k], a)


def test_flax_nnx_variable_objects_are_read():
    class Variable:  # an nnx.Param / nnx.BatchStat: the array is .value
        def __init__(self, value):
            self.value = value

    v = keras_values(3, np.random.default_rng(3))
    state = {"scale": v["gamma"], "bias": v["beta"], "mean": v["moving_mean"]}
    state["var"] = v["moving_variance"]
    plain = interop.from_flax(state)
    wrapped = interop.from_flax({k: Variable(a) for k, a in state.items()})
    assert_state_bitwise(wrapped.state_dict, plain.state_dict)
    assert plain.kwargs["momentum"] == 0.01 and plain.kwargs["eps"] == 1e-5  # Flax's defaults


def test_from_keras_defaults_and_get_weights_list():
    v = keras_values(3, np.random.default_rng(4))
    result = interop.from_keras(v)
    assert result.kwargs == {
        "num_features": 3,
        "eps": 1e-3,
        "momentum": 0.01,
        "affine": True,
        "dtype": torch.float32,
    }
    listed = interop.from_keras([v["gamma"], v["moving_mean"], v["moving_variance"]], {"center": 0})
    assert listed.kwargs["bias"] is False and "bias" not in listed.state_dict
    assert bitwise_equal(listed.state_dict["weight"], torch.from_numpy(v["gamma"]))
    v["moving_mean"][0] = 99.0  # the result does not share the caller's arrays
    assert result.state_dict["running_mean"][0] != 99.0


# --------------------------------------------------------------------------- Keras itself

SHAPES = {"dense": (16, 5), "sequence": (6, 7, 4), "image": (4, 5, 6, 3), "volume": (2, 3, 4, 3, 2)}
TORCH_CLASSES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
TORCH_CLASSES[5] = torch.nn.BatchNorm3d
BNLAB_CLASSES = {2: bnlab.nn.BatchNorm1d, 3: bnlab.nn.BatchNorm1d, 4: bnlab.nn.BatchNorm2d}
BNLAB_CLASSES[5] = bnlab.nn.BatchNorm3d
KERAS_OPTIONS = {
    "defaults": {},
    "eps1e-5_m0.9": {"epsilon": 1e-5, "momentum": 0.9},
    "eps0.05": {"epsilon": 0.05},
}
FLAGS = {"both": {}, "no_center": {"center": False}, "no_scale": {"scale": False}}
FLAGS["neither"] = {"center": False, "scale": False}


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("options", KERAS_OPTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_keras_eval_is_reproduced(keras, shape, options, flags):
    rng = np.random.default_rng(5)
    input_shape = SHAPES[shape]
    layer = keras_layer(
        keras, (None, *input_shape[1:]), rng, **KERAS_OPTIONS[options], **FLAGS[flags]
    )
    x = (rng.normal(size=input_shape) * 1.5 + 0.3).astype(np.float32)
    want = to_numpy(keras, layer(x, training=False))
    rank = len(input_shape)
    default = interop.batch_norm_from_keras(layer)
    assert type(default) is BNLAB_CLASSES[rank]
    for cls in (None, BNLAB_CLASSES[rank], TORCH_CLASSES[rank], bnlab.nn.BatchNorm):
        built = interop.batch_norm_from_keras(layer, cls)
        assert built.eps == layer.epsilon
        assert built.momentum == interop.momentum_to_torch(layer.momentum)
        assert (built.weight is not None) == (layer.scale or layer.center)
        assert (built.bias is not None) == layer.center
        got = torch_eval(built, x, -1)
        np.testing.assert_allclose(got, want, rtol=0, atol=EVAL_TOL, err_msg=str(cls))


def test_keras_channels_first_needs_no_permutation(keras):
    rng = np.random.default_rng(6)
    layer = keras_layer(keras, (None, 3, 5, 6), rng, axis=1, epsilon=1e-4)
    x = rng.normal(size=(4, 3, 5, 6)).astype(np.float32)
    built = interop.batch_norm_from_keras(layer).eval()
    with torch.no_grad():
        got = built(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, to_numpy(keras, layer(x)), rtol=0, atol=EVAL_TOL)


def test_keras_get_weights_and_config_convert_as_the_layer(keras):
    layer = keras_layer(keras, (None, 4), np.random.default_rng(7), center=False, momentum=0.95)
    by_layer = interop.batch_norm_from_keras(layer)
    by_arrays = interop.from_keras(layer.get_weights(), layer.get_config()).build(
        bnlab.nn.BatchNorm1d
    )
    assert by_layer.extra_repr() == by_arrays.extra_repr()
    assert_state_bitwise(dict(by_layer.state_dict()), dict(by_arrays.state_dict()))


@pytest.mark.parametrize("shape", ["dense", "image"])
@pytest.mark.parametrize(
    "cls", [bnlab.nn.BatchNorm2d, torch.nn.BatchNorm2d], ids=["bnlab", "torch"]
)
@pytest.mark.parametrize("flags", ["both", "no_bias", "plain"])
def test_torch_eval_is_reproduced_by_keras(keras, shape, cls, flags):
    input_shape = SHAPES[shape]
    c = input_shape[-1]
    kwargs = {"both": {}, "no_bias": {"bias": False}, "plain": {"affine": False}}[flags]
    if shape == "dense":
        cls = {bnlab.nn.BatchNorm2d: bnlab.nn.BatchNorm1d}.get(cls, torch.nn.BatchNorm1d)
    source = randomized(cls(c, eps=1e-3, momentum=0.2, **kwargs), seed=8).eval()
    weights, config = interop.to_keras(source)
    layer = keras.layers.BatchNormalization(**config)
    layer.build((None, *input_shape[1:]))
    layer.set_weights(list(weights.values()))
    assert layer.momentum == 0.8 and layer.epsilon == 1e-3
    x = np.random.default_rng(9).normal(size=input_shape).astype(np.float32)
    want = torch_eval(source, x, -1)
    np.testing.assert_allclose(to_numpy(keras, layer(x)), want, rtol=0, atol=EVAL_TOL)


@pytest.mark.parametrize("options", ["defaults", "eps1e-5_m0.9"])
@pytest.mark.parametrize("shape", ["dense", "image"])
@pytest.mark.parametrize("cls", ["bnlab", "torch"])
def test_keras_training_step_continues_in_torch(keras, options, shape, cls):
    """One training batch from the same state: the same output and running mean; the running
    variance differs by exactly torch's unbiased correction, m * (var_unbiased - var_biased)."""
    rng = np.random.default_rng(10)
    input_shape = SHAPES[shape]
    layer = keras_layer(keras, (None, *input_shape[1:]), rng, **KERAS_OPTIONS[options])
    rank = len(input_shape)
    built = interop.batch_norm_from_keras(
        layer, (BNLAB_CLASSES if cls == "bnlab" else TORCH_CLASSES)[rank]
    ).train()
    x = (rng.normal(size=input_shape) + 0.5).astype(np.float32)
    want = to_numpy(keras, layer(x, training=True))
    with torch.no_grad():
        got = built(torch.from_numpy(x).movedim(-1, 1)).movedim(1, -1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    m = built.momentum
    biased, unbiased = batch_variances(x, -1)
    moving_mean = layer.moving_mean.numpy()
    moving_variance = layer.moving_variance.numpy()
    np.testing.assert_allclose(built.running_mean.numpy(), moving_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        built.running_var.numpy(), moving_variance + m * (unbiased - biased), rtol=1e-6, atol=1e-7
    )
    gap = built.running_var.numpy() - moving_variance  # the documented difference is real
    assert np.all(gap > 0)
    n = x.size / x.shape[-1]  # values per channel
    np.testing.assert_allclose(gap, m * biased / (n - 1), rtol=0, atol=5e-7)


@pytest.mark.parametrize(
    "cls", [bnlab.nn.BatchNorm1d, torch.nn.BatchNorm1d], ids=["bnlab", "torch"]
)
@pytest.mark.parametrize("center, scale", [(False, True), (True, False), (False, False)])
def test_keras_center_scale_map_to_torch_parameters(keras, cls, center, scale):
    layer = keras_layer(keras, (None, 3), np.random.default_rng(11), center=center, scale=scale)
    built = interop.batch_norm_from_keras(layer, cls)
    if not center and not scale:
        assert not built.affine and built.weight is None and built.bias is None
    elif not center:
        assert built.bias is None and built.weight.requires_grad
        assert bitwise_equal(built.weight.detach(), torch.from_numpy(layer.gamma.numpy()))
    else:  # no gamma: a weight of ones that does not train, as Keras has none
        assert torch.equal(built.weight, torch.ones(3)) and not built.weight.requires_grad
        assert built.bias.requires_grad


def test_keras_trainable_false_runs_on_running_statistics(keras):
    rng = np.random.default_rng(12)
    layer = keras_layer(keras, (None, 4), rng, trainable=False)
    built = interop.batch_norm_from_keras(layer)
    assert built.statistics == "running"
    assert not any(p.requires_grad for p in built.parameters())
    x = rng.normal(size=(8, 4)).astype(np.float32)
    want = to_numpy(keras, layer(x, training=True))  # Keras: inference mode all the same
    with torch.no_grad():
        got = built.train()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=EVAL_TOL)
    with pytest.warns(bnlab.ConversionWarning, match="trainable=False"):
        built = interop.batch_norm_from_keras(layer, torch.nn.BatchNorm1d)
    assert not any(p.requires_grad for p in built.parameters())


def test_keras_regularizers_are_named(keras):
    layer = keras.layers.BatchNormalization(gamma_regularizer="l2", beta_constraint="non_neg")
    layer.build((None, 3))
    with pytest.warns(bnlab.ConversionWarning, match="gamma_regularizer, beta_constraint"):
        interop.batch_norm_from_keras(layer)


def test_keras_layers_refused(keras):
    renorm = keras.layers.BatchNormalization(renorm=True)
    renorm.build((None, 3))
    with pytest.raises(ValueError, match="renorm=True"):
        interop.batch_norm_from_keras(renorm)
    named = {w.name: w for w in renorm.weights}
    with pytest.raises(ValueError, match="moving_stddev"):
        interop.from_keras(named)
    with pytest.raises(ValueError, match="renorm=True"):
        interop.from_keras(renorm.get_weights(), renorm.get_config())
    with pytest.raises(ValueError, match="not built"):
        interop.batch_norm_from_keras(keras.layers.BatchNormalization())
    with pytest.raises(TypeError, match="BatchNormalization"):
        interop.batch_norm_from_keras(keras.layers.Dense(3))
    image = keras_layer(keras, (None, 4, 4, 3), np.random.default_rng(13))
    with pytest.raises(ValueError, match=r"4-D input, BatchNorm1d takes 2 or 3-D"):
        interop.batch_norm_from_keras(image, torch.nn.BatchNorm1d)
    with pytest.raises(ValueError, match="4-D input"):
        interop.batch_norm_from_keras(image, bnlab.nn.BatchNorm3d)


# --------------------------------------------------------------------------- Flax's formulas


@pytest.mark.parametrize("shape", ["dense", "image"])
@pytest.mark.parametrize("affine", AFFINE)
def test_flax_eval_matches_torch_both_ways(shape, affine):
    input_shape = SHAPES[shape]
    c = input_shape[-1]
    cls = bnlab.nn.BatchNorm1d if shape == "dense" else bnlab.nn.BatchNorm2d
    source = randomized(cls(c, eps=1e-4, **AFFINE[affine]), seed=14)
    x = np.random.default_rng(15).normal(size=input_shape).astype(np.float32)
    variables, config = interop.to_flax(source)
    want = torch_eval(source, x, -1)
    np.testing.assert_allclose(flax_eval(x, variables, config), want, rtol=0, atol=EVAL_TOL)
    # and from Flax: a layer built from its variables evaluates as Flax does
    built = interop.from_flax(variables, config).build(cls)
    np.testing.assert_allclose(torch_eval(built, x, -1), flax_eval(x, variables, config),
                               rtol=0, atol=EVAL_TOL)  # fmt: skip


@pytest.mark.parametrize("decay", [0.99, 0.9])
@pytest.mark.parametrize("shape", ["dense", "image"])
def test_flax_training_step_continues_in_torch(decay, shape):
    input_shape = SHAPES[shape]
    v = keras_values(input_shape[-1], np.random.default_rng(16))
    variables = {
        "params": {"scale": v["gamma"], "bias": v["beta"]},
        "batch_stats": {"mean": v["moving_mean"], "var": v["moving_variance"]},
    }
    config = {"axis": -1, "momentum": decay, "epsilon": 1e-5}
    built = interop.from_flax(variables, config).build().train()
    x = (np.random.default_rng(17).normal(size=input_shape) + 0.5).astype(np.float32)
    want, stats = flax_train_step(x, variables, config)
    with torch.no_grad():
        got = built(torch.from_numpy(x).movedim(-1, 1)).movedim(1, -1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    biased, unbiased = batch_variances(x, -1)
    m = built.momentum
    assert m == interop.momentum_to_torch(decay)
    np.testing.assert_allclose(built.running_mean.numpy(), stats["mean"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        built.running_var.numpy(), stats["var"] + m * (unbiased - biased), rtol=1e-6, atol=1e-7
    )


# --------------------------------------------------------------------------- bad input


def test_from_keras_bad_input():
    v = keras_values(4, np.random.default_rng(18))
    with pytest.raises(ValueError, match=r"missing \['moving_variance'\]"):
        interop.from_keras({k: a for k, a in v.items() if k != "moving_variance"})
    with pytest.raises(ValueError, match=r"unexpected \['kernel'\]"):
        interop.from_keras({**v, "kernel": v["gamma"]})
    with pytest.raises(ValueError, match=r"shapes .*'gamma': \(3,\)"):
        interop.from_keras({**v, "gamma": v["gamma"][:3]})
    with pytest.raises(ValueError, match="1-D per-channel arrays"):
        interop.from_keras({**v, "moving_mean": v["moving_mean"].reshape(2, 2)})
    with pytest.raises(TypeError, match="floating-point"):
        interop.from_keras({**v, "beta": np.arange(4)})
    with pytest.raises(ValueError, match="4 arrays, got 3"):
        interop.from_keras(list(v.values())[1:])
    with pytest.raises(TypeError, match="get_weights"):
        interop.from_keras("gamma")
    with pytest.raises(ValueError, match="config center=False but beta is present"):
        interop.from_keras(v, {"center": False})
    with pytest.raises(ValueError, match="synchronized=True"):
        interop.from_keras(v, {"synchronized": True})
    with pytest.raises(ValueError, match="virtual_batch_size=4"):
        interop.from_keras(v, {"virtual_batch_size": 4})
    with pytest.raises(ValueError, match="several axes"):
        interop.from_keras(v, {"axis": [1, 2]})
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        interop.from_keras(v, epsilon=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interop.from_keras(v, momentum=1.01)


def test_to_keras_and_flax_bad_input():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="pass prefix="):
        interop.to_keras(model)
    with pytest.raises(ValueError, match="pass prefix="):
        interop.to_flax(model.state_dict())
    with pytest.raises(AttributeError):
        interop.to_keras(model, "2")
    with pytest.raises(ValueError, match="track_running_stats=False"):
        interop.to_keras(torch.nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="cumulative average"):
        interop.to_flax(torch.nn.BatchNorm1d(3, momentum=None))
    assert interop.to_flax(torch.nn.BatchNorm1d(3, momentum=None), momentum=0.25).config[
        "momentum"
    ] == pytest.approx(0.75)
    with pytest.raises(TypeError, match="state dict"):
        interop.to_keras(np.zeros(3))
    with pytest.raises(ValueError, match=r"shapes"):
        interop.to_keras({"running_mean": torch.zeros(3), "running_var": torch.ones(4)})
    trained = randomized(torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="scale=False drops the weight, which is not all 1"):
        interop.to_keras(trained, scale=False)
    with pytest.raises(ValueError, match="use_bias=False drops the bias, which is not all 0"):
        interop.to_flax(trained, use_bias=False)
    # wanted but absent: filled with the identity
    weights, config = interop.to_keras(torch.nn.BatchNorm1d(3, affine=False), center=True)
    assert config["center"] and not config["scale"] and np.all(weights["beta"] == 0)


def test_from_flax_bad_input():
    v = keras_values(4, np.random.default_rng(19))
    stats = {"mean": v["moving_mean"], "var": v["moving_variance"]}
    with pytest.raises(ValueError, match="'batch_stats'"):
        interop.from_flax({"params": {"scale": v["gamma"]}})
    with pytest.raises(ValueError, match=r"missing \['var'\]"):
        interop.from_flax({"batch_stats": {"mean": v["moving_mean"]}})
    with pytest.raises(ValueError, match="BatchNorm_0"):
        interop.from_flax({"batch_stats": {"BatchNorm_0": stats}})
    with pytest.raises(ValueError, match=r"unexpected \['kernel'\]"):
        interop.from_flax({"params": {"kernel": v["gamma"]}, "batch_stats": stats})
    with pytest.raises(ValueError, match="several feature axes"):
        interop.from_flax({"batch_stats": stats}, {"axis": (1, 2)})
    with pytest.raises(ValueError, match="1-D per-channel"):
        interop.from_flax({"batch_stats": {k: a.reshape(2, 2) for k, a in stats.items()}})
    with pytest.raises(ValueError, match="use_scale=True but scale is absent"):
        interop.from_flax({"batch_stats": stats}, {"use_scale": True})
    with pytest.raises(TypeError, match="expected a dict"):
        interop.from_flax([stats])


def test_module_imports_neither_keras_nor_flax():
    """Keras and Flax stay optional: bnlab.interop reads their objects by duck typing."""
    tree = ast.parse(pathlib.Path(interop.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}  # fmt: skip
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}  # fmt: skip
    assert not imported & {"keras", "flax", "jax", "tensorflow"}
