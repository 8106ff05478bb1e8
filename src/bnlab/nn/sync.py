"""Synchronized batch norm: statistics over every process of a torch.distributed group.

:class:`SyncBatchNorm` is :class:`BatchNorm` (same parameters, buffers, ``state_dict``, eval path)
whose training statistics are those of all ranks' batches together (see
:func:`bnlab.distributed.sync_batch_norm`); :func:`convert_sync_batchnorm` swaps a model's
batch-norm layers for it, keeping their state.
"""

from __future__ import annotations

import datetime
from typing import Optional

from torch import Tensor, nn

from .. import distributed as D
from ..checks import check_mask
from ..statistics import RunningStatistics
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import rebuild, replace_modules, warn_unchanged

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNorm(BatchNorm):
    r"""Batch norm with statistics over the batches of every rank of a process group: (N, C, *).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta,
        \qquad \mathrm{E}, \mathrm{Var} \text{ over } B_1 \cup \dots \cup B_W

    Ioffe & Szegedy 2015 (https://arxiv.org/abs/1502.03167), Algorithm 1, with the mini-batch spread
    over W processes. In training, W processes with batches B_1..B_W compute exactly what one
    process computes on their concatenation (outputs, input gradients, running statistics); batch
    sizes may differ between ranks and may be 0. In eval, and without an initialized process group
    (or with one rank), it is :class:`BatchNorm`, exactly.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias, strict, backend: as
            :class:`BatchNorm`.
        process_group: the ranks to synchronize over; None: the default group
            (``dist.group.WORLD``). In the position of torch.nn.SyncBatchNorm's, so it swaps in
            without edits.
        timeout: seconds (or a timedelta) to wait for the other ranks at each exchange before
            raising :class:`bnlab.distributed.SyncBatchNormError`; None: the process group's
            timeout.

    Shape:
        input and output (N, C, *), contiguous or channels_last; optional ``mask`` (N, *) for
        ``forward(input, mask)``: bool, True at valid positions, the statistics run over those only
        (e.g. padded variable-length sequences, (N, C, L) with mask (N, L)).

    Details:
        - every rank must call the layer in training mode equally often and in the same order: the
          layer counts its training calls and every exchange compares the counts, so a rank that
          falls out of step makes all ranks raise :class:`~bnlab.distributed.SyncBatchNormError`
          (a rank that stops calling: after ``timeout``), never hang;
        - ``weight.grad``/``bias.grad`` are this rank's share (sum over its positions), as with
          torch.nn.SyncBatchNorm: DistributedDataParallel averages them over ranks with every other
          parameter gradient;
        - numerical choices (float64 exchange, Chan's merge, unbiased running variance with the
          global m, masked gradients) are listed in :func:`bnlab.distributed.sync_batch_norm`.
    """

    process_group = None  # class-level defaults too, for modules built by convert_sync_batchnorm
    timeout: Optional[datetime.timedelta] = None
    _sync_calls = 0  # training calls that synchronized: identical on every rank when all is well

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        strict: bool = False,
        backend: Optional[str] = None,
        timeout: D.TimeoutLike = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            strict=strict,
            backend=backend,
        )
        self.process_group = process_group
        self.timeout = D.as_timeout(timeout)
        self._sync_calls = 0

    def _fixed_statistics_forward(self, input: Tensor, mask: Optional[Tensor]) -> Tensor:
        """statistics="running" needs no other rank; batch or mixed statistics across ranks are
        not implemented (each rank's own would silently differ from the synchronized ones)."""
        if self._functional_args()["training"] or self._mixing():
            raise NotImplementedError(
                f"SyncBatchNorm with statistics={self.statistics!r}: only 'standard' and "
                "'running' are implemented across processes"
            )
        return super().forward(input, mask)

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        check_mask(mask, input)
        if self.statistics != "standard":
            return self._fixed_statistics_forward(input, mask)
        group = D.resolve_group(self.process_group) if self.training else None
        masked_stats = mask is not None and (self.training or self.running_mean is None)
        if group is None and not masked_stats:
            return super().forward(input)  # nothing to synchronize, nothing to mask: BatchNorm
        if group is not None:
            self._sync_calls += 1
        args = self._functional_args()  # statistics and parameters as BatchNorm decides them
        running = RunningStatistics(
            args["running_mean"], args["running_var"], args["num_batches_tracked"], self.momentum
        )
        return D.batch_norm_over_group(
            input,
            args["weight"],
            args["bias"],
            running,
            self.eps,
            mask=mask,
            group=group,
            timeout=self.timeout,
            call_index=self._sync_calls,
            strict=self.strict,
            backend=self.backend,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """torch.nn.SyncBatchNorm's spelling of :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


# input ranks each convertible class accepts; the converted layer keeps checking them
_CONVERTIBLE = {
    nn.BatchNorm1d: BatchNorm1d.expected_dims,
    nn.BatchNorm2d: BatchNorm2d.expected_dims,
    nn.BatchNorm3d: BatchNorm3d.expected_dims,
    BatchNorm: BatchNorm.expected_dims,
    BatchNorm1d: BatchNorm1d.expected_dims,
    BatchNorm2d: BatchNorm2d.expected_dims,
    BatchNorm3d: BatchNorm3d.expected_dims,
}
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, BatchNorm)  # reported when left unchanged


def convert_sync_batchnorm(
    model: nn.Module, process_group=None, *, timeout: D.TimeoutLike = None
) -> nn.Module:
    """Replace every batch-norm layer of ``model`` by a :class:`SyncBatchNorm`, in place.

    Converts exactly torch.nn BatchNorm1d/2d/3d and bnlab.nn BatchNorm/BatchNorm1d/2d/3d. Each new
    layer takes over the old one's whole state: the very same Parameter and buffer tensors
    (optimizers keep working), train/eval mode, hooks, extra attributes, and its input-rank check; a
    layer used at several places stays one layer. Needs no process group (the group is looked up at
    each forward).

    Args:
        model: the module to convert (a new module is returned when it is itself a batch norm).
        process_group: the group the new layers synchronize over; None: the default group.
        timeout: see :class:`SyncBatchNorm`.

    Returns:
        the model. Layers it does not convert are left untouched and listed in one
        :class:`bnlab.nn.ConversionWarning`: subclasses (bnlab's BatchRenorm and GhostBatchNorm
        compute something else in training, which a plain SyncBatchNorm would silently drop),
        torch.nn.SyncBatchNorm, lazy and unknown batch-norm classes. bnlab SyncBatchNorm layers are
        left as they are (reported only when they use another process group than the one asked).
    """
    timeout = D.as_timeout(timeout)
    skipped: list[str] = []

    def swap(module: nn.Module, name: str) -> nn.Module:
        if type(module) in _CONVERTIBLE:
            return _to_sync(module, process_group, timeout)
        reason = _why_left(module, process_group)
        if reason:
            cls = f"{type(module).__module__}.{type(module).__qualname__}"
            skipped.append(f"{name} ({cls}: {reason})")
        return module

    root = replace_modules(model, swap)
    warn_unchanged("bnlab.convert_sync_batchnorm", "batch-norm", skipped, stacklevel=3)
    return root


def _why_left(module: nn.Module, process_group) -> Optional[str]:
    """Why a module that is not converted deserves a report; None when it does not."""
    if isinstance(module, SyncBatchNorm):
        if process_group is not None and module.process_group is not process_group:
            return "already a SyncBatchNorm, over another process group; left on that one"
        return None
    if isinstance(module, nn.SyncBatchNorm):
        return "already synchronized by torch.nn.SyncBatchNorm"
    if isinstance(module, BatchNorm):
        return (
            "a subclass of bnlab.nn.BatchNorm with its own training behaviour, which a plain "
            "SyncBatchNorm would silently drop"
        )
    if isinstance(module, _BATCH_NORMS):
        return "no exact counterpart (a subclass or a lazy module)"
    return None


def _to_sync(old: nn.Module, process_group, timeout) -> SyncBatchNorm:
    """A SyncBatchNorm with old's whole state (see bnlab.nn.convert), synchronized over a group."""
    new = rebuild(old, SyncBatchNorm)
    new.process_group = process_group
    new.timeout = timeout
    new._sync_calls = 0
    new.expected_dims = _CONVERTIBLE[type(old)]  # a converted BatchNorm2d still wants 4-D input
    return new
