"""Export a trained network for inference: fold its batch norms, write ONNX, run onnxruntime."""

from __future__ import annotations

import importlib
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .inference import FoldReport, batch_norm_layers, fold

__all__ = ["export_onnx", "ExportReport"]


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how well onnxruntime reproduces PyTorch."""

    path: Path
    fold: Optional[FoldReport]  # None when the model had no batch norm to fold
    op_counts: dict[str, int]  # ONNX node types in the written graph
    max_abs_error: Optional[float]  # onnxruntime vs the given model on the example input (None:
    # not run); the folding error included

    def __str__(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.op_counts.items()))
        lines = [f"wrote {self.path} ({ops})"]
        if self.fold is not None:
            lines.append(str(self.fold))
        if self.max_abs_error is not None:
            lines.append(f"onnxruntime vs PyTorch: max abs error {self.max_abs_error:.3g}")
        return "\n".join(lines)


def export_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | Path,
    *,
    fold_batch_norms: bool = True,
    check: bool = True,
) -> ExportReport:
    """Fold ``model``'s batch norms (see :func:`bnlab.inference.fold`) and export it to ONNX.

    Args:
        model: an eval-mode network.
        example_input: a tensor or tuple of tensors, used to trace, fold and check.
        path: the ``.onnx`` file to write.
        fold_batch_norms: fold first (the result has no BatchNormalization node); a model with no
            batch norm is exported as it is.
        check: run the written model in onnxruntime and compare with the PyTorch output.

    Returns:
        an :class:`ExportReport`. Raises RuntimeError if a BatchNormalization node is left after
        folding, ImportError naming the ONNX extra when onnx, onnxscript or onnxruntime is missing.

    Folding finds every batch norm :func:`bnlab.inference.fold` finds: modules, batch norm +
    activation modules (their activation stays) and functional calls; a model torch.fx cannot
    trace is exported with its batch norms frozen (the fold report says so).
    """
    _require_onnx_extra(check)
    import onnx

    path = Path(path)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    report_fold, exported = None, model
    if fold_batch_norms and batch_norm_layers(model):
        exported, report_fold = fold(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the exporter's own deprecation noise
        torch.onnx.export(exported, inputs, str(path), dynamo=True, verbose=False)
    graph = onnx.load(str(path)).graph
    op_counts = dict(Counter(node.op_type for node in graph.node))
    if fold_batch_norms and op_counts.get("BatchNormalization"):
        raise RuntimeError(
            f"{path}: {op_counts['BatchNormalization']} BatchNormalization node(s) left"
        )
    error = _onnxruntime_error(path, model, inputs) if check else None  # vs the model as given
    return ExportReport(path, report_fold, op_counts, error)


def _require_onnx_extra(check: bool) -> None:
    """ImportError with the install command when a package of the ``onnx`` extra is missing
    (torch.onnx.export would otherwise fail with a bare "No module named 'onnxscript'")."""
    for name in ("onnx", "onnxscript", *(("onnxruntime",) if check else ())):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ImportError(
                f"export_onnx needs {name}, which is not installed ({error}); install bnlab's ONNX "
                "extra: pip install 'bnlab[onnx]'"
            ) from error


@torch.no_grad()
def _onnxruntime_error(path: Path, model: nn.Module, inputs: tuple) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: t.detach().cpu().numpy() for arg, t in zip(session.get_inputs(), inputs)}
    outputs = session.run(None, feed)
    expected, _ = torch.utils._pytree.tree_flatten(model(*inputs))
    return max(
        float((torch.from_numpy(out).double() - ref.detach().cpu().double()).abs().max())
        for out, ref in zip(outputs, expected)
    )
