"""A batch-norm doctor: why is my model worse in eval mode, and which layer is to blame?

Eval mode replaces each batch norm's batch statistics by its running ones (Ioffe & Szegedy 2015,
Algorithm 2). When those do not describe the inputs the layer gets, eval outputs drift from what
training computed. :func:`diagnose` measures, on batches the user gives, every layer's running
statistics against the exact population statistics of those batches
(:func:`bnlab.inference.population_statistics`), inspects the layers themselves, and reports:

- a per-layer table: running vs population mean and standard deviation, their distance in units
  of the population standard deviation, ``num_batches_tracked``, momentum, smallest |gamma|;
- findings, each naming its layer (as in ``model.named_modules()``), its kind, severity, what was
  seen and the fix:

  ============================ ==================================================================
  ``"non-finite-statistics"``  NaN or inf in ``running_mean`` / ``running_var``
  ``"never-updated"``          running statistics at their initial values (mean 0, variance 1) or
                               ``num_batches_tracked == 0``, while the data's are not
  ``"stale-statistics"``       running and population statistics further apart than
                               ``stale_distance`` (default 0.2 population standard deviations)
  ``"train-mode-in-eval"``     a batch norm in training mode inside a model in eval mode
  ``"small-batch"``            a training forward of the given batches (the median one) puts
                               fewer than ``min_values`` (default 32) values in a channel's
                               statistics
  ``"dead-channels"``          channels with |gamma| <= ``dead_gamma`` (default 1e-3)
  ``"redundant-bias"``         the Linear / Conv feeding the batch norm has a bias: the batch mean
                               removes it, beta does its job
  ============================ ==================================================================

- model level: the gap between the model's eval outputs and those of "population-statistics
  mode" (every batch norm in eval with population statistics), as a relative RMS output
  difference, and as loss and accuracy when the batches carry labels; and for every layer with a
  statistics or mode finding, the fraction of that gap that repairing this layer alone closes.

:func:`repair` writes the population statistics a diagnosis measured where it found them stale,
never updated or non-finite, and changes nothing else.

The distance of a channel compares what eval mode divides and subtracts with what it should::

    d_mean = |mu_run - mu_pop| / s_pop,   d_std = |s_run - s_pop| / s_pop,   s = sqrt(var + eps)

and a layer's distance is the largest ``max(d_mean, d_std)`` over its live channels (|gamma| above
``dead_gamma``: a dead channel outputs beta whatever its statistics). The eps inside ``s`` is the
layer's own, so a channel that is constant in the data is measured in the units eval mode uses.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional
from weakref import ref

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .inference import batch_norm_layers, population_statistics

__all__ = ["diagnose", "repair", "Diagnosis", "Finding", "LayerStatistics", "KINDS"]

KINDS = (
    "non-finite-statistics",
    "never-updated",
    "stale-statistics",
    "train-mode-in-eval",
    "small-batch",
    "dead-channels",
    "redundant-bias",
)
STATISTICS_KINDS = ("non-finite-statistics", "never-updated", "stale-statistics")
_REPAIRABLE = (*STATISTICS_KINDS, "train-mode-in-eval")  # the kinds that explain an eval gap
_SEVERITY = {
    "non-finite-statistics": "error",
    "never-updated": "error",
    "train-mode-in-eval": "error",
    "stale-statistics": "warning",
    "small-batch": "warning",
    "dead-channels": "warning",
    "redundant-bias": "info",
}
_FEEDERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@dataclass
class Finding:
    """One problem found: ``layer`` is a qualified module name ("" for the whole model)."""

    layer: str
    kind: str
    severity: str
    detail: str
    fix: str


@dataclass
class LayerStatistics:
    """One batch-norm layer's row of the table; distances are None where not measurable."""

    layer: str
    type: str
    channels: int
    order: Optional[int] = None  # position in the forward (depth); None: not reached
    values_per_channel: Optional[int] = None  # per training forward (median over the batches)
    mean_distance: Optional[float] = None
    std_distance: Optional[float] = None
    running_mean: Optional[float] = None  # channel averages, for the table
    population_mean: Optional[float] = None
    running_std: Optional[float] = None
    population_std: Optional[float] = None
    num_batches_tracked: Optional[int] = None
    momentum: Optional[float] = None
    min_abs_gamma: Optional[float] = None
    explains: Optional[float] = None  # fraction of the eval gap repairing this layer alone closes

    @property
    def distance(self) -> Optional[float]:
        if self.mean_distance is None or self.std_distance is None:
            return None
        return max(self.mean_distance, self.std_distance)


@dataclass
class Diagnosis:
    """What :func:`diagnose` found. ``print(diagnosis)`` shows the table and the findings."""

    layers: list[LayerStatistics]
    findings: list[Finding]
    gap: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    # per layer with running statistics and reached: the population (mean, var) measured
    population: dict[str, tuple[Tensor, Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def kinds(self, layer: Optional[str] = None) -> set[str]:
        """The kinds found, on ``layer`` only when given."""
        return {f.kind for f in self.findings if layer is None or f.layer == layer}

    def to_dict(self) -> dict:
        return {
            "layers": [{**asdict(row), "distance": row.distance} for row in self.layers],
            "findings": [asdict(f) for f in self.findings],
            "gap": dict(self.gap),
            "thresholds": dict(self.thresholds),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    def __str__(self) -> str:
        return "\n\n".join([_layer_table(self), _gap_lines(self), _finding_lines(self)])

    def plot(self, path) -> None:
        """One PNG: each reached layer's distance in forward order, the stale threshold drawn."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        rows = sorted((r for r in self.layers if r.order is not None), key=lambda r: r.order)
        finite = [r.distance for r in rows if r.distance is not None and math.isfinite(r.distance)]
        top = max([1.0, *finite]) * 2  # where a non-finite layer's bar ends
        heights, colors = [], []
        for r in rows:
            is_finite = r.distance is not None and math.isfinite(r.distance)
            heights.append((r.distance or 0.0) if is_finite else top)
            colors.append(_bar_color(self.kinds(r.layer), is_finite))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows) + 2), 4.5))
        ax.bar(range(len(rows)), heights, color=colors)
        threshold = self.thresholds.get("stale_distance", 0.2)
        ax.axhline(threshold, color="black", ls="--", lw=0.8)
        ax.set_xticks(range(len(rows)), [r.layer for r in rows], rotation=90, fontsize=7)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylabel("distance, running vs population\n(population standard deviations)")
        ax.set_title("batch norms in forward order", fontsize=10)
        legend = [
            Patch(color="tab:red", label="statistics finding"),
            Patch(color="tab:blue", label="no statistics finding"),
            Patch(color="0.6", label="non-finite (bar to the top)"),
            plt.Line2D([], [], color="black", ls="--", lw=0.8, label=f"stale at {threshold:g}"),
        ]
        ax.legend(
            handles=legend, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2
        )
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def diagnose(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    stale_distance: float = 0.2,
    min_values: int = 32,
    dead_gamma: float = 1e-3,
    explain: bool = True,
) -> Diagnosis:
    """Diagnose every batch norm (bnlab's or torch.nn's, timm's subclasses included) of ``model``.

    Args:
        model: left exactly as found (the measurements run on copies of it: up to three at once,
            so the model must fit in memory three times).
        batches: a few batches (kept in memory, run several times): each an input, or an
            ``(input, target)`` pair whose target is an integer tensor of class indices (then
            loss and accuracy are reported) or None. Other batch structures need ``forward``.
        forward: ``forward(model, batch) -> output``, for batches of another structure (labels
            are then not used).
        stale_distance: a layer whose distance (module docstring) exceeds this is stale.
        min_values: fewer values per channel than this in a training forward is a small batch.
        dead_gamma: |gamma| at or below this is a dead channel.
        explain: measure how much of the eval gap each flagged layer's repair closes (one
            eval pass over the batches per flagged layer).

    Returns:
        a :class:`Diagnosis`.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("diagnose: expected at least one batch, got none")
    for name, value in (("stale_distance", stale_distance), ("dead_gamma", dead_gamma)):
        if not value >= 0:
            raise ValueError(f"diagnose: {name} must be >= 0, got {value}")
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError("diagnose: the model has no batch-norm layer (bnlab or torch.nn)")
    call = _caller(forward)
    population, seen = _population(model, batches, call)
    rows = [
        _row(name, bn, population.get_submodule(name), seen, dead_gamma)
        for name, bn in layers.items()
    ]
    findings: list[Finding] = []
    for row, (name, bn) in zip(rows, layers.items()):
        findings += _layer_findings(row, bn, model, seen, stale_distance, min_values, dead_gamma)
    diagnosis = Diagnosis(
        rows,
        findings,
        thresholds={
            "stale_distance": stale_distance,
            "min_values": min_values,
            "dead_gamma": dead_gamma,
        },
        population=_population_statistics(population, seen),
    )
    _measure_gap(diagnosis, model, population, batches, call, forward is None, explain)
    return diagnosis


def repair(model: nn.Module, diagnosis: Diagnosis) -> list[str]:
    """Write the population statistics (Algorithm 2) that ``diagnosis`` measured into the layers
    it found stale, never updated or non-finite; nothing else of ``model`` changes. Returns the
    repaired layers' names (a flagged layer the batches never reached has nothing to write)."""
    flagged = {f.layer for f in diagnosis.findings if f.kind in STATISTICS_KINDS}
    names = sorted(flagged & diagnosis.population.keys())
    for name in names:
        _repair_layer(model.get_submodule(name), diagnosis, name, modes=False)
    return names


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def _caller(forward):
    if forward is not None:
        return forward
    return lambda model, batch: model(_split(batch)[0])


def _split(batch: Any) -> tuple[Any, Optional[Tensor]]:
    """(input, target) for a labelled pair, else (batch, None)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        target = batch[1]
        if target is None:  # bnlab.data.load_batches's unlabelled batches
            return batch[0], None
        if isinstance(target, Tensor) and target.ndim == 1 and not target.is_floating_point():
            return batch[0], target
    return batch, None


def _population(model: nn.Module, batches: list, call) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with population statistics, and what its training forwards showed:
    per layer its forward order, values per channel in each forward and the module feeding it."""
    population = copy.deepcopy(model)
    seen: dict[str, dict] = {}
    outputs: dict[int, tuple] = {}  # id(tensor) -> (weak ref, feeding module's name)
    hooks = []
    for name, module in population.named_modules():
        if isinstance(module, _FEEDERS):
            hooks.append(module.register_forward_hook(_remember_output(name, outputs)))
    for name, bn in batch_norm_layers(population).items():
        hooks.append(bn.register_forward_pre_hook(_watch_input(name, seen, outputs)))
    try:
        population_statistics(population, batches, forward=call)
    finally:
        for hook in hooks:
            hook.remove()
    population.eval()  # population-statistics mode: the model's eval mode, every BN included
    return population, seen


def _population_statistics(population: nn.Module, seen: dict) -> dict:
    """The population copy's (mean, var) of every reached layer with running statistics."""
    stats = {}
    for name, bn in batch_norm_layers(population).items():
        if name in seen and getattr(bn, "running_mean", None) is not None:
            stats[name] = (bn.running_mean.detach().clone(), bn.running_var.detach().clone())
    return stats


def _remember_output(name: str, outputs: dict):
    def hook(module, args, output):
        if isinstance(output, Tensor):
            outputs[id(output)] = (ref(output), name, output.ndim)

    return hook


def _watch_input(name: str, seen: dict, outputs: dict):
    def hook(module, args):
        x = args[0]
        entry = seen.setdefault(name, {"order": len(seen), "values": [], "feeder": None})
        entry["values"].append(x.numel() // x.shape[1] if x.ndim > 1 else x.numel())
        source = outputs.get(id(x))
        if source is not None and source[0]() is x:
            entry["feeder"] = (source[1], source[2])

    return hook


def _row(name: str, bn: nn.Module, pop_bn: nn.Module, seen: dict, dead_gamma: float):
    row = LayerStatistics(name, type(bn).__name__, int(bn.num_features))
    entry = seen.get(name)
    if entry is not None:
        values = sorted(entry["values"])  # the median: a short last batch is no small batch
        row.order, row.values_per_channel = entry["order"], values[(len(values) - 1) // 2]
    gamma = _gamma(bn)
    if gamma is not None:
        row.min_abs_gamma = float(gamma.abs().min())
    tracked = getattr(bn, "num_batches_tracked", None)
    row.num_batches_tracked = None if tracked is None else int(tracked)
    row.momentum = bn.momentum
    if getattr(bn, "running_mean", None) is None or entry is None:
        return row
    run_mean, run_std = _moments(bn)
    pop_mean, pop_std = _moments(pop_bn)
    row.running_mean, row.population_mean = float(run_mean.mean()), float(pop_mean.mean())
    row.running_std, row.population_std = float(run_std.mean()), float(pop_std.mean())
    live = torch.ones_like(pop_mean, dtype=torch.bool)
    if gamma is not None:
        live = gamma.abs() > dead_gamma
    if not bool(live.any()):
        row.mean_distance = row.std_distance = 0.0
        return row
    row.mean_distance = _worst((run_mean - pop_mean).abs() / pop_std, live)
    row.std_distance = _worst((run_std - pop_std).abs() / pop_std, live)
    return row


def _moments(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """A layer's running mean and sqrt(var + eps), float64, as its eval mode uses them."""
    mean = bn.running_mean.detach().double()
    return mean, (bn.running_var.detach().double() + bn.eps).sqrt()


def _worst(distance: Tensor, live: Tensor) -> float:
    d = distance[live]
    if not bool(torch.isfinite(d).all()):
        return math.inf
    return float(d.max())


def _gamma(bn: nn.Module) -> Optional[Tensor]:
    weight = getattr(bn, "weight", None)
    return None if weight is None else weight.detach().double()


# --------------------------------------------------------------------------------------------
# findings
# --------------------------------------------------------------------------------------------


def _layer_findings(row, bn, model, seen, stale_distance, min_values, dead_gamma) -> list:
    found = []

    def add(kind: str, detail: str, fix: str) -> None:
        found.append(Finding(row.layer, kind, _SEVERITY[kind], detail, fix))

    statistics = _statistics_finding(row, bn, stale_distance)
    if statistics is not None:
        add(*statistics)
    if bn.training and not model.training:
        add(
            "train-mode-in-eval",
            "in training mode inside a model in eval mode: it normalizes with each eval batch's "
            "statistics (outputs depend on the batch) and updates its running statistics",
            f"call model.eval() after any code that sets {row.layer or 'the layer'}.train(), "
            "or freeze it (bnlab.inference.freeze)",
        )
    if row.values_per_channel is not None and row.values_per_channel < min_values:
        add(
            "small-batch",
            f"{row.values_per_channel} values per channel in a training forward of the given "
            f"batches (fewer than {min_values}): its batch statistics are noisy, and eval "
            "statistics differ from what training normalized with",
            "train with larger batches, or use bnlab.nn.BatchRenorm2d / GhostBatchNorm / "
            "SyncBatchNorm (statistics over more values), or GroupNorm",
        )
    gamma = _gamma(bn)
    if gamma is not None:
        dead = int((gamma.abs() <= dead_gamma).sum())
        if dead:
            every = " (every channel: a zero-initialized residual branch that never trained?)"
            add(
                "dead-channels",
                f"{dead} of {row.channels} channels have |gamma| <= {dead_gamma:g}: they output "
                f"beta whatever the input{every if dead == row.channels else ''}",
                "prune those channels, or lower weight decay on gamma (zero-initialized residual "
                "gammas are meant to grow in training)",
            )
    feeder = seen.get(row.layer, {}).get("feeder")
    if feeder is not None:
        name, ndim = feeder
        source = model.get_submodule(name)
        if _per_channel_bias(source, ndim, row.channels):
            add(
                "redundant-bias",
                f"{name} ({type(source).__name__}) adds a bias that the batch mean removes in "
                "training: beta does its job",
                f"build {name} with bias=False; to keep eval outputs, subtract its bias from "
                f"{row.layer}.running_mean first",
            )
    return found


def _statistics_finding(row, bn, stale_distance) -> Optional[tuple[str, str, str]]:
    running_mean = getattr(bn, "running_mean", None)
    if running_mean is None:
        return None
    if not (
        bool(torch.isfinite(running_mean).all()) and bool(torch.isfinite(bn.running_var).all())
    ):
        return (
            "non-finite-statistics",
            "NaN or inf in running_mean / running_var: eval outputs are not finite (often an "
            "fp16 overflow, or a diverged step, recorded into the buffers)",
            "recompute them: bnlab doctor --fix, or bnlab.inference.population_statistics; "
            "bnlab's layers skip non-finite batches when recording",
        )
    distance = row.distance
    if distance is None or distance <= stale_distance:
        return None
    initial = bool((running_mean == 0).all()) and bool((bn.running_var == 1).all())
    if initial or row.num_batches_tracked == 0:
        return (
            "never-updated",
            f"running statistics at their initial values (num_batches_tracked "
            f"{row.num_batches_tracked}) while the data's are {distance:.3g} population "
            "standard deviations away: eval mode normalizes with mean 0, variance 1",
            "recompute them: bnlab doctor --fix, or bnlab.inference.population_statistics; "
            "check that training ran the layer in training mode and that the buffers were saved",
        )
    return (
        "stale-statistics",
        f"running statistics {distance:.3g} population standard deviations from the data's "
        f"(mean {row.mean_distance:.3g}, std {row.std_distance:.3g}; threshold {stale_distance:g})",
        "recompute them: bnlab doctor --fix, or bnlab.inference.population_statistics (after "
        "SWA, a short run or a small momentum the running average lags the weights)",
    )


def _per_channel_bias(module: nn.Module, ndim: int, channels: int) -> bool:
    """Whether the module adds one bias per channel of the batch norm it feeds."""
    if getattr(module, "bias", None) is None or module.bias.numel() != channels:
        return False
    return not isinstance(module, nn.Linear) or ndim == 2  # (N, L, F) -> BN1d: channels are L


def _bar_color(kinds: set, finite: bool) -> str:
    if not finite:
        return "0.6"
    return "tab:red" if kinds & set(STATISTICS_KINDS) else "tab:blue"


# --------------------------------------------------------------------------------------------
# the model's eval gap
# --------------------------------------------------------------------------------------------


def _measure_gap(diagnosis, model, population, batches, call, labelled, explain) -> None:
    as_is = copy.deepcopy(model)
    if model.training:
        as_is.eval()
    reference = _evaluate(population, batches, call, labelled)
    measured = _evaluate(as_is, batches, call, labelled)
    gap = {"output_gap": _relative_gap(measured["outputs"], reference["outputs"])}
    for key in ("loss", "accuracy"):
        if key in measured:
            gap[f"eval_{key}"] = measured[key]
            gap[f"population_{key}"] = reference[key]
    diagnosis.gap = gap
    if not explain:
        return
    rows = {row.layer: row for row in diagnosis.layers}
    for name in sorted({f.layer for f in diagnosis.findings if f.kind in _REPAIRABLE}):
        variant = copy.deepcopy(as_is)
        _repair_layer(variant.get_submodule(name), diagnosis, name, modes=True)
        after = _relative_gap(
            _evaluate(variant, batches, call, labelled)["outputs"], reference["outputs"]
        )
        rows[name].explains = _explained(gap["output_gap"], after)


def _repair_layer(bn: nn.Module, diagnosis: Diagnosis, name: str, modes: bool) -> None:
    """What the layer's findings ask for: the measured population statistics, and (``modes``)
    eval mode for a layer left in training mode."""
    kinds = diagnosis.kinds(name)
    if kinds & set(STATISTICS_KINDS) and name in diagnosis.population:
        mean, var = diagnosis.population[name]
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    if modes and "train-mode-in-eval" in kinds:
        bn.train(False)


@torch.no_grad()
def _evaluate(model: nn.Module, batches: list, call, labelled: bool) -> dict:
    outputs, losses, correct, total = [], 0.0, 0, 0
    for batch in batches:
        out = call(model, batch)
        flat = [t.detach().double().flatten() for t in tree_flatten(out)[0] if _floating(t)]
        outputs.append(torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64))
        target = _split(batch)[1] if labelled else None
        if target is not None and isinstance(out, Tensor) and out.ndim == 2:
            losses += float(nn.functional.cross_entropy(out.double(), target, reduction="sum"))
            correct += int((out.argmax(1) == target).sum())
            total += len(target)
    result: dict = {"outputs": torch.cat(outputs)}
    if total:
        result["loss"], result["accuracy"] = losses / total, correct / total
    return result


def _floating(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _relative_gap(outputs: Tensor, reference: Tensor) -> float:
    """RMS(outputs - reference) / RMS(reference); inf where the outputs are not finite."""
    if not bool(torch.isfinite(outputs).all()):
        return math.inf
    scale = reference.pow(2).mean().sqrt().clamp_min(1e-12)
    return float((outputs - reference).pow(2).mean().sqrt() / scale)


def _explained(before: float, after: float) -> float:
    """The fraction of the gap a repair closes: 1 where it alone makes the outputs finite."""
    if math.isinf(before):
        return 0.0 if math.isinf(after) else 1.0
    if before == 0:
        return 0.0
    return (before - after) / before


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def _layer_table(d: Diagnosis) -> str:
    head = (
        "layer", "type", "C", "values", "mean run/pop", "std run/pop", "distance", "tracked",
        "momentum", "min|gamma|", "explains", "findings",
    )  # fmt: skip
    lines = [head]
    for r in sorted(d.layers, key=lambda r: (r.order is None, r.order or 0)):
        lines.append(
            (
                r.layer,
                r.type,
                str(r.channels),
                _fmt(r.values_per_channel),
                f"{_fmt(r.running_mean)}/{_fmt(r.population_mean)}",
                f"{_fmt(r.running_std)}/{_fmt(r.population_std)}",
                _fmt(r.distance),
                _fmt(r.num_batches_tracked),
                _fmt(r.momentum),
                _fmt(r.min_abs_gamma),
                "-" if r.explains is None else f"{r.explains:.0%}",
                ", ".join(sorted(d.kinds(r.layer))) or "ok",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _gap_lines(d: Diagnosis) -> str:
    g = d.gap
    text = [f"eval vs population-statistics outputs: relative RMS gap {_fmt(g.get('output_gap'))}"]
    if "eval_accuracy" in g:
        text.append(
            f"accuracy eval {g['eval_accuracy']:.2%} vs population {g['population_accuracy']:.2%}; "
            f"loss {g['eval_loss']:.4g} vs {g['population_loss']:.4g}"
        )
    return "\n".join(text)


def _finding_lines(d: Diagnosis) -> str:
    if not d.findings:
        return "no findings: every batch norm looks healthy on these batches"
    order = {"error": 0, "warning": 1, "info": 2}
    lines = []
    for f in sorted(d.findings, key=lambda f: (order[f.severity], f.layer)):
        lines.append(
            f"[{f.severity}] {f.layer or '(model)'}: {f.kind}: {f.detail}\n    fix: {f.fix}"
        )
    return "\n".join(lines)
