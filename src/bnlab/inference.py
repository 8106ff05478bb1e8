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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_flatten

from .kernels.composite import batch_statistics
from .nn import BatchNorm as _BnlabBatchNorm
from .nn import BatchNormAct, BatchRenorm, GhostBatchNorm, SyncBatchNorm
from .nn import frozen as fbn
from .nn.convert import replace_modules
from .nn.frozen import FrozenBatchNorm, FrozenBatchNormAct
from .nn.fuse import LayerTracer
from .statistics import merge_statistics

__all__ = [
    "population_statistics",
    "PopulationReport",
    "freeze",
    "fold",
    "FoldReport",
    "batch_norm_layers",
    "batch_norms_in_graph",
    "frozen_counterpart",
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

_FROZEN_CLASS = {  # (plain, with drop and activation)
    "1d": (fbn.FrozenBatchNorm1d, fbn.FrozenBatchNormAct1d),
    "2d": (fbn.FrozenBatchNorm2d, fbn.FrozenBatchNormAct2d),
    "3d": (fbn.FrozenBatchNorm3d, fbn.FrozenBatchNormAct3d),
}
_FROZEN_BY_RANK = {
    2: fbn.FrozenBatchNorm1d,
    3: fbn.FrozenBatchNorm1d,
    4: fbn.FrozenBatchNorm2d,
    5: fbn.FrozenBatchNorm3d,
}


def _frozen_class(bn: nn.Module, act: bool) -> type:
    """FrozenBatchNorm{,Act}{1,2,3}d for a batch norm of a class named ...{1,2,3}d, or a subclass
    of one (BatchNorm2d, BatchNormAct2d, GhostBatchNorm1d...); else the rank-agnostic class."""
    for cls in type(bn).__mro__:
        if cls.__name__[-2:] in _FROZEN_CLASS and issubclass(cls, BATCH_NORMS):
            return _FROZEN_CLASS[cls.__name__[-2:]][act]
    return FrozenBatchNormAct if act else FrozenBatchNorm


# the forward methods known to compute, in eval mode, batch norm with the running statistics and
# nothing after it: torch.nn's and bnlab's batch norms (ghost and renorm ones included)
_PLAIN_FORWARDS = {
    nn.modules.batchnorm._BatchNorm.forward,
    nn.SyncBatchNorm.forward,
    _BnlabBatchNorm.forward,
    GhostBatchNorm.forward,
    BatchRenorm.forward,
    SyncBatchNorm.forward,
}


def _has_drop_or_act(bn: nn.Module) -> bool:
    return any(isinstance(getattr(bn, key, None), nn.Module) for key in ("drop", "act"))


def frozen_counterpart(name: str, bn: nn.Module) -> FrozenBatchNorm:
    """The fixed layer computing what the batch norm ``bn`` computes in eval mode.

    - bnlab's BatchNormAct / InPlaceABN: a FrozenBatchNormAct with its activation as a module;
    - a batch norm with torch.nn's or bnlab's own forward: a FrozenBatchNorm;
    - a subclass with its own forward and ``drop`` and/or ``act`` modules (timm's BatchNormAct2d,
      whose forward is act(drop(batch_norm(x)))): a FrozenBatchNormAct keeping those modules;
    - any other subclass with its own forward: refused (ValueError naming ``name`` and the class),
      since what it computes is unknown.
    """
    forward = type(bn).forward
    if isinstance(bn, BatchNormAct) and forward is BatchNormAct.forward:
        act = True
    elif forward in _PLAIN_FORWARDS:
        act = False
    elif _has_drop_or_act(bn):
        act = True
    else:
        raise ValueError(
            f"cannot freeze batch-norm layer {name!r}: {type(bn).__qualname__} overrides forward "
            "and has no 'drop' or 'act' module, so what it computes in eval mode is unknown; "
            "replace it yourself (or give it drop/act modules if it is batch norm, then drop, "
            "then activation)"
        )
    return _frozen_class(bn, act).from_batch_norm(bn)


def _check_frozen_statistics(name: str, bn: nn.Module) -> None:
    if getattr(bn, "running_mean", None) is None:
        raise ValueError(
            f"cannot freeze batch-norm layer {name!r}: it has no running statistics "
            "(track_running_stats=False)"
        )
    for key in ("running_mean", "running_var"):
        _check_finite(name, key, getattr(bn, key))


def _check_finite(name: str, key: str, statistic: Tensor) -> None:
    bad = ~torch.isfinite(statistic)
    if bool(bad.any()):
        raise ValueError(
            f"batch-norm layer {name!r} has non-finite {key} in channels "
            f"{bad.nonzero().flatten().tolist()[:20]}: refusing to build a wrong inference model"
        )


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch norm of ``model`` by a :class:`bnlab.nn.FrozenBatchNorm`, in place.

    The frozen layer is the fixed affine map of Algorithm 2 with the layer's running statistics,
    gamma and beta, in torchvision's FrozenBatchNorm2d ``state_dict`` format. A batch norm followed
    by an activation in one module (bnlab's BatchNormAct, timm's BatchNormAct2d) becomes a
    :class:`bnlab.nn.FrozenBatchNormAct` that keeps its drop layer and activation (the same module
    objects); see :func:`frozen_counterpart`. Returns the model (a new module when ``model`` itself
    is a batch norm). Raises ValueError, before changing anything, for a model without batch norm,
    a layer without running statistics or with non-finite ones, or a batch-norm subclass whose
    eval computation is unknown.
    """
    layers = _require_batch_norms(model, "freeze")
    for name, bn in layers.items():
        _check_frozen_statistics(name, bn)
    frozen = {name: frozen_counterpart(name, bn) for name, bn in layers.items()}
    if "" in layers:
        return frozen[""]
    _replace_modules(model, {id(bn): frozen[name] for name, bn in layers.items()})
    return model


def _replace_modules(model: nn.Module, replacement: dict[int, nn.Module]) -> None:
    """Swap modules by identity, at every place they appear (a shared layer stays shared)."""
    replace_modules(model, lambda module, _name: replacement.get(id(module), module))


# --------------------------------------------------------------------------------------------
# fold (Algorithm 2, step 11, folded into the adjacent linear layer)
# --------------------------------------------------------------------------------------------

# the functional batch norms fx records when it traces into a batch-norm subclass's forward, with
# their positional parameters
_BN_FUNCTIONS = {
    nn.functional.batch_norm: (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "training",
        "momentum",
        "eps",
    ),
    torch.batch_norm: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
}
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


@dataclass
class FoldReport:
    """What :func:`fold` did.

    Attributes:
        folded: (batch-norm name, layer name, "after" | "before"): the BN followed or preceded the
            layer it was folded into.
        frozen: batch-norm name -> why it could not be folded (it became a FrozenBatchNorm, a
            FrozenBatchNormAct, or, for a functional batch_norm call, a FrozenBatchNorm module
            ``frozen`` in the module that held its statistics).
        max_abs_error: max |folded(x) - model(x)| on the example input, in the model's dtype.
        untraced: why fold froze the model module by module instead (torch.fx could not trace it
            or run the trace); None when it was traced.

    A batch norm is named by its module's qualified name, also when fx traced into the module and
    met it as a functional ``batch_norm`` call (named by the module owning the running statistics).
    """

    folded: list[tuple[str, str, str]] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)
    max_abs_error: float = 0.0
    untraced: Optional[str] = None

    def __str__(self) -> str:
        lines = [
            f"folded {len(self.folded)}, frozen {len(self.frozen)}, "
            f"max abs error on the example input {self.max_abs_error:.3g}"
        ]
        if self.untraced:
            lines.append(f"  not traced, every batch norm frozen in place: {self.untraced}")
        lines += [f"  {bn} -> {layer} (BN {side} it)" for bn, layer, side in self.folded]
        lines += [f"  {bn} frozen: {why}" for bn, why in self.frozen.items()]
        return "\n".join(lines)


class _Tracer(LayerTracer):
    """Keeps torch.nn's layers, bnlab's normalization layers (bnlab.nn) and batch norms with torch's
    or bnlab's forward as call_module nodes; traces through every other module, bnlab's own
    containers included. ``act_leaves``: keep batch norms with drop/act modules whole too (for
    subclasses that call ``super().forward``, whose input check fx cannot trace)."""

    def __init__(self, act_leaves: bool = False) -> None:
        super().__init__()
        self.act_leaves = act_leaves

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if isinstance(m, BATCH_NORMS) and (
            type(m).forward in _PLAIN_FORWARDS or (self.act_leaves and _has_drop_or_act(m))
        ):
            return True
        return super().is_leaf_module(m, qualified_name)


def _trace(model: nn.Module, layers: dict) -> tuple[Optional[fx.GraphModule], str]:
    """(the traced module, "") or (None, why fx cannot trace it). Batch norms with drop/act
    modules are traced into (exact); if that fails, kept whole (their forward by convention)."""
    errors = []
    for act_leaves in (False, True)[: 1 + any(map(_has_drop_or_act, layers.values()))]:
        try:
            return fx.GraphModule(model, _Tracer(act_leaves).trace(model)), ""
        except Exception as error:
            errors.append(error)
    return None, f"torch.fx cannot trace it: {errors[0]}"


def fold(model: nn.Module, example_input: Any) -> tuple[nn.Module, FoldReport]:
    """Fold every batch norm of an eval-mode ``model`` into its adjacent Linear/Conv/ConvTranspose.

    With s = gamma / sqrt(running_var + eps) and t = beta - running_mean * s (Algorithm 2):

    - BN after a layer (its output used by the BN alone): W' = s W and b' = s b + t, per output
      channel (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d; any groups, dilation, stride);
    - BN before a Linear or Conv (the BN's output used by it alone): W' = W s over input channels
      and b' = b + W t summed over inputs and kernel; only where padding cannot break it (no zero
      padding: padding 0, or a reflect/replicate/circular padding mode);
    - otherwise the BN is frozen (a FrozenBatchNorm), and the reason reported.

    Batch norms are found as module calls and as functional ``batch_norm`` calls on stored
    running statistics (what fx records inside a batch-norm subclass it traces into, such as
    timm's BatchNormAct2d). A batch norm + activation module (bnlab's BatchNormAct) folds its
    batch norm part only: its drop layer and activation stay. After fold the graph has no batch
    norm left (checked). A model torch.fx cannot trace is frozen module by module instead, exact,
    with the reason in :attr:`FoldReport.untraced`.

    The model is traced with torch.fx and copied: ``model`` itself is left as it is. Weights are
    folded in float64 and cast back.

    Args:
        model: in eval mode.
        example_input: a tensor, or a tuple of positional inputs, run through both models to find
            shapes and measure the folding error.

    Returns:
        (the folded GraphModule, or the frozen copy of an untraceable model; a
        :class:`FoldReport`).
    """
    layers = batch_norm_layers(model)
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fold needs a model in eval mode (call model.eval()); in training: {training[:5]}"
        )
    for name, bn in layers.items():
        _check_frozen_statistics(name, bn)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    twin = copy.deepcopy(model)
    gm, why = _trace(twin, layers)
    if gm is None:
        return _freeze_instead(model, twin, inputs, layers, why)
    try:
        ShapeProp(gm).propagate(*inputs)
    except Exception as error:
        _check_runs(model, inputs)  # a bad example input is the caller's error
        return _freeze_instead(model, twin, inputs, layers, f"its fx trace does not run: {error}")
    report = _fold_graph(gm)
    if not layers and not (report.folded or report.frozen):
        raise ValueError("fold: the model has no batch-norm layer (bnlab or torch.nn)")
    report.max_abs_error = _max_abs_difference(model(*inputs), gm(*inputs))
    return gm, report


def _fold_graph(gm: fx.GraphModule) -> FoldReport:
    """Fold or freeze every batch norm of the traced ``gm``, in place; check that none is left."""
    report = FoldReport()
    modules = dict(gm.named_modules())
    sites = _call_sites(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], BATCH_NORMS):
            site = _module_site(node, modules, sites)
        elif node.op == "call_function" and node.target in _BN_FUNCTIONS:
            site = _functional_site(gm, node, report)
        else:
            continue
        _fold_or_freeze(gm, site, modules, sites, report)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()  # folded BNs must not linger in state_dict / named_modules
    _freeze_untraced(gm, report)
    gm.graph.lint()
    gm.recompile()
    left = batch_norms_in_graph(gm)
    if left:
        raise RuntimeError(f"fold left batch norms in the graph: {left} (a bug in bnlab's fold)")
    return report


def batch_norms_in_graph(gm: fx.GraphModule) -> list[str]:
    """Nodes of ``gm``'s graph that still compute batch norm with statistics: calls of batch-norm
    modules and functional ``batch_norm`` calls; and batch-norm modules anywhere in ``gm``."""
    nodes = [
        node.name
        for node in gm.graph.nodes
        if (node.op == "call_function" and node.target in _BN_FUNCTIONS)
        or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), BATCH_NORMS))
    ]
    return nodes + [name for name in batch_norm_layers(gm) if name not in nodes]


def _check_runs(model: nn.Module, inputs: tuple) -> None:
    try:
        model(*inputs)
    except Exception as error:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in inputs]
        raise ValueError(
            f"the example input {shapes} could not run through the model: {error}"
        ) from error


def _freeze_instead(model, twin, inputs, layers, why: str) -> tuple[nn.Module, FoldReport]:
    """The copy ``twin`` of ``model`` frozen module by module (exact), for a model fold cannot
    trace; the report names why."""
    if not layers:
        raise ValueError(f"fold: the model has no batch-norm module, and {why}")
    _check_runs(model, inputs)
    frozen = freeze(twin)
    first_line = why.strip().splitlines()[0]
    report = FoldReport(untraced=first_line[:300])
    report.frozen = {name: "not traced: frozen in place" for name in layers}
    report.max_abs_error = _max_abs_difference(model(*inputs), frozen(*inputs))
    return frozen, report


def _freeze_untraced(gm: fx.GraphModule, report: FoldReport) -> None:
    """BNs the trace did not reach as calls (inside a module kept whole) are frozen, and listed."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, bn in batch_norm_layers(gm).items():
        if name not in called and name not in report.frozen:
            _replace_modules(gm, {id(bn): frozen_counterpart(name, bn)})
            report.frozen[name] = (
                "inside a module the fx trace keeps whole (not a call in the graph)"
            )


def _call_sites(gm: fx.GraphModule) -> dict[str, int]:
    sites: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites[node.target] = sites.get(node.target, 0) + 1
    return sites


@dataclass
class _Site:
    """One batch norm in the graph: a module call or a functional batch_norm call.

    ``frozen`` is its fixed map (a FrozenBatchNormAct for a batch norm + activation module), whose
    scale and shift fold; ``tail`` what stays in the graph after folding (the module's drop layer
    and activation), None for a plain batch norm.
    """

    node: fx.Node
    name: str  # in the report
    input: Any
    frozen: FrozenBatchNorm
    shared_by: int = 1
    module: Optional[nn.Module] = None  # the batch-norm module of a module call
    tail: Optional[nn.Module] = None
    owner: str = ""  # of a functional call: the module holding its running statistics


def _module_site(node: fx.Node, modules: dict, sites: dict) -> _Site:
    bn = modules[node.target]
    frozen = frozen_counterpart(node.target, bn)
    tail = None
    if isinstance(frozen, FrozenBatchNormAct):  # same keys as the module's: drop.*, act.*
        tail = nn.Sequential(OrderedDict(drop=frozen.drop, act=frozen.act))
    return _Site(node, node.target, node.args[0], frozen, sites[node.target], bn, tail)


def _functional_site(gm: fx.GraphModule, node: fx.Node, report: FoldReport) -> _Site:
    """A functional batch_norm call on stored tensors in eval mode, as its fixed map; ValueError
    for one that normalizes with batch statistics or with statistics computed in the graph."""
    args = {**_BN_DEFAULTS, **dict(zip(_BN_FUNCTIONS[node.target], node.args)), **node.kwargs}
    if args["training"] is not False:
        raise ValueError(
            f"fold: the batch_norm call {node.name!r} normalizes with batch statistics in eval "
            f"mode (training={args['training']}): there is no fixed map to fold or freeze"
        )
    stored = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = args[key]
        if isinstance(value, fx.Node) and value.op == "get_attr":
            stored[key] = _attribute(gm, value.target)
        elif value is not None:  # (running statistics None with training=False: torch raises)
            raise ValueError(
                f"fold: the batch_norm call {node.name!r} takes its {key} from a computation, "
                "not a stored tensor: fold cannot fix it"
            )
    owner = args["running_mean"].target.rpartition(".")[0]
    name = _unique(owner, node, report)
    for key in ("running_mean", "running_var"):
        _check_finite(name, key, stored[key])
    rank = len(args["input"].meta["tensor_meta"].shape)
    frozen = _FROZEN_BY_RANK.get(rank, FrozenBatchNorm).from_statistics(
        stored["running_mean"],
        stored["running_var"],
        stored.get("weight"),
        stored.get("bias"),
        args["eps"],
    )
    return _Site(node, name, args["input"], frozen, owner=owner)


def _attribute(gm: fx.GraphModule, target: str) -> Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def _unique(name: str, node: fx.Node, report: FoldReport) -> str:
    """``name`` for the report, or with the call's node name where it is already used (a module
    whose forward ran twice)."""
    used = set(report.frozen) | {bn for bn, _, _ in report.folded}
    name = name or node.name
    return name if name not in used else f"{name} ({node.name})"


def _fold_or_freeze(gm, site: _Site, modules, sites, report: FoldReport) -> None:
    if site.shared_by > 1:
        reason = f"shared by {site.shared_by} call sites"
    else:
        layer_node, side, reason = _fold_partner(site, modules, sites)
        if layer_node is not None:
            scale, shift = site.frozen.scale_and_shift(torch.float64)
            layer = modules[layer_node.target]
            (_fold_after if side == "after" else _fold_before)(layer, scale, shift)
            _remove(gm, site)
            report.folded.append((site.name, layer_node.target, side))
            return
    _install_frozen(gm, site)
    report.frozen[site.name] = reason


def _remove(gm: fx.GraphModule, site: _Site) -> None:
    """Take a folded batch norm out of the graph; a module's drop layer and activation stay."""
    if site.module is not None and site.tail is not None:
        _replace_modules(gm, {id(site.module): site.tail})
        return
    site.node.replace_all_uses_with(site.input)
    gm.graph.erase_node(site.node)


def _install_frozen(gm: fx.GraphModule, site: _Site) -> None:
    """Put the batch norm's fixed map in its place: the module swapped at every place it appears
    (a shared layer stays shared), a functional call replaced by a call of ``<name>.frozen``."""
    if site.module is not None:
        _replace_modules(gm, {id(site.module): site.frozen})
        return
    prefix = f"{site.owner}." if site.owner else ""
    target, suffix = f"{prefix}frozen", 0
    while _exists(gm, target):
        suffix += 1
        target = f"{prefix}frozen_{suffix}"
    gm.add_submodule(target, site.frozen)
    with gm.graph.inserting_before(site.node):
        call = gm.graph.call_module(target, (site.input,))
    call.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(call)
    gm.graph.erase_node(site.node)


def _exists(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_submodule(target)
    except AttributeError:
        return False
    return True


_METADATA = ("ndim", "shape", "dtype", "device")


def _value_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node``'s values: not those that read only its shape, dtype or device (such as
    timm's ``_assert(x.ndim == 4)``), which a fold leaves as they are."""
    return [
        user
        for user in node.users
        if not (
            (user.op == "call_function" and user.target is getattr and user.args[1] in _METADATA)
            or (user.op == "call_method" and user.target in ("size", "dim"))
        )
    ]


def _fold_partner(site: _Site, modules, sites):
    """(layer node, "after" | "before", None) to fold the BN ``site`` into; (None, None, why)."""
    node, producer = site.node, site.input
    if isinstance(producer, fx.Node) and producer.op == "call_module":
        layer = modules[producer.target]
        why = _why_not_after(layer, producer, sites)
        if why is None:
            return producer, "after", None
    else:
        why = "its input does not come from a layer"
    if site.tail is not None:
        return None, None, f"cannot fold after ({why}); its activation comes before what follows"
    users = _value_users(node)
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
    if len(_value_users(producer)) != 1:
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
