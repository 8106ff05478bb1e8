"""Batch-norm modules: drop-in replacements for torch.nn.BatchNorm1d/2d/3d, and one for any rank.

Constructor arguments, parameters, buffers, ``state_dict`` keys (and version), ``reset_*`` methods
and ``extra_repr`` are torch.nn's, so checkpoints move both ways. bnlab adds two keyword-only
options: ``strict`` (raise on non-finite batch statistics) and ``backend`` (kernel backend name).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import functional as F
from ..checks import check_residual
from ..concat import batch_norm_concat_act, joined_shape, takes, worth_buffering
from ..kernels import adds_residual, select_backend, selection_state
from ..kernels.composite import accumulation_dtype, activate_in_place, per_channel, reduction_dims
from ..ops import traced
from ..statistics import RunningStatistics
from .tracing import WholeWhenTraced

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "replace_all_batch_norm_modules_",
    "set_statistics",
    "STATISTICS_MODES",
]


_ABSENT = object()  # not in a registry (None is a registered absent parameter or buffer)
# instance attribute holding a layer's cached eager-path decisions (see BatchNorm._eager)
EAGER_PLAN = "_eager_plan"
# signatures a layer remembers: training and eval, an epoch's smaller last batch, a few input
# sizes (multi-scale training); more evict the oldest, which is decided again when it comes back
_PLANS_KEPT = 8
_UNDECIDED = object()
_RESIDUAL = "add_act"  # first item of the keys of add_act's decisions among the eager ones


class _NormBase(WholeWhenTraced, nn.Module):
    """Owns the parameters, buffers and checkpoint format shared by every batch-norm module."""

    _version = 2  # version 2 added num_batches_tracked; older checkpoints get it filled in
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]
    strict: bool = False  # class-level defaults too, for modules built by bnlab.convert
    backend: Optional[str] = None
    # which statistics normalize (see bnlab.nn.set_statistics): plain attributes, not state_dict
    statistics: str = "standard"
    statistics_alpha: Optional[float] = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        strict: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.strict = strict
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def __getstate__(self) -> dict:
        """Pickled (torch.save of a whole model, deepcopy) without the cached eager-path decision:
        it holds functions made for this process."""
        state = dict(self.__dict__)
        state.pop(EAGER_PLAN, None)
        return state

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.strict:
            text += ", strict=True"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            keep = self.num_batches_tracked is not None and not self.num_batches_tracked.is_meta
            state_dict[key] = (
                self.num_batches_tracked if keep else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchNorm(_NormBase):
    r"""Batch normalization over any input of rank >= 2 with channels on dim 1: (N, C, *).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Ioffe & Szegedy 2015 (https://arxiv.org/abs/1502.03167). In training the statistics are the
    batch's, over N and every spatial position, and the running statistics are updated; in eval the
    running statistics are used (or the batch's when ``track_running_stats=False``).

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: running = (1 - momentum) * running + momentum * batch; None: cumulative average.
        affine: learn gamma (init 1) and, if ``bias``, beta (init 0).
        track_running_stats: keep running_mean / running_var / num_batches_tracked buffers.
        bias: learn beta (with ``affine``), as torch.nn's keyword-only ``bias``.
        strict: raise :class:`bnlab.functional.NonFiniteStatisticsError` naming the channels when a
            training batch's statistics are not finite. Without it such a batch leaves the running
            statistics untouched, silently.
        backend: kernel backend (see :mod:`bnlab.kernels`); None chooses automatically.

    Shape:
        input and output (N, C, *), contiguous or channels_last; ``mask`` (N, *).

    Details: normalization uses the biased batch variance, ``running_var`` the unbiased one, as
    torch.nn; see :func:`bnlab.functional.batch_norm` for the numerical choices.
    """

    expected_dims: tuple[int, ...] = ()  # empty: any rank >= 2

    def _check_input_dim(self, input: Tensor) -> None:
        if self.expected_dims and input.dim() not in self.expected_dims:
            wanted = " or ".join(f"{d}D" for d in self.expected_dims)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input)")
        if input.dim() >= 2 and input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels "
                f"on dim 1, got input of shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Normalize ``input``; an optional bool ``mask`` (N, *spatial) restricts the batch
        statistics to its True positions (see :func:`bnlab.functional.batch_norm`)."""
        if mask is None:
            out = self._eager(input)
            if out is not None:
                return out
        self._check_input_dim(input)
        if self.statistics != "standard" and self._mixing():
            return self._mixed(input, mask)
        return F.batch_norm(
            input, **self._functional_args(), mask=mask, strict=self.strict, backend=self.backend
        )

    def _eager(
        self, input: Tensor, activation: str = "identity", param: Optional[float] = None
    ) -> Optional[Tensor]:
        """The call (then ``activation``) by the selected backend's eager path, as
        :func:`bnlab.functional.batch_norm_act` would run it, when nothing else is asked
        (standard statistics, no backend named); else None, and the caller takes the full path.

        The checks and the backend selection run on the first call of each
        :func:`bnlab.functional.call_signature` and their verdict is kept on the layer (a plain
        attribute, not in ``state_dict``; the last 8 signatures, so that alternating training and
        eval or a few input sizes decide once each): later calls go straight to the kernel, as
        torch.nn's go to ATen's op. A vector replaced since fails ATen's own checks, and the full
        path then says what is wrong. Inside a model the checks' frames cost small layers 3% of an
        eval forward and 2-3% of a training step (benchmarks/model_speed.py)."""
        if self.statistics != "standard" or self.backend is not None or traced():
            return None
        weight, bias, mean, var, tracked = self._state()
        if self.training and not self.track_running_stats:
            mean = var = tracked = None
        training = self.training or mean is None
        signature = F.call_signature(
            input, training, mean is None, activation, param, self.eps, self.momentum
        )
        running = RunningStatistics(mean, var, tracked, self.momentum)
        plans = self.__dict__.get(EAGER_PLAN)
        if plans is None:
            plans = self.__dict__[EAGER_PLAN] = {}
        run = plans.get(signature, _UNDECIDED)
        if run is _UNDECIDED:
            self._check_input_dim(input)
            activation, checked = F.check_activation(activation, param, False)
            run = F.eager_path(
                input, weight, bias, running, training, self.eps, activation, checked
            )
            if len(plans) >= _PLANS_KEPT:
                del plans[next(iter(plans))]  # the oldest decision
            plans[signature] = run
        if run is None:
            return None
        try:
            return run(input, weight, bias, running, self.strict)
        except RuntimeError:  # a vector changed under the plan: the full path raises its error
            plans.pop(signature, None)
            return None

    def add_act(
        self,
        input: Tensor,
        residual: Tensor,
        activation: str = "relu",
        activation_param: Optional[float] = None,
        inplace: bool = False,
    ) -> Tensor:
        r"""``act(self(input) + residual)``: the end of a residual unit, what a block's own
        ``x = bn(x); x += shortcut; x = act(x)`` computes (see
        :func:`bnlab.functional.batch_norm_add_act`).

        .. math::
            y = \mathrm{act}(\mathrm{BN}(x) + r)

        Where bnlab's kernels take the input, one normalizing pass adds the residual and applies
        the activation; elsewhere this layer's forward runs, then ``+= residual`` and the
        activation in place, as the block's code would. ``inplace``: in-place activated batch
        norm (identity or leaky_relu; gamma enters as |gamma| + eps), y written over ``input``.
        The layer's forward hooks do not run here."""
        # before the running statistics move
        activation, param = check_residual(residual, input, activation, activation_param, inplace)
        if not inplace and not self._adds_residual(input, activation):
            out = self.forward(input)
            return activate_in_place(out.add_(residual), activation, param)
        self._check_input_dim(input)
        if self.statistics != "standard" and self._mixing():
            weight = self.weight
            if inplace and weight is not None:
                weight = weight.abs() + self.eps
            out = self._mixed(input, weight=weight).add_(residual)
            return activate_in_place(out, activation, param)
        return F.batch_norm_add_act(
            input,
            residual,
            **self._functional_args(),
            activation=activation,
            activation_param=param,
            inplace=inplace,
            strict=self.strict,
            backend=self.backend,
        )

    def concat(self, chunks: Sequence[Tensor]) -> Tensor:
        r"""``self(torch.cat(chunks, 1))`` without copying the chunks each call: a dense block's
        layer normalizing the block's input and the features added so far, read from a buffer
        the block's layers share (see :func:`bnlab.concat.batch_norm_concat_act`); the
        layer's activation, if it has one, applied in the same pass.

        .. math::
            y = \mathrm{act}(\mathrm{BN}([x_1, \ldots, x_k]))

        Where that op's kernels do not take the chunks (:func:`bnlab.concat.takes`: among
        others, concatenations too small to gain), or the layer is in another statistics mode or
        the in-place mode, this is ``self.forward(torch.cat(chunks, 1))``. The layer's forward
        hooks do not run here."""
        training = self.training or self.running_mean is None
        fused = None  # asked second: small layers (most calls) answer the cheap question first
        if self.statistics == "standard" and worth_buffering(chunks, training):
            fused = self._concat_activation()
        if fused is None or not takes(chunks, fused[0], self.backend, training):
            # the layer's own path (its decisions kept per input signature) on the concatenation
            return self.forward(chunks[0] if len(chunks) == 1 else torch.cat(list(chunks), 1))
        activation, param = fused
        self._check_input_dim(joined_shape(chunks))
        return batch_norm_concat_act(
            chunks,
            **self._functional_args(),
            activation=activation,
            activation_param=param,
            strict=self.strict,
            backend=self.backend,
        )

    def _concat_activation(self) -> Optional[tuple[str, Optional[float]]]:
        """(activation, param) that this layer's forward applies after batch norm, for
        :meth:`concat`; None where its forward computes anything else (a subclass's own)."""
        return ("identity", None) if type(self).forward is BatchNorm.forward else None

    def _adds_residual(self, input: Tensor, activation: str) -> bool:
        """Whether the backend selection gives this input to kernels that add a residual in their
        normalizing pass (decided once per input signature, kept with the eager decisions)."""
        key = (_RESIDUAL, input.shape, input.stride(), input.dtype, input.device, self.training)
        key += (activation, self.backend) + selection_state()
        plans = self.__dict__.setdefault(EAGER_PLAN, {})
        adds = plans.get(key)
        if adds is None:
            op = "batch_norm_act" if self.training else "batch_norm_act_eval"
            adds = plans[key] = adds_residual(select_backend(op, input, self.backend, activation))
            if len(plans) > _PLANS_KEPT:
                del plans[next(iter(plans))]
        return adds

    def _functional_args(self) -> dict:
        """Statistics, parameters and mode as torch.nn decides them (``statistics="standard"``:
        batch statistics in training or without running ones; running statistics updated only
        when tracked), or as the layer's statistics mode fixes them (see :func:`set_statistics`).
        """
        mode = self.statistics
        if mode != "standard":
            mode = _statistics_mode(self)
        weight, bias, running_mean, running_var, num_batches_tracked = self._state()
        if mode == "standard":
            use_running = not self.training or self.track_running_stats
            training = self.training or running_mean is None
        else:
            if mode == "running" and running_mean is None:
                raise ValueError(
                    f"{type(self).__name__} has no running statistics (track_running_stats=False)"
                    " to normalize with: statistics='running' needs them"
                )
            use_running, training = mode == "running", mode == "batch"
        return dict(
            running_mean=running_mean if use_running else None,
            running_var=running_var if use_running else None,
            weight=weight,
            bias=bias,
            training=training,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=num_batches_tracked if use_running else None,
        )

    def _mixing(self) -> bool:
        """statistics="mix" with 0 < alpha < 1 (alpha 0 and 1 run as "running" and "batch")."""
        return _statistics_mode(self) == "mix"

    def _mixed(self, input: Tensor, mask: Optional[Tensor] = None, weight="own") -> Tensor:
        r"""Prediction-time batch norm: with the batch's mean and biased variance
        :math:`\mu_B, \sigma_B^2` and alpha = ``statistics_alpha``,

        .. math::
            \mu = (1 - \alpha)\,\mathrm{running\_mean} + \alpha\,\mu_B, \quad
            \sigma^2 = (1 - \alpha)\,\mathrm{running\_var} + \alpha\,\sigma_B^2, \quad
            y = \gamma\,(x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta

        (Schneider et al. 2020, "Improving robustness against common corruptions by covariate shift
        adaptation": alpha = n / (N + n); alpha = 1 is Nado et al. 2020's prediction-time batch
        norm). Nothing is updated. Differentiable through the batch statistics.
        ``weight``: gamma as the caller's op takes it (default: the layer's own).
        """
        weight = self.weight if isinstance(weight, str) else weight
        if mask is not None:
            raise ValueError("statistics='mix' does not take a mask")
        if self.running_mean is None:
            raise ValueError(
                f"{type(self).__name__} has no running statistics (track_running_stats=False) "
                "to mix with the batch's"
            )
        acc = accumulation_dtype(input.dtype)
        var_b, mean_b = torch.var_mean(input.to(acc), dim=reduction_dims(input), correction=0)
        alpha = float(self.statistics_alpha)
        mean = torch.lerp(self.running_mean.to(acc), mean_b, alpha)
        var = torch.lerp(self.running_var.to(acc), var_b, alpha)
        scale = torch.rsqrt(var + self.eps)
        if weight is not None:
            scale = scale * weight.to(acc)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(acc)
        return torch.addcmul(
            per_channel(shift, input), input.to(acc), per_channel(scale, input)
        ).to(input.dtype)

    def _state(self) -> tuple:
        """(weight, bias, running_mean, running_var, num_batches_tracked) straight from their
        registries in one frame (nn.Module.__getattr__ made up a third of a small layer's Python
        overhead); by attribute where one is not there, e.g. a weight under
        torch.nn.utils.parametrize."""
        params, buffers = self._parameters, self._buffers
        weight, bias = params.get("weight", _ABSENT), params.get("bias", _ABSENT)
        mean, var = buffers.get("running_mean", _ABSENT), buffers.get("running_var", _ABSENT)
        tracked = buffers.get("num_batches_tracked", _ABSENT)
        state = (weight, bias, mean, var, tracked)
        if (
            weight is _ABSENT
            or bias is _ABSENT
            or mean is _ABSENT
            or var is _ABSENT
            or tracked is _ABSENT
        ):
            names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
            state = tuple(
                getattr(self, name, None) if value is _ABSENT else value
                for name, value in zip(names, state)
            )
        return state


class BatchNorm1d(BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input; see :class:`BatchNorm`."""

    expected_dims = (2, 3)


class BatchNorm2d(BatchNorm):
    """Batch norm over (N, C, H, W) input, per channel; see :class:`BatchNorm`."""

    expected_dims = (4,)


class BatchNorm3d(BatchNorm):
    """Batch norm over (N, C, D, H, W) input, per channel; see :class:`BatchNorm`."""

    expected_dims = (5,)


def replace_all_batch_norm_modules_(root: nn.Module) -> nn.Module:
    """:func:`torch.func.replace_all_batch_norm_modules_` for bnlab's batch norms too: every batch
    norm of ``root`` (torch.nn's and bnlab's) stops tracking running statistics, in place, so that
    it normalizes with batch statistics and updates nothing under vmap / grad (the torch.func
    recipe for models with batch norm). Returns ``root``."""
    torch.func.replace_all_batch_norm_modules_(root)
    for module in root.modules():
        if isinstance(module, BatchNorm) and module.track_running_stats:
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
            module.track_running_stats = False
    return root


STATISTICS_MODES = ("standard", "running", "batch", "mix")


def _statistics_mode(layer: nn.Module) -> str:
    """The layer's statistics mode, with "mix" at alpha 0 / 1 as "running" / "batch"."""
    mode = layer.statistics
    if mode == "mix":
        alpha = layer.statistics_alpha
        if alpha is None or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"statistics='mix' needs statistics_alpha in [0, 1], got {alpha!r}")
        return "running" if alpha == 0 else "batch" if alpha == 1 else "mix"
    if mode not in STATISTICS_MODES:
        raise ValueError(f"unknown statistics mode {mode!r}; expected one of {STATISTICS_MODES}")
    return mode


def set_statistics(model: nn.Module, mode: str, alpha: Optional[float] = None) -> int:
    """Fix which statistics every bnlab batch norm of ``model`` normalizes with, whatever
    ``.train()`` / ``.eval()`` later say; returns the number of layers set.

    - ``"standard"``: torch.nn's behaviour (batch statistics and an update in training, the
      running ones in eval); the default.
    - ``"running"``: always the running statistics, never an update: fine-tuning with frozen
      batch norm (the affine parameters still train).
    - ``"batch"``: always the current batch's statistics, never an update: test-time batch
      statistics (AdaBN-style evaluation) without overwriting the running ones.
    - ``"mix"`` with ``alpha`` in [0, 1]: (1 - alpha) x running + alpha x batch mean and
      (biased) variance, never an update: prediction-time batch norm (Nado et al. 2020).

    The mode is the attribute ``statistics`` (and ``statistics_alpha``) of each layer, kept out
    of ``state_dict``, which stays torch.nn's key for key. torch.nn batch norms cannot take a mode:
    they raise here, naming them (``bnlab.convert(model)`` first), and so do layers whose
    statistics are fixed otherwise (frozen) or are not a plain batch norm's (BN-LSTM), unless the
    mode is "standard". For export, :func:`bnlab.inference.freeze` is the tool: it replaces the
    layers by fixed affine maps (torchvision's format); ``"running"`` keeps the model trainable.
    """
    if mode not in STATISTICS_MODES:
        raise ValueError(f"unknown statistics mode {mode!r}; expected one of {STATISTICS_MODES}")
    if mode == "mix" and (alpha is None or not 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"statistics='mix' needs alpha in [0, 1], got {alpha!r}")
    if mode != "mix" and alpha is not None:
        raise ValueError(f"alpha is for statistics='mix' only, got it with {mode!r}")
    layers, refused = [], []
    for name, module in model.named_modules():
        if isinstance(module, BatchNorm):
            layers.append(module)
        elif _has_own_statistics(module) and mode != "standard":
            refused.append(f"{name or '<root>'} ({type(module).__name__})")
    if refused:
        raise ValueError(
            f"set_statistics({mode!r}) cannot set {len(refused)} layer(s) that are not bnlab batch "
            f"norms: {', '.join(refused[:10])}{' ...' if len(refused) > 10 else ''}; convert "
            "torch.nn layers first (bnlab.convert(model))"
        )
    for module in layers:
        module.statistics = mode
        module.statistics_alpha = None if alpha is None else float(alpha)
    return len(layers)


def _has_own_statistics(module: nn.Module) -> bool:
    """A normalization layer with running statistics that is not a bnlab BatchNorm."""
    return "running_mean" in module._buffers or any(
        key.startswith("running_mean") for key in module._buffers
    )
