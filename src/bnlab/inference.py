"""Inference as Algorithm 2 (Ioffe & Szegedy 2015): population statistics, freezing and folding.

At inference the output must depend on the input alone. This module turns a trained network's
batch-norm layers into exactly that:

- :func:`population_statistics` replaces the running (EMA) statistics by Algorithm 2's exact
  averages over given batches ("precise BN");
- :func:`freeze` makes every batch norm a fixed affine layer (:class:`bnlab.nn.FrozenBatchNorm`);
- :func:`fold` folds every batch norm into the adjacent Linear / Conv / ConvTranspose, in float64,
  and reports the error it made; what cannot be folded is frozen, with the reason.

It works on bnlab's batch norms and on torch.nn's alike, and never re-implements normalization:
folding is algebra on the layers' weights, population statistics are accumulated from the inputs
the layers see.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_flatten

from .kernels.composite import batch_statistics
from .nn import BatchNorm as _BnlabBatchNorm
from .nn.convert import replace_modules
from .nn.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .statistics import merge_statistics

__all__ = [
    "population_statistics",
    "PopulationReport",
    "freeze",
    "fold",
    "FoldReport",
    "batch_norm_layers",
]

BATCH_NORMS = (_BnlabBatchNorm, nn.modules.batchnorm._BatchNorm)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def batch_norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every batch-norm layer (bnlab's or torch.nn's) of ``model``, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)}


def _require_batch_norms(model: nn.Module, what: str) -> dict[str, nn.Module]:
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no batch-norm layer (bnlab or torch.nn)")
    return layers


# --------------------------------------------------------------------------------------------
# population statistics (Algorithm 2, steps 8-10)
# --------------------------------------------------------------------------------------------


@dataclass
class PopulationReport:
    """What :func:`population_statistics` did.

    Attributes:
        batches: batches run through the model (on this process).
        skipped: of those, batches left out because some layer saw non-finite statistics.
        values: per updated layer, the number of values per channel its statistics averaged over
            (over all processes).
        untouched: layers left as they were, with the reason.
        variance: "batch" (Algorithm 2's mean of per-batch variances) or "population".
    """

    batches: int = 0
    skipped: int = 0
    values: dict[str, int] = field(default_factory=dict)
    untouched: dict[str, str] = field(default_factory=dict)
    variance: str = "batch"


class _Moments:
    """Streaming per-channel moments of one layer's input, merged with Chan's formula, in float64.

    Per batch b with m_b values per channel, mean mu_b and biased variance v_b:
    n = sum m_b; mean = sum m_b mu_b / n; M2 = sum of squared deviations from the overall mean
    (the population variance is M2 / (n - 1)); W = sum m_b v_b and dof = sum (m_b - 1) give
    Algorithm 2's m/(m-1) E_B[v_B] as W / dof (exactly so for equal batch sizes).
    Updates are masked by a device-side "batch is finite" flag: no host synchronisation per batch.
    """

    def __init__(self, channels: int, device) -> None:
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        self.n, self.mean, self.m2, self.w, self.dof = z, z.clone(), z.clone(), z.clone(), z.clone()
        self.pending: Optional[tuple[Tensor, Tensor, Tensor]] = None

    def observe(self, x: Tensor) -> None:
        mean, var = batch_statistics(x.detach().to(torch.float64))
        m = torch.full_like(mean, x.numel() // x.shape[1])
        self.pending = (m, mean, var)

    def finite(self) -> Tensor:
        _, mean, var = self.pending
        return torch.isfinite(mean).all() & torch.isfinite(var).all()

    def commit(self, keep: Tensor) -> None:
        m, mu, var = self.pending
        self.pending = None
        merged = _merged((self.n, self.mean, self.m2), (m, mu, m * var))
        new = (
            *merged,
            self.w + m * var,
            self.dof + (m - 1).clamp(min=0),
        )  # m = 0: a step not reached
        old = (self.n, self.mean, self.m2, self.w, self.dof)
        self.n, self.mean, self.m2, self.w, self.dof = (
            torch.where(keep, a, b) for a, b in zip(new, old)
        )

    def merge(self, other: "_Moments") -> None:
        self.n, self.mean, self.m2 = _merged(
            (self.n, self.mean, self.m2), (other.n, other.mean, other.m2)
        )
        self.w, self.dof = self.w + other.w, self.dof + other.dof

    def variance(self, kind: str) -> Tensor:
        return self.w / self.dof if kind == "batch" else self.m2 / (self.n - 1)


def _merged(a, b):
    """Two (count, mean, M2) summaries, counts per channel, as one (Chan's merge)."""
    return merge_statistics(*(torch.stack(parts) for parts in zip(a, b)))


@torch.no_grad()
def population_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    variance: str = "batch",
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> PopulationReport:
    """Replace every batch norm's running statistics by Algorithm 2's exact population statistics.

    For each layer, over the inputs it sees in the given batches (the network as in training:
    every batch norm normalizes with its batch's statistics; other modules keep their mode)::

        E[x]   = sum_B m_B mu_B / sum_B m_B                      (= E_B[mu_B] for equal m)
        Var[x] = sum_B m_B var_B / sum_B (m_B - 1)               ("batch": = m/(m-1) E_B[var_B])
               or the unbiased variance of all values together   ("population")

    Args:
        model: a network with bnlab or torch.nn batch norms (tracking running statistics).
        batches: an iterable of inputs; each is passed as ``model(batch)``, ``model(*batch)`` for a
            tuple/list, ``model(**batch)`` for a dict, unless ``forward(model, batch)`` is given.
        variance: "batch" (Algorithm 2) or "population".
        forward: optional custom call.

    Returns:
        a :class:`PopulationReport`. Batches in which any layer sees a non-finite statistic are
        skipped whole and counted. Under torch.distributed, every process must call this with its
        own batches; statistics are combined across processes, weighted by count.

    Details: one forward per batch; moments in float64, merged with Chan's formula; the model's
    mode, parameters and other buffers (num_batches_tracked included) are left as found.

    One batch (the batches concatenated) gives statistics that every layer normalized with in that
    forward, so they describe the inputs the layers get in eval mode; an average over batches
    describes inputs computed with each batch's own statistics upstream. The two differ little in
    most networks, but can in a recurrent net with per-step statistics whose early steps' batch
    statistics are noisy (see :class:`bnlab.nn.BNLSTM`).
    """
    if variance not in ("batch", "population"):
        raise ValueError(f"variance must be 'batch' or 'population', got {variance!r}")
    layers = batch_norm_layers(model)
    cells = _RecurrentCells(model)
    if not layers and not cells.cells:
        raise ValueError(
            "population_statistics: the model has no batch-norm layer (bnlab or torch.nn)"
        )
    report = PopulationReport(variance=variance)
    tracked = {}
    for name, bn in layers.items():
        if getattr(bn, "running_mean", None) is None:
            report.untouched[name] = "no running statistics (track_running_stats=False)"
        else:
            tracked[name] = bn
    modes = {m: m.training for m in model.modules()}
    strict = {bn: bn.strict for bn in tracked.values() if getattr(bn, "strict", False)}
    saved = {name: {k: v.clone() for k, v in bn.named_buffers()} for name, bn in tracked.items()}
    moments = {
        name: _Moments(bn.num_features, bn.running_mean.device) for name, bn in tracked.items()
    }
    calls: dict[str, int] = {}
    hooks = [
        bn.register_forward_pre_hook(_observer(name, moments[name], calls))
        for name, bn in tracked.items()
    ]
    skipped = None
    try:
        cells.begin()
        for bn in tracked.values():
            bn.train()
        for bn in strict:  # non-finite batches are skipped and counted here, not raised
            bn.strict = False
        for batch in batches:
            calls.clear()
            cells.start_batch()
            (forward or _call)(model, batch)
            report.batches += 1
            seen = [name for name in tracked if calls.get(name)]
            shared = [name for name in seen if calls[name] > 1]
            if shared:
                raise ValueError(
                    f"batch-norm layer(s) {shared} ran more than once in one forward (a module "
                    "shared by several call sites): its statistics per site are ambiguous; give "
                    "each site its own module"
                )
            seen_moments = [moments[name] for name in seen] + cells.observed()
            if not seen_moments:
                continue
            finite = _all_finite(seen_moments)  # on the device, no sync
            for mom in seen_moments:
                mom.commit(finite.to(mom.n.device))
            skipped = (~finite).long() if skipped is None else skipped + (~finite).long()
    finally:
        cells.end()
        for h in hooks:
            h.remove()
        for module, mode in modes.items():
            module.train(mode)
        for bn, value in strict.items():
            bn.strict = value
        for name, bn in tracked.items():
            for key, value in saved[name].items():
                getattr(bn, key).copy_(value)
    report.skipped = int(skipped) if skipped is not None else 0
    _all_processes({**moments, **cells.moments})
    cells.write(report, variance)
    for name, bn in tracked.items():
        mom = moments[name]
        count = int(mom.n[0]) if mom.n.numel() else 0
        if count < 2:
            report.untouched[name] = "saw fewer than 2 values per channel"
            continue
        bn.running_mean.copy_(mom.mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(mom.variance(variance).to(bn.running_var.dtype))
        report.values[name] = count
    return report


class _StepMoments(_Moments):
    """Per-step moments of one of a BNLSTMCell's normalized terms, as (max_length * F) channels, fed
    the batch statistics the cell reports; steps a batch does not reach count 0 values."""

    def __init__(self, steps: int, features: int, device) -> None:
        super().__init__(steps * features, device)
        self.shape = (steps, features)

    def start(self) -> None:
        z = torch.zeros(self.shape, dtype=torch.float64, device=self.n.device)
        self.pending = (z, z.clone(), z.clone())
        self.reached = False

    def observe_statistics(self, t0: int, mean: Tensor, var: Tensor, count: int) -> None:
        m, mu, v = self.pending
        rows = slice(t0, t0 + mean.shape[0])
        m[rows], mu[rows], v[rows] = count, mean.detach().double(), var.detach().double()
        self.reached = True

    def commit(self, keep: Tensor) -> None:
        self.pending = tuple(p.reshape(-1) for p in self.pending)
        super().commit(keep)


class _RecurrentCells:
    """Population statistics per time step for the model's :class:`bnlab.nn.BNLSTMCell` layers: each
    cell reports its training batch statistics (``cell.observer``); they are merged per step."""

    def __init__(self, model: nn.Module) -> None:
        from .nn.bnlstm import BNLSTMCell

        self.cells = {name: m for name, m in model.named_modules() if isinstance(m, BNLSTMCell)}
        self.moments: dict[str, _StepMoments] = {}
        for name, cell in self.cells.items():
            device = cell.running_mean_x.device
            for which in "xhc":
                features = getattr(cell, f"running_mean_{which}").shape[1]
                self.moments[f"{name}.{which}"] = _StepMoments(cell.max_length, features, device)
        self.saved = {
            name: {k: v.clone() for k, v in cell.named_buffers()}
            for name, cell in self.cells.items()
        }

    def begin(self) -> None:
        for name, cell in self.cells.items():
            cell.train()
            cell.observer = lambda which, t0, mean, var, count, name=name: self.moments[
                f"{name}.{which}"
            ].observe_statistics(t0, mean, var, count)

    def start_batch(self) -> None:
        for mom in self.moments.values():
            mom.start()

    def observed(self) -> list[_StepMoments]:
        return [mom for mom in self.moments.values() if mom.reached]

    def end(self) -> None:
        for name, cell in self.cells.items():
            cell.observer = None
            for key, value in self.saved[name].items():
                getattr(cell, key).copy_(value)

    def write(self, report: PopulationReport, variance: str) -> None:
        """Each step's population mean and variance into its row of the running buffers; steps
        that saw fewer than 2 values keep theirs (and are reported)."""
        for key, mom in self.moments.items():
            name, which = key.rsplit(".", 1)
            cell = self.cells[name]
            count = mom.n.view(mom.shape)[:, 0]
            rows = count >= 2
            if not bool(rows.any()):
                report.untouched[key] = "saw fewer than 2 values at every step"
                continue
            for buffer, value in (
                ("running_mean", mom.mean),
                ("running_var", mom.variance(variance)),
            ):
                target = getattr(cell, f"{buffer}_{which}")
                target[rows] = value.view(mom.shape)[rows].to(target.dtype)
            report.values[key] = int(count[rows].min())
            if not bool(rows.all()):
                missed = (~rows).nonzero().flatten().tolist()
                report.untouched[key] = (
                    f"steps {missed[0]}..{missed[-1]} ({len(missed)} steps) saw fewer "
                    "than 2 values: their statistics are left as they were"
                )


def _all_finite(moments: list[_Moments]) -> Tensor:
    flags = [m.finite() for m in moments]
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def _observer(name: str, moments: _Moments, calls: dict):
    def hook(module, args):
        calls[name] = calls.get(name, 0) + 1
        moments.observe(args[0])

    return hook


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _all_processes(moments: dict[str, _Moments]) -> None:
    """Merge every layer's moments over all processes of the default group (weighted by count)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for mom in moments.values():
        local = torch.stack([mom.n, mom.mean, mom.m2, mom.w, mom.dof])  # (5, C)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        total = _Moments(local.shape[1], local.device)
        for n, mean, m2, w, dof in gathered:
            part = _Moments(local.shape[1], local.device)
            part.n, part.mean, part.m2, part.w, part.dof = n, mean, m2, w, dof
            total.merge(part)
        mom.n, mom.mean, mom.m2, mom.w, mom.dof = total.n, total.mean, total.m2, total.w, total.dof


# --------------------------------------------------------------------------------------------
# freeze (Algorithm 2, step 11, as a layer)
# --------------------------------------------------------------------------------------------

_FROZEN_CLASS = {
    "BatchNorm1d": FrozenBatchNorm1d,
    "BatchNorm2d": FrozenBatchNorm2d,
    "BatchNorm3d": FrozenBatchNorm3d,
}


def _frozen_class(bn: nn.Module) -> type:
    """FrozenBatchNorm{1,2,3}d for (subclasses of) bnlab's or torch's BatchNorm{1,2,3}d."""
    for cls in type(bn).__mro__:
        if cls.__name__ in _FROZEN_CLASS:
            return _FROZEN_CLASS[cls.__name__]
    return FrozenBatchNorm


def _check_frozen_statistics(name: str, bn: nn.Module) -> None:
    if getattr(bn, "running_mean", None) is None:
        raise ValueError(
            f"cannot freeze batch-norm layer {name!r}: it has no running statistics "
            "(track_running_stats=False)"
        )
    for key in ("running_mean", "running_var"):
        bad = ~torch.isfinite(getattr(bn, key))
        if bool(bad.any()):
            raise ValueError(
                f"batch-norm layer {name!r} has non-finite {key} in channels "
                f"{bad.nonzero().flatten().tolist()[:20]}: refusing to build a wrong inference "
                "model"
            )


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch norm of ``model`` by a :class:`bnlab.nn.FrozenBatchNorm`, in place.

    The frozen layer is the fixed affine map of Algorithm 2 with the layer's running statistics,
    gamma and beta, in torchvision's FrozenBatchNorm2d ``state_dict`` format. Returns the model (a
    new module when ``model`` itself is a batch norm). Raises ValueError for a model without batch
    norm, a layer without running statistics, or non-finite running statistics.
    """
    layers = _require_batch_norms(model, "freeze")
    for name, bn in layers.items():
        _check_frozen_statistics(name, bn)
    if "" in layers:
        return _frozen_class(model).from_batch_norm(model)
    _replace_modules(
        model, {id(bn): _frozen_class(bn).from_batch_norm(bn) for bn in layers.values()}
    )
    return model


def _replace_modules(model: nn.Module, replacement: dict[int, nn.Module]) -> None:
    """Swap modules by identity, at every place they appear (a shared layer stays shared)."""
    replace_modules(model, lambda module, _name: replacement.get(id(module), module))


# --------------------------------------------------------------------------------------------
# fold (Algorithm 2, step 11, folded into the adjacent linear layer)
# --------------------------------------------------------------------------------------------


@dataclass
class FoldReport:
    """What :func:`fold` did.

    Attributes:
        folded: (batch-norm name, layer name, "after" | "before"): the BN followed or preceded the
            layer it was folded into.
        frozen: batch-norm name -> why it could not be folded (it became a FrozenBatchNorm).
        max_abs_error: max |folded(x) - model(x)| on the example input, in the model's dtype.
    """

    folded: list[tuple[str, str, str]] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)
    max_abs_error: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"folded {len(self.folded)}, frozen {len(self.frozen)}, "
            f"max abs error on the example input {self.max_abs_error:.3g}"
        ]
        lines += [f"  {bn} -> {layer} (BN {side} it)" for bn, layer, side in self.folded]
        lines += [f"  {bn} frozen: {why}" for bn, why in self.frozen.items()]
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """Keeps torch.nn's layers and bnlab's normalization layers (bnlab.nn) as call_module nodes;
    traces through every other module, bnlab's own containers included."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return type(m).__module__.startswith("bnlab.nn.") or super().is_leaf_module(
            m, qualified_name
        )


def fold(model: nn.Module, example_input: Any) -> tuple[fx.GraphModule, FoldReport]:
    """Fold every batch norm of an eval-mode ``model`` into its adjacent Linear/Conv/ConvTranspose.

    With s = gamma / sqrt(running_var + eps) and t = beta - running_mean * s (Algorithm 2):

    - BN after a layer (its output used by the BN alone): W' = s W and b' = s b + t, per output
      channel (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d; any groups, dilation, stride);
    - BN before a Linear or Conv (the BN's output used by it alone): W' = W s over input channels
      and b' = b + W t summed over inputs and kernel; only where padding cannot break it (no zero
      padding: padding 0, or a reflect/replicate/circular padding mode);
    - otherwise the BN is frozen (a FrozenBatchNorm), and the reason reported.

    The model is traced with torch.fx and copied: ``model`` itself is left as it is. Weights are
    folded in float64 and cast back.

    Args:
        model: in eval mode, traceable by torch.fx.
        example_input: a tensor, or a tuple of positional inputs, run through both models to find
            shapes and measure the folding error.

    Returns:
        (the folded GraphModule, a :class:`FoldReport`).
    """
    layers = _require_batch_norms(model, "fold")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fold needs a model in eval mode (call model.eval()); in training: {training[:5]}"
        )
    for name, bn in layers.items():
        _check_frozen_statistics(name, bn)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    gm = _trace(copy.deepcopy(model))
    try:
        ShapeProp(gm).propagate(*inputs)
    except Exception as error:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in inputs]
        raise ValueError(
            f"the example input {shapes} could not run through the model: {error}"
        ) from error
    report = FoldReport()
    modules = dict(gm.named_modules())
    sites = _call_sites(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], BATCH_NORMS):
            _fold_or_freeze(gm, node, modules, sites, report)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()  # folded BNs must not linger in state_dict / named_modules
    _freeze_untraced(gm, report)
    gm.graph.lint()
    gm.recompile()
    report.max_abs_error = _max_abs_difference(model(*inputs), gm(*inputs))
    return gm, report


def _freeze_untraced(gm: fx.GraphModule, report: FoldReport) -> None:
    """BNs the trace did not reach as calls (inside a module kept whole) are frozen, and listed."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, bn in batch_norm_layers(gm).items():
        if name not in called and name not in report.frozen:
            _replace_modules(gm, {id(bn): _frozen_class(bn).from_batch_norm(bn)})
            report.frozen[name] = (
                "inside a module the fx trace keeps whole (not a call in the graph)"
            )


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as error:
        raise ValueError(f"fold needs a model torch.fx can trace symbolically: {error}") from error
    return fx.GraphModule(model, graph)


def _call_sites(gm: fx.GraphModule) -> dict[str, int]:
    sites: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites[node.target] = sites.get(node.target, 0) + 1
    return sites


def _fold_or_freeze(gm, node, modules, sites, report: FoldReport) -> None:
    bn = modules[node.target]
    if sites[node.target] > 1:
        reason = f"shared by {sites[node.target]} call sites"
    else:
        scale, shift = FrozenBatchNorm.from_batch_norm(bn).scale_and_shift(torch.float64)
        layer_node, side, reason = _fold_partner(node, modules, sites)
        if layer_node is not None:
            layer = modules[layer_node.target]
            (_fold_after if side == "after" else _fold_before)(layer, scale, shift)
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            report.folded.append((node.target, layer_node.target, side))
            return
    _replace_modules(gm, {id(bn): _frozen_class(bn).from_batch_norm(bn)})
    report.frozen[node.target] = reason


def _fold_partner(node, modules, sites):
    """(layer node, "after" | "before", None) to fold the BN at ``node`` into; (None, None, why)."""
    producer = node.args[0]
    if isinstance(producer, fx.Node) and producer.op == "call_module":
        layer = modules[producer.target]
        why = _why_not_after(layer, producer, sites)
        if why is None:
            return producer, "after", None
    else:
        why = "its input does not come from a layer"
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None, None, f"cannot fold after ({why}); its output is not used by exactly one layer"
    consumer = users[0]
    why_before = _why_not_before(modules[consumer.target], consumer, node, sites)
    if why_before is None:
        return consumer, "before", None
    return None, None, f"cannot fold after ({why}) or before ({why_before})"


def _why_not_after(layer, producer, sites) -> Optional[str]:
    if not isinstance(layer, (nn.Linear, *_CONV, *_CONV_TRANSPOSE)):
        return f"{type(layer).__name__} is not a Linear/Conv/ConvTranspose"
    if len(producer.users) != 1:
        return f"the output of {producer.target} is also used elsewhere"
    if sites[producer.target] > 1:
        return f"{producer.target} is shared by {sites[producer.target]} call sites"
    if isinstance(layer, nn.Linear) and _rank(producer) != 2:
        return "a Linear's features are not on dim 1 of a rank-3+ output"
    return None


def _why_not_before(layer, consumer, bn_node, sites) -> Optional[str]:
    if not isinstance(layer, (nn.Linear, *_CONV)):
        return f"{type(layer).__name__} is not a Linear/Conv"
    if consumer.args[0] is not bn_node or len(consumer.args) != 1 or consumer.kwargs:
        return f"{consumer.target} takes more than the BN's output"
    if sites[consumer.target] > 1:
        return f"{consumer.target} is shared by {sites[consumer.target]} call sites"
    if isinstance(layer, nn.Linear) and _rank(bn_node) != 2:
        return "a Linear's features are not on dim 1 of a rank-3+ input"
    if isinstance(layer, _CONV) and layer.padding_mode == "zeros" and _pads(layer):
        return f"{consumer.target} zero-pads its input, where a folded shift would be wrong"
    return None


def _rank(node: fx.Node) -> int:
    return len(node.meta["tensor_meta"].shape)


def _pads(conv: nn.Module) -> bool:
    if conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


@torch.no_grad()
def _fold_after(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """BN(layer(x)): scale each output channel's weights; b' = s b + t."""
    weight = layer.weight.to(torch.float64)
    if isinstance(layer, _CONV_TRANSPOSE):  # weight (in, out / groups, *k)
        g = layer.groups
        grouped = weight.view(g, weight.shape[0] // g, weight.shape[1], *weight.shape[2:])
        folded = grouped * scale.view(g, 1, -1, *([1] * (weight.dim() - 2)))
    else:  # weight (out, in / groups, *k)
        folded = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias.to(torch.float64) * scale + shift
    _set_weights(layer, folded.reshape(weight.shape), bias)


@torch.no_grad()
def _fold_before(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """layer(BN(x)) = layer_W'(x) + W t: scale each input channel's weights; b' = b + W t."""
    weight = layer.weight.to(torch.float64)  # (out, in / groups, *k)
    g = getattr(layer, "groups", 1)
    out, per_group = weight.shape[0], weight.shape[1]
    grouped = weight.view(g, out // g, per_group, -1)  # (g, out/g, in/g, prod k)
    folded = grouped * scale.view(g, 1, per_group, 1)
    delta = torch.einsum("gojk,gj->go", grouped, shift.view(g, per_group)).reshape(out)
    bias = delta if layer.bias is None else layer.bias.to(torch.float64) + delta
    _set_weights(layer, folded.reshape(weight.shape), bias)


def _set_weights(layer: nn.Module, weight: Tensor, bias: Tensor) -> None:
    dtype = layer.weight.dtype
    layer.weight.copy_(weight.to(dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(bias.to(dtype))


def _max_abs_difference(expected: Any, actual: Any) -> float:
    a, _ = tree_flatten(expected)
    b, _ = tree_flatten(actual)
    diffs = [
        (x.detach().double() - y.detach().double()).abs().max().item()
        for x, y in zip(a, b)
        if isinstance(x, Tensor) and x.numel()
    ]
    return max(diffs, default=0.0)
