"""torch.func through bnlab's layers: vmap, grad, jacrev and functional_call work exactly where
they work through torch.nn's (same results), and fail where torch.nn's fail."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import bnlab
import bnlab.nn as bn


def pair(kind: str):
    """(torch.nn module, bnlab module) with equal state."""
    torch.manual_seed(0)
    if kind == "bn2d":
        reference = nn.BatchNorm2d(4)
    elif kind == "bn2d-cumulative":
        reference = nn.BatchNorm2d(4, momentum=None)
    elif kind == "bn1d":
        reference = nn.BatchNorm1d(4)
    elif kind == "act":
        reference = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    elif kind == "ln":
        reference = nn.LayerNorm([4, 5, 5])
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(0.5, 1.5)
    if kind == "act":
        ours = bn.BatchNormAct2d(4, activation="relu")
        ours.load_state_dict(reference[0].state_dict())
    else:
        ours = bnlab.convert(copy.deepcopy(reference))
    return reference.double(), ours.double()


def example(kind: str, n: int = 6) -> torch.Tensor:
    shape = (n, 4) if kind == "bn1d" else (n, 4, 5, 5)
    return torch.randn(*shape, dtype=torch.float64) * 2 + 1


def per_sample_vmap(model, x):
    return vmap(model)(x.unsqueeze(1))  # batches of 1: only eval can do this


def batch_vmap(model, x):
    return vmap(model)(torch.stack([x, x.flip(0)]))


def input_grad(model, x):
    return grad(lambda t: model(t).square().sum())(x)


def input_jacobian(model, x):
    return jacrev(model)(x[:2])


def param_grad_with_buffers(model, x):
    """The pattern torch.nn supports in training: buffers passed in as transform inputs."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def loss(p, b):
        return functional_call(model, (p, b), (x,)).square().sum()

    return grad(loss)(params, buffers)


TRANSFORMS = [per_sample_vmap, batch_vmap, input_grad, input_jacobian, param_grad_with_buffers]


def outcome(fn, model, x):
    try:
        return "ok", fn(model, x)
    except Exception as error:  # which error: the comparison is the point
        return "error", type(error).__name__


@pytest.mark.parametrize("kind", ["bn2d", "bn2d-cumulative", "bn1d", "act", "ln"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda f: f.__name__)
def test_transforms_work_where_torch_nn_works(kind, training, transform):
    reference, ours = pair(kind)
    reference.train(training)
    ours.train(training)
    x = example(kind)
    expected, actual = outcome(transform, reference, x), outcome(transform, ours, x)
    assert actual[0] == expected[0], f"torch.nn: {expected}, bnlab: {actual}"
    if expected[0] == "ok":
        torch.testing.assert_close(by_leaf(actual[1]), by_leaf(expected[1]), rtol=1e-9, atol=1e-9)
        for (name, a), (_, b) in zip(reference.named_buffers(), ours.named_buffers()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


def by_leaf(result):
    """Gradients keyed by parameter name without the module path (a Sequential's '0.weight' is a
    fused module's 'weight')."""
    if isinstance(result, dict):
        return {key.rpartition(".")[2]: value for key, value in result.items()}
    if isinstance(result, tuple):
        return tuple(by_leaf(r) for r in result)
    return result


@pytest.mark.parametrize("kind", ["bn2d", "act"])
def test_replace_all_batch_norm_modules_covers_bnlab_layers(kind):
    reference, ours = pair(kind)
    for model in (reference, ours):
        model.train()
        bn.replace_all_batch_norm_modules_(model)
    assert not any(b is not None for b in ours.buffers())
    x = example(kind)
    per_sample = lambda m: vmap(lambda t: m(t.unsqueeze(0)).squeeze(0))(x)  # noqa: E731
    torch.testing.assert_close(per_sample(ours), per_sample(reference), rtol=1e-9, atol=1e-9)


def test_masked_batch_norm_under_a_transform_says_so():
    norm = bn.BatchNorm1d(3).double()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    mask = torch.ones(5, 4, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="mask.*torch.func"):
        vmap(lambda t: norm(t, mask=mask))(x)
