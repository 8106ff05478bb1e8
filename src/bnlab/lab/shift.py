"""Distribution shift: source statistics, AdaBN, prediction-time BN, test-batch statistics and TENT.

A small convnet with BatchNorm2d (:class:`bnlab.lab.conv.ConvNet`: conv3x3 -> BN -> ReLU ->
maxpool2, twice, then a Linear) is trained once on the clean digits (or MNIST) and evaluated on the
test split, clean (severity 0) and under five corruptions generated in code at severities 1-5.
Every corruption is a deterministic function of (images, severity, seed) on (N, 1, side, side)
images in [0, 1]. The severity tables are MNIST-C's (Mu & Gilmer 2019, its ``corruptions.py``,
which gives five levels for each corruption although the released set uses one; noise, contrast
and blur are ImageNet-C's, Hendrycks & Dietterich 2019, whose values are in the
released code), with lengths in pixels scaled by side / 28 for the 8x8 digits:

==============  ====================================  ========================================
corruption      parameter at severity 1 .. 5          definition
==============  ====================================  ========================================
gaussian_noise  std 0.08, 0.12, 0.18, 0.26, 0.38      clip(x + std * eps, 0, 1), eps ~ N(0, 1)
contrast        c 0.4, 0.3, 0.2, 0.1, 0.05            clip((x - m) c + m, 0, 1), m: image mean
gaussian_blur   sigma 1, 2, 3, 4, 6 px at 28x28       Gaussian kernel, radius ceil(3 sigma),
                (x 8/28 on the digits: 0.29 .. 1.71)  zero padding
rotation        angle 0.2, 0.4, 0.6, 0.8, 1.0 rad     bilinear, about the centre, zero fill;
                (11.5 .. 57.3 degrees)                the sign drawn per image
pixelate        kept fraction f of the side: 7/8,     area-average down to round(side * f),
                6/8, 5/8, 3/8, 2/8 (digits: 7, 6, 5,  nearest-neighbour back up
                3, 2 pixels)
==============  ====================================  ========================================

CIFAR-10-C's own tables (noise std 0.04 .. 0.10, contrast 0.75 .. 0.15, blur sigma 0.4 .. 1 px at
32x32) are milder; MNIST-C's are used. Pixelate is the exception: MNIST-C's fractions 0.6 .. 0.25
give 4, 4, 3, 2, 2 pixels on an 8x8 image (it truncates 8 f; rounding gives 5, 4, 3, 2, 2, and 4 is
an exact 2x2 block average, milder than 5), so the fractions here give 7, 6, 5, 3, 2 pixels on the
digits (24, 21, 18, 10, 7 on MNIST), whose distance from the clean images grows with
the severity (checked by the tests, as for every corruption).

The methods, each on a deep copy of the trained model (same weights, same running statistics), with
the test set in its fixed order cut into test batches of each ``test_batch_sizes`` (the last one
smaller):

- ``source``: eval mode, the training set's running statistics mu_s, sigma_s^2 (no adaptation).
- ``adabn``: AdaBN (Li et al. 2016, Algorithm 1): the running statistics replaced by
  the test domain's, mu_t = E[x], sigma_t^2 = Var[x] over every value a channel sees on the whole
  corrupted test set, by :func:`bnlab.inference.population_statistics` (one forward of the whole
  set, or Algorithm 2's average over ``adabn_batch``-sized batches), then eval mode.
- ``mix`` (one curve per alpha): bnlab's ``set_statistics(model, "mix", alpha)``,
  mu = (1 - alpha) mu_s + alpha mu_B and sigma^2 = (1 - alpha) sigma_s^2 + alpha sigma_B^2 with the
  test batch's mean and biased variance. Schneider et al. 2020 write the same mix with a
  pseudo sample size N for the source statistics and n test examples: alpha = n / (N + n), so a
  fixed alpha is N = n (1 - alpha) / alpha source pseudo-examples.
- ``batch``: ``set_statistics(model, "batch")``: each test batch normalized with its own
  statistics only, nothing updated: Nado et al. 2020's prediction-time BN (alpha = 1 of
  the mix). With one image per batch a BatchNorm2d still has side^2 (conv 1) or (side/2)^2 (conv 2)
  values per channel: an instance norm.
- ``tent``: TENT (Wang et al. 2021, section 3): batch statistics as ``batch``, and after each test
  batch one Adam step (lr ``tent_lr``, betas 0.9, 0.999, as the paper's CIFAR setup) on the BN
  affine parameters gamma, beta only, minimizing the batch's mean prediction entropy
  H(y) = -sum_c p_c log p_c. Online, as the authors' code: the batch's predictions are the logits
  of the forward that computes the loss, before that batch's update, and the updated gamma, beta
  carry over to the following batches; every (corruption, severity, test batch size) starts again
  from the trained model (their reset per corruption and severity; no episodic reset per batch).

``source`` and ``adabn`` do not depend on the test batch size (eval mode is per example); ``mix``,
``batch`` and ``tent`` are evaluated at every test batch size. The severity tables and plot use
``severity_batch``; the batch-size table and plot average over every corrupted set.

Run layout (on top of the runner's): job ``train`` (the classifier, checkpointed and resumable)
writes ``model.pt`` (its ``state_dict``) at every evaluation, so the finished job leaves the trained
model; then one job per (corruption, severity), ``clean/0`` first, whose single row holds every
accuracy: column ``source``, ``adabn``, ``mix<alpha>@<b>``, ``batch@<b>``, ``tent@<b>`` for test
batch size b. The report adds ``shift_accuracy.csv`` (one line per corruption, severity, method,
alpha, test batch size), ``shift_severity.png`` and ``shift_batch_size.png``.

At lab scale only the papers' orderings can be compared; the report states each claim and whether
it holds here.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..data import Split
from ..inference import population_statistics
from ..nn import BatchNorm, set_statistics
from .common import Dataset, by_dataset, check_positive, images, load_data, train_as_configured
from .conv import ConvNet
from .reports import batch_size_axes, heading, pct, pyplot, save, staged_report, style_axes, table
from .runner import Run, RunView, experiment

CORRUPTIONS = ("gaussian_noise", "contrast", "gaussian_blur", "rotation", "pixelate")
METHODS = ("source", "adabn", "mix", "batch", "tent")
PER_BATCH = ("mix", "batch", "tent")  # the methods whose accuracy depends on the test batch size
MAX_SEVERITY = 5

NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # MNIST-C / ImageNet-C gaussian_noise
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # MNIST-C / ImageNet-C contrast
BLUR_SIGMA_28 = (1.0, 2.0, 3.0, 4.0, 6.0)  # MNIST-C gaussian_blur, pixels of a 28x28 image
ROTATION_RAD = (0.2, 0.4, 0.6, 0.8, 1.0)  # MNIST-C rotate
PIXELATE_FRACTION = (7 / 8, 6 / 8, 5 / 8, 3 / 8, 2 / 8)  # ours (see the module docstring)

MODEL = "model.pt"
SEVERITY_PLOT = "shift_severity.png"
BATCH_PLOT = "shift_batch_size.png"
ACCURACY_CSV = "shift_accuracy.csv"
TENT_BETAS = (0.9, 0.999)


# ------------------------------------------------------------------------------------------------
# Corruptions
# ------------------------------------------------------------------------------------------------


def _level(table_: tuple[float, ...], severity: int) -> float:
    return table_[severity - 1]


def gaussian_noise(x: Tensor, severity: int, seed: int) -> Tensor:
    """clip(x + std * eps, 0, 1), eps ~ N(0, 1) drawn from a generator seeded with ``seed`` (the
    same eps at every severity, so the distance from x grows with std)."""
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return (x + _level(NOISE_STD, severity) * eps).clamp(0, 1)


def contrast(x: Tensor, severity: int, seed: int) -> Tensor:
    """clip((x - m) * c + m, 0, 1), m the image's mean: the contrast scaled by c towards it."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * _level(CONTRAST, severity) + m).clamp(0, 1)


def blur_sigma(severity: int, side: int) -> float:
    """The blur's standard deviation in pixels: MNIST-C's sigma at 28x28 times side / 28."""
    return _level(BLUR_SIGMA_28, severity) * side / 28


def gaussian_blur(x: Tensor, severity: int, seed: int) -> Tensor:
    """Separable Gaussian filter, k(d) proportional to exp(-d^2 / (2 sigma^2)) for |d| <= ceil(3
    sigma), normalized to sum 1, with zero padding (the digits' background)."""
    sigma = blur_sigma(severity, x.shape[-1])
    radius = math.ceil(3 * sigma)
    d = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(d**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    rows = nn.functional.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))
    blurred = nn.functional.conv2d(rows, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return blurred.clamp(0, 1)  # a convex combination of [0, 1] values, up to rounding


def rotation(x: Tensor, severity: int, seed: int) -> Tensor:
    """Rotate each image about its centre by +-angle (the sign drawn per image from a generator
    seeded with ``seed``), bilinear, zero fill: output(p) = x(R(+-angle) p) in coordinates
    normalized to [-1, 1] (``affine_grid`` / ``grid_sample``)."""
    angle = _level(ROTATION_RAD, severity)
    flip = torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) < 0.5
    signed = torch.where(flip, -angle, angle).to(x.dtype)
    cos, sin = torch.cos(signed), torch.sin(signed)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    rotated = nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False)
    return rotated.clamp(0, 1)  # bilinear weights are convex, up to rounding


def pixelate_size(severity: int, side: int) -> int:
    """The side the image is reduced to: round(side * f), at least 1."""
    return max(1, round(side * _level(PIXELATE_FRACTION, severity)))


def pixelate(x: Tensor, severity: int, seed: int) -> Tensor:
    """Area-average down to ``pixelate_size`` pixels a side, then nearest-neighbour back up."""
    side = x.shape[-1]
    small = nn.functional.interpolate(x, size=pixelate_size(severity, side), mode="area")
    return nn.functional.interpolate(small, size=side, mode="nearest")


CORRUPTION_FUNCTIONS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "contrast": contrast,
    "gaussian_blur": gaussian_blur,
    "rotation": rotation,
    "pixelate": pixelate,
}


def corrupt(x: Tensor, corruption: str, severity: int, seed: int = 0) -> Tensor:
    """``corruption`` at ``severity`` (0: the clean images, copied) of (N, 1, side, side) images in
    [0, 1]; deterministic in (x, corruption, severity, seed), same shape, values in [0, 1]."""
    if corruption not in CORRUPTION_FUNCTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; expected one of {CORRUPTIONS}")
    if not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be in 0..{MAX_SEVERITY}, got {severity}")
    if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
        raise ValueError(f"expected (N, 1, side, side) images, got shape {tuple(x.shape)}")
    if severity == 0:
        return x.clone()
    return CORRUPTION_FUNCTIONS[corruption](x, severity, seed)


def parameters(corruption: str, side: int) -> list[str]:
    """The corruption's parameter at severities 1..5 on ``side``-pixel images, as the report
    prints them."""
    levels = range(1, MAX_SEVERITY + 1)
    if corruption == "gaussian_noise":
        return [f"std {v:g}" for v in NOISE_STD]
    if corruption == "contrast":
        return [f"c {v:g}" for v in CONTRAST]
    if corruption == "gaussian_blur":
        return [f"sigma {blur_sigma(s, side):.2f} px" for s in levels]
    if corruption == "rotation":
        return [f"{math.degrees(v):.1f} deg" for v in ROTATION_RAD]
    return [f"{pixelate_size(s, side)} px" for s in levels]


# ------------------------------------------------------------------------------------------------
# The methods
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One method as the report draws it: ``mix`` once per alpha, the others once."""

    method: str
    alpha: Optional[float] = None

    @property
    def name(self) -> str:
        """summary.json's key: source, adabn, mix0.25 (one per alpha), batch or tent."""
        return f"mix{self.alpha:g}" if self.method == "mix" else self.method

    @property
    def label(self) -> str:
        labels = {"source": "source", "adabn": "AdaBN", "batch": "batch", "tent": "TENT"}
        return f"mix alpha={self.alpha:g}" if self.method == "mix" else labels[self.method]

    @property
    def per_batch(self) -> bool:
        return self.method in PER_BATCH

    def column(self, batch_size: Optional[int]) -> str:
        """The metrics column: ``source``, ``adabn``, or e.g. ``mix0.25@16``, ``tent@64``."""
        return f"{self.name}@{batch_size}" if self.per_batch else self.name


def lines(config: "ShiftConfig") -> list[Line]:
    """The config's methods, in :data:`METHODS` order, ``mix`` expanded to its alphas."""
    out: list[Line] = []
    for method in (m for m in METHODS if m in config.methods):
        if method == "mix":
            out += [Line("mix", a) for a in config.alphas]
        else:
            out.append(Line(method))
    return out


def with_statistics(trained: nn.Module, mode: str, alpha: Optional[float] = None) -> nn.Module:
    """A deep copy of ``trained`` in eval mode whose batch norms normalize as ``mode`` says
    (:func:`bnlab.nn.set_statistics`); ``trained`` is left as it was."""
    model = copy.deepcopy(trained).eval()
    set_statistics(model, mode, alpha)
    return model


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """The logits of ``model`` on ``x``, fed in consecutive batches of ``batch_size``."""
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of argmax predictions equal to the labels."""
    return int((logits.argmax(dim=1) == y).sum()) / len(y)


def adabn_model(trained: nn.Module, x: Tensor, batch: Optional[int] = None) -> nn.Module:
    """A copy of ``trained`` whose running statistics are the population statistics of ``x``
    (Li et al. 2016's AdaBN): :func:`bnlab.inference.population_statistics` over ``x`` as one
    batch (``batch`` None) or in batches of ``batch``; eval mode."""
    model = copy.deepcopy(trained)
    batch = batch or len(x)
    population_statistics(model, [x[i : i + batch] for i in range(0, len(x), batch)])
    return model.eval()


def bn_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """gamma and beta of every bnlab batch norm of ``model``: TENT's parameters."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, BatchNorm):
            params += [p for p in (module.weight, module.bias) if p is not None]
    return params


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of each row's softmax: H = -sum_c p_c log p_c."""
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


def tent(trained: nn.Module, x: Tensor, batch_size: int, lr: float) -> tuple[Tensor, nn.Module]:
    """TENT online over ``x`` in consecutive batches (Wang et al. 2021, section 3): batch
    statistics; for each batch, its logits are the prediction, then one Adam step on the BN
    affine parameters minimizes the batch's mean entropy. Returns (the logits, the adapted copy);
    ``trained`` is left as it was."""
    model = with_statistics(trained, "batch")
    params = bn_affine_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, betas=TENT_BETAS)
    outputs = []
    with torch.enable_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            outputs.append(logits.detach())
            optimizer.zero_grad(set_to_none=True)
            entropy(logits).mean().backward()
            optimizer.step()
    return torch.cat(outputs), model


def method_logits(
    line: Line, trained: nn.Module, x: Tensor, batch_size: Optional[int], config: "ShiftConfig"
) -> Tensor:
    """The logits of one method (at one test batch size where it has one) on ``x``."""
    if line.method == "source":
        return predict(with_statistics(trained, "standard"), x, len(x))
    if line.method == "adabn":
        return predict(adabn_model(trained, x, config.adabn_batch), x, len(x))
    if line.method == "mix":
        return predict(with_statistics(trained, "mix", line.alpha), x, batch_size)
    if line.method == "batch":
        return predict(with_statistics(trained, "batch"), x, batch_size)
    return tent(trained, x, batch_size, config.tent_lr)[0]


def evaluate_cell(trained: nn.Module, x: Tensor, y: Tensor, config: "ShiftConfig") -> dict:
    """Every method's accuracy on one (corrupted) test set: column (:meth:`Line.column`) ->
    accuracy."""
    row: dict[str, float] = {}
    for line in lines(config):
        for b in config.test_batch_sizes if line.per_batch else (None,):
            row[line.column(b)] = accuracy(method_logits(line, trained, x, b, config), y)
    return row


# ------------------------------------------------------------------------------------------------
# Config and the experiment
# ------------------------------------------------------------------------------------------------


@dataclass
class ShiftConfig:
    dataset: Dataset = (  # digits: 8x8 images as (N, 1, 8, 8); mnist: 28x28 (IDX files in data_dir)
        "digits"
    )
    data_dir: Optional[str] = None  # MNIST directory (selects mnist); None: $BNLAB_DATA_DIR
    corruptions: tuple[str, ...] = CORRUPTIONS  # some of the five in bnlab.lab.shift.CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)  # severities 1-5 evaluated; clean (0) always
    methods: tuple[str, ...] = METHODS  # some of source, adabn, mix, batch, tent
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)  # mix: weight of the test batch's statistics
    test_batch_sizes: tuple[int, ...] = (1, 4, 16, 64, 256)  # test batches of mix, batch, tent
    severity_batch: int = 64  # the test batch size of mix/batch/tent in the severity tables, plot
    tent_lr: float = 1e-3  # TENT's Adam learning rate (the paper's on CIFAR-10-C)
    adabn_batch: Optional[int] = None  # AdaBN statistics in batches of this; None: whole test set
    test_examples: Optional[int] = None  # first so many test images; None: all 359 / mnist 2,000
    corruption_seed: int = 0  # the noise and the rotations' directions
    steps: Optional[int] = None  # training steps; None: 2,000 on digits, 6,000 on mnist
    eval_every: Optional[int] = None  # clean test accuracy every so many steps; None: steps / 20
    batch_size: int = 32  # training examples per mini-batch
    lr: float = 0.03  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    channels: tuple[int, ...] = (16, 32)  # output channels of the two conv layers
    seed: int = 0  # initialization and mini-batch order
    checkpoint_every: int = 500  # training steps between checkpoints (0: none)

    def resolve(self) -> "ShiftConfig":
        steps = by_dataset(self.steps, self.dataset, 2000, 6000)
        c = replace(
            self,
            steps=steps,
            eval_every=self.eval_every or max(1, steps // 20),
            test_examples=by_dataset(self.test_examples, self.dataset, None, 2000),
            severities=tuple(sorted(set(self.severities))),
            test_batch_sizes=tuple(sorted(set(self.test_batch_sizes))),
        )
        check_positive(c, "steps", "eval_every", "batch_size", "lr", "tent_lr")
        _check_choices("corruptions", c.corruptions, CORRUPTIONS)
        _check_choices("methods", c.methods, METHODS)
        _check_ranges(c)
        return c


def _check_choices(name: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    unknown = [v for v in values if v not in allowed]
    if not values or unknown:
        raise ValueError(f"{name} must be some of {', '.join(allowed)}; got {list(values)}")


def _check_ranges(c: ShiftConfig) -> None:
    if not c.severities or not 1 <= min(c.severities) <= max(c.severities) <= MAX_SEVERITY:
        raise ValueError(f"severities must be in 1..{MAX_SEVERITY}, got {c.severities}")
    if "mix" in c.methods and (not c.alphas or not all(0 < a < 1 for a in c.alphas)):
        raise ValueError(f"alphas must be in (0, 1) (0 is source, 1 is batch), got {c.alphas}")
    if not c.test_batch_sizes or min(c.test_batch_sizes) < 1:
        raise ValueError(f"test_batch_sizes must be >= 1, got {c.test_batch_sizes}")
    if c.severity_batch not in c.test_batch_sizes:
        raise ValueError(f"severity_batch {c.severity_batch} is not in {c.test_batch_sizes}")
    for name in ("adabn_batch", "test_examples"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise ValueError(f"{name} must be >= 1 or none, got {getattr(c, name)}")
    if len(c.channels) != 2 or min(c.channels) < 1:
        raise ValueError(f"channels must be two positive ints, got {c.channels}")


def cells(config: ShiftConfig) -> list[tuple[str, int]]:
    """The evaluated sets in order: ("clean", 0), then (corruption, severity) for each."""
    return [("clean", 0)] + [(c, s) for c in config.corruptions for s in config.severities]


def image_split(config: ShiftConfig) -> Split:
    """The config's dataset as (N, 1, side, side) images, the test split cut to
    ``test_examples``."""
    flat = load_data(config.dataset, config.data_dir)
    n = config.test_examples or len(flat.test_y)
    return Split(images(flat.train_x), flat.train_y, images(flat.test_x[:n]), flat.test_y[:n])


def build_model(config: ShiftConfig, data: Split) -> ConvNet:
    return ConvNet(data.train_x.shape[-1], tuple(config.channels), data.num_classes, True)


def save_model(model: nn.Module, path: Path) -> None:
    """``model.state_dict()`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def load_model(config: ShiftConfig, data: Split, path: Path) -> ConvNet:
    """The trained model saved by the ``train`` job, in eval mode."""
    model = build_model(config, data)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def train(run: Run, data: Split) -> None:
    """Job ``train``: the convnet on the clean training set (SGD with momentum); ``model.pt`` is
    rewritten at every evaluation, so a finished job leaves the trained model there."""
    c: ShiftConfig = run.config

    def keep(step: int, model: nn.Module) -> dict:
        save_model(model, run.dir / MODEL)
        return {}

    train_as_configured(
        run,
        "train",
        data,
        c,
        build=lambda: build_model(c, data),
        optimizer=lambda p: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum),
        extra_eval=keep,
    )


def evaluate_shift(run: Run, data: Split) -> None:
    """One job per evaluated set (:func:`cells`): its row holds every method's accuracy."""
    c: ShiftConfig = run.config
    trained = load_model(c, data, run.dir / MODEL)
    for corruption, severity in cells(c):
        x = data.test_x
        if corruption != "clean":
            x = corrupt(x, corruption, severity, c.corruption_seed)
        run.train(
            f"{corruption}/{severity}",
            steps=0,
            step=lambda i: 0.0,
            evaluate=lambda i, x=x: evaluate_cell(trained, x, data.test_y, c),
            state={},
            tags={"corruption": corruption, "severity": severity},
        )


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


@dataclass
class Claim:
    """One paper's qualitative claim, reduced to "``better`` exceeds ``worse``", and this run's
    verdict: "holds", "does not hold", or "tie" when the two differ by less than ``tie`` (one test
    image per set, 1 / n)."""

    key: str  # summary.json's name for it
    source: str  # who claims it, where
    claim: str  # the claim, as the paper makes it
    evidence: str  # this run's numbers: a template over ``numbers`` (formatted as percent)
    numbers: dict[str, float]
    better: str  # the number the claim puts ahead
    worse: str  # the number it puts behind
    tie: float  # differences below this are a tie

    @property
    def margin(self) -> float:
        return self.numbers[self.better] - self.numbers[self.worse]

    @property
    def verdict(self) -> str:
        if abs(self.margin) < self.tie:
            return "tie"
        return "holds" if self.margin > 0 else "does not hold"

    def text(self) -> str:
        return self.evidence.format(**{k: pct(v) for k, v in self.numbers.items()})


@dataclass
class ShiftSummary:
    """Every number the shift report quotes, computed once from the rows."""

    lines: list[Line]
    corruptions: tuple[str, ...]  # the corruptions with at least one evaluated severity
    severities: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    at: int  # the test batch size of the severity tables
    rows: dict[tuple[str, int], dict]  # (corruption, severity) -> its row; ("clean", 0) clean
    test_images: int  # images per evaluated set
    side: int  # pixels per image side
    claims: list[Claim] = field(default_factory=list)

    def acc(self, line: Line, corruption: str, severity: int, b: Optional[int] = None):
        """One accuracy (None: not evaluated); ``b`` defaults to :attr:`at`."""
        row = self.rows.get((corruption, severity))
        return None if row is None else row.get(line.column(b or self.at))

    def mean_over(self, line: Line, keys, b: Optional[int] = None) -> Optional[float]:
        values = [v for c, s in keys if (v := self.acc(line, c, s, b)) is not None]
        return mean(values) if values else None

    def shifted(self) -> list[tuple[str, int]]:
        return [key for key in self.rows if key[0] != "clean"]

    def shifted_mean(self, line: Line, b: Optional[int] = None) -> Optional[float]:
        """Mean accuracy over every corrupted set (all corruptions and severities)."""
        return self.mean_over(line, self.shifted(), b)

    def severity_mean(self, line: Line, severity: int) -> Optional[float]:
        """Mean over the corruptions at one severity (0: the clean set), at :attr:`at`."""
        if severity == 0:
            return self.acc(line, "clean", 0)
        return self.mean_over(line, [(c, severity) for c in self.corruptions])

    def corruption_mean(self, line: Line, corruption: str) -> Optional[float]:
        """Mean over the severities of one corruption, at :attr:`at`."""
        return self.mean_over(line, [(corruption, s) for s in self.severities])

    def line(self, name: str) -> Optional[Line]:
        return next((line for line in self.lines if line.name == name), None)

    def headline(self) -> dict[str, Any]:
        """summary.json: accuracies at :attr:`at` (clean, mean shifted, by severity, by corruption),
        the batch-size means, and which claims hold."""
        if not self.rows:
            return {}
        per_batch = [line for line in self.lines if line.per_batch]
        return {
            "test_batch": self.at,
            "clean": {ln.name: self.acc(ln, "clean", 0) for ln in self.lines},
            "shifted_mean": {ln.name: self.shifted_mean(ln) for ln in self.lines},
            "by_severity": {
                ln.name: {str(s): self.severity_mean(ln, s) for s in (0, *self.severities)}
                for ln in self.lines
            },
            "by_corruption": {
                ln.name: {c: self.corruption_mean(ln, c) for c in self.corruptions}
                for ln in self.lines
            },
            "shifted_by_batch_size": {
                ln.name: {str(b): self.shifted_mean(ln, b) for b in self.batch_sizes}
                for ln in per_batch
            },
            "clean_by_batch_size": {
                ln.name: {str(b): self.acc(ln, "clean", 0, b) for b in self.batch_sizes}
                for ln in per_batch
            },
            "claims": {claim.key: claim.verdict for claim in self.claims},
        }


def summarize(view: RunView) -> ShiftSummary:
    """The rows of the evaluated sets, by (corruption, severity), and the claims they decide."""
    c: ShiftConfig = view.config
    rows = {(r["corruption"], r["severity"]): r for r in view.rows if "corruption" in r}
    summary = ShiftSummary(
        lines=lines(c),
        corruptions=tuple(x for x in c.corruptions if any(k[0] == x for k in rows)),
        severities=c.severities,
        batch_sizes=c.test_batch_sizes,
        at=c.severity_batch,
        rows=rows,
        test_images=test_size(view),
        side=28 if c.dataset == "mnist" else 8,
    )
    if ("clean", 0) in rows and summary.shifted():
        summary.claims = claims(summary, 1 / summary.test_images)
    return summary


def test_size(view: RunView) -> int:
    """The number of test images the run evaluated on."""
    c: ShiftConfig = view.config
    n = len(load_data(c.dataset, c.data_dir).test_y)
    return min(n, c.test_examples or n)


def claims(s: ShiftSummary, tie: float) -> list[Claim]:
    """The papers' qualitative claims that the run's methods can test; ``tie``: differences below
    it (one test image per set) are reported as ties."""
    makers = (
        _adabn_claim,
        _nado_shift_claim,
        _nado_clean_claim,
        _small_batch_claim,
        _schneider_small_claim,
        _schneider_large_claim,
        _tent_claim,
    )
    return [claim for make in makers if (claim := make(s, tie)) is not None]


def _adabn_claim(s: ShiftSummary, tie: float) -> Optional[Claim]:
    source, adabn = s.line("source"), s.line("adabn")
    if source is None or adabn is None:
        return None
    ahead = sum(s.acc(adabn, *k) > s.acc(source, *k) for k in s.shifted())
    return Claim(
        "adabn_beats_source",
        "Li et al. 2016 (AdaBN)",
        "normalizing with the target domain's statistics beats the source statistics under "
        "domain shift",
        f"AdaBN {{adabn}}% against source {{source}}% (mean over the {len(s.shifted())} corrupted "
        f"sets); AdaBN is ahead on {ahead} of them",
        {"adabn": s.shifted_mean(adabn), "source": s.shifted_mean(source)},
        "adabn",
        "source",
        tie,
    )


def _nado_shift_claim(s: ShiftSummary, tie: float) -> Optional[Claim]:
    source, batch = s.line("source"), s.line("batch")
    if source is None or batch is None:
        return None
    return Claim(
        "prediction_time_bn_helps_under_shift",
        "Nado et al. 2020, their CIFAR-10-C / ImageNet-C results",
        "prediction-time BN (the prediction batch's own statistics) improves accuracy under "
        "covariate shift",
        f"batch statistics at test batch {s.at} {{batch}}% against source {{source}}% (mean over "
        "the corrupted sets)",
        {"batch": s.shifted_mean(batch), "source": s.shifted_mean(source)},
        "batch",
        "source",
        tie,
    )


def _nado_clean_claim(s: ShiftSummary, tie: float) -> Optional[Claim]:
    source, batch = s.line("source"), s.line("batch")
    if source is None or batch is None:
        return None
    small = min(s.batch_sizes)
    clean = {"batch": s.acc(batch, "clean", 0), "source": s.acc(source, "clean", 0)}
    return Claim(
        "prediction_time_bn_costs_little_on_clean",
        "Nado et al. 2020, their clean test sets",
        "on unshifted data prediction-time BN costs little accuracy or none (taken here as: at "
        "most 1 point below source)",
        f"clean test set, batch statistics at test batch {s.at} {{batch}}% against source "
        f"{{source}}% (at test batch {small}: {{batch_small}}%)",
        {
            **clean,
            "source_less_1": clean["source"] - 0.01,
            "batch_small": s.acc(batch, "clean", 0, small),
        },
        "batch",
        "source_less_1",
        tie,
    )


def _small_batch_claim(s: ShiftSummary, tie: float) -> Optional[Claim]:
    batch = s.line("batch")
    if batch is None or len(s.batch_sizes) < 2:
        return None
    small, large = min(s.batch_sizes), max(s.batch_sizes)
    return Claim(
        "batch_statistics_degrade_at_small_batches",
        "Nado et al. 2020 and Schneider et al. 2020, accuracy by test batch size",
        "batch statistics lose accuracy as the test batch gets small",
        f"batch statistics at test batch {small} {{small}}% against {{large}}% at {large} "
        f"(corrupted mean); on the clean set {{clean_small}}% against {{clean_large}}%",
        {
            "small": s.shifted_mean(batch, small),
            "large": s.shifted_mean(batch, large),
            "clean_small": s.acc(batch, "clean", 0, small),
            "clean_large": s.acc(batch, "clean", 0, large),
        },
        "large",
        "small",
        tie,
    )


def _best_mix(s: ShiftSummary, b: int) -> Optional[Line]:
    mixes = [line for line in s.lines if line.method == "mix"]
    return max(mixes, key=lambda ln: s.shifted_mean(ln, b)) if mixes else None


def _schneider_small_claim(s: ShiftSummary, tie: float) -> Optional[Claim]:
    small, batch = min(s.batch_sizes), s.line("batch")
    mix = _best_mix(s, small)
    if mix is None or batch is None:
        return None
    return Claim(
        "mix_beats_batch_at_small_batches",
        "Schneider et al. 2020 (the source statistics' pseudo sample size N)",
        "with few test examples per batch, mixing in the source statistics (alpha < 1) beats "
        "the test batch's statistics alone",
        f"test batch {small}: the best mix ({mix.label}) {{mix}}% against batch {{batch}}% "
        "(corrupted means)",
        {"mix": s.shifted_mean(mix, small), "batch": s.shifted_mean(batch, small)},
        "mix",
        "batch",
        tie,
    )


def _schneider_large_claim(s: ShiftSummary, tie: float) -> Optional[Claim]:
    large, batch = max(s.batch_sizes), s.line("batch")
    mix = _best_mix(s, large)
    if mix is None or batch is None:
        return None
    return Claim(
        "batch_beats_mix_at_large_batches",
        "Schneider et al. 2020",
        "with many test examples per batch, full adaptation (alpha = 1) is best",
        f"test batch {large}: batch {{batch}}% against the best mix ({mix.label}) {{mix}}% "
        "(corrupted means)",
        {"batch": s.shifted_mean(batch, large), "mix": s.shifted_mean(mix, large)},
        "batch",
        "mix",
        tie,
    )


def _tent_claim(s: ShiftSummary, tie: float) -> Optional[Claim]:
    tent_, batch = s.line("tent"), s.line("batch")
    if tent_ is None or batch is None:
        return None
    ahead = sum(s.shifted_mean(tent_, b) >= s.shifted_mean(batch, b) for b in s.batch_sizes)
    return Claim(
        "tent_beats_batch",
        "Wang et al. 2021 (TENT), section 4.1 and Table 2",
        "TENT is more accurate than test-batch normalization alone on corrupted data",
        f"test batch {s.at}: TENT {{tent}}% against batch {{batch}}% (corrupted mean; "
        f"{math.ceil(s.test_images / s.at)} batches per set, the first predicted before any "
        f"update); TENT is at least as accurate at {ahead} of {len(s.batch_sizes)} test batch "
        "sizes",
        {"tent": s.shifted_mean(tent_), "batch": s.shifted_mean(batch)},
        "tent",
        "batch",
        tie,
    )


STYLES = {"source": ("k", "--"), "adabn": ("k", "-"), "batch": ("C1", "-"), "tent": ("C2", "-")}


def _style(line: Line) -> dict:
    """Source dashed and AdaBN solid in black, batch orange, TENT green, mix in blues (darker for
    a larger alpha)."""
    if line.method == "mix":
        return {"color": pyplot().get_cmap("Blues")(0.35 + 0.6 * line.alpha), "ls": ":"}
    color, ls = STYLES[line.method]
    return {"color": color, "ls": ls}


def write_files(view: RunView, s: ShiftSummary) -> None:
    """The long CSV and both figures (nothing when no set was evaluated yet)."""
    if not s.rows:
        return
    write_csv(view.plot_path(ACCURACY_CSV), s)
    plot_severity(view.plot_path(SEVERITY_PLOT), s, view.config)
    plot_batch_size(view.plot_path(BATCH_PLOT), s)


def csv_rows(s: ShiftSummary) -> list[dict[str, Any]]:
    """One row per (corruption, severity, method, alpha, test batch size) evaluated; the batch
    size is empty for source and AdaBN, which do not depend on it."""
    out = []
    for (corruption, severity), row in s.rows.items():
        for line in s.lines:
            for b in s.batch_sizes if line.per_batch else (None,):
                out.append(
                    {
                        "corruption": corruption,
                        "severity": severity,
                        "method": line.method,
                        "alpha": "" if line.alpha is None else line.alpha,
                        "test_batch_size": "" if b is None else b,
                        "accuracy": row[line.column(b)],
                    }
                )
    return out


def write_csv(path: Path, s: ShiftSummary) -> None:
    rows = csv_rows(s)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def plot_severity(path: Path, s: ShiftSummary, c: ShiftConfig) -> None:
    """Accuracy against severity (0 = clean) per method: the mean over corruptions, then one
    panel per corruption."""
    panels = ["mean", *s.corruptions]
    cols = min(3, len(panels))
    fig, axes = pyplot().subplots(
        math.ceil(len(panels) / cols), cols, figsize=(4.2 * cols, 3.4 * math.ceil(len(panels) / 3))
    )
    axes = list(getattr(axes, "flat", [axes]))
    severities = (0, *s.severities)
    for ax, panel in zip(axes, panels):
        for line in s.lines:
            ys = [_panel_value(s, line, panel, sev) for sev in severities]
            ax.plot(
                severities,
                [_percent(y) for y in ys],
                marker="o",
                ms=3,
                label=line.label,
                **_style(line),
            )
        ax.set_xticks(severities)
        ax.set_ylim(0, 100)
        ax.set_title(f"{panel} ({c.dataset}, test batch {s.at})", fontsize=9)
        style_axes(ax, "severity (0 = clean)", "test accuracy (%)", fontsize=7)
        if panel != "mean":
            ax.get_legend().remove()
    for ax in axes[len(panels) :]:
        ax.axis("off")
    save(fig, path)


def _panel_value(s: ShiftSummary, line: Line, panel: str, severity: int) -> Optional[float]:
    if panel == "mean" or severity == 0:
        return s.severity_mean(line, severity)
    return s.acc(line, panel, severity)


def _percent(value: Optional[float]) -> float:
    return math.nan if value is None else 100 * value


def plot_batch_size(path: Path, s: ShiftSummary) -> None:
    """Accuracy against the test batch size per method, on the clean set and averaged over the
    corrupted sets; source and AdaBN (independent of it) as horizontal lines."""
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, which in zip(axes, ("clean", "corrupted")):
        for line in s.lines:
            if line.per_batch:
                ys = [_batch_value(s, line, which, b) for b in s.batch_sizes]
                ax.plot(
                    s.batch_sizes,
                    [_percent(y) for y in ys],
                    marker="o",
                    ms=3,
                    label=line.label,
                    **_style(line),
                )
            else:
                ax.axhline(
                    _percent(_batch_value(s, line, which, None)),
                    lw=1,
                    label=line.label,
                    **_style(line),
                )
        title = "clean test set" if which == "clean" else "mean over corrupted sets"
        batch_size_axes(ax, list(s.batch_sizes), title)
        ax.set_xlabel("test batch size")
        ax.get_legend().remove()
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save(fig, path)


def _batch_value(s: ShiftSummary, line: Line, which: str, b: Optional[int]) -> Optional[float]:
    if which == "clean":
        return s.acc(line, "clean", 0, b)
    return s.shifted_mean(line, b)


def render(s: ShiftSummary, c: ShiftConfig) -> str:
    """report.md: setup, the corruption table, accuracy by severity, by corruption and by test
    batch size, the papers' claims, the figures."""
    lines_ = heading("Distribution shift: BN statistics at test time", *_setup(c))
    if not s.rows:
        return "\n".join(lines_ + ["No test set evaluated yet.", ""])
    lines_ += _corruption_table(c)
    lines_ += _severity_table(s) + _corruption_means(s) + _batch_tables(s)
    lines_ += _claims_section(s)
    lines_ += [
        f"![accuracy by severity]({SEVERITY_PLOT})",
        "",
        f"![accuracy by test batch size]({BATCH_PLOT})",
        "",
        f"Every accuracy: [{ACCURACY_CSV}]({ACCURACY_CSV}).",
        "",
    ]
    return "\n".join(lines_)


def _setup(c: ShiftConfig) -> list[str]:
    n = f"the first {c.test_examples:,}" if c.test_examples else "all"
    return [
        f"Dataset **{c.dataset}** as (N, 1, side, side) images. Convnet conv3x3({c.channels[0]}) "
        f"-> BN -> ReLU -> maxpool2 -> conv3x3({c.channels[1]}) -> BN -> ReLU -> maxpool2 -> "
        f"Linear, trained once on the clean training set: SGD (lr {c.lr:g}, momentum "
        f"{c.momentum:g}), batch {c.batch_size}, {c.steps:,} steps, seed {c.seed}. Evaluated on "
        f"{n} test images, clean and under each corruption (seed {c.corruption_seed}), every "
        "method starting from the same trained weights and running statistics.",
        "Methods: **source** (running statistics), **AdaBN** (population statistics of the whole "
        "corrupted test set, Li et al. 2016), **mix alpha** (prediction-time BN mixed with the "
        "source statistics: (1 - alpha) running + alpha batch, Schneider et al. 2020's "
        "alpha = n / (N + n)), **batch** (each test batch's own statistics, Nado et al. 2020's "
        f"prediction-time BN), **TENT** (batch statistics and one Adam step, lr {c.tent_lr:g}, on "
        "the BN affine parameters per test batch minimizing the mean prediction entropy; each "
        "batch is predicted before its own update, the updates carry over to later batches, "
        "Wang et al. 2021). Source and AdaBN do not depend on the test batch size.",
    ]


def _corruption_table(c: ShiftConfig) -> list[str]:
    side = 28 if c.dataset == "mnist" else 8
    rows = [[name, *parameters(name, side)] for name in c.corruptions]
    return [
        "Corruption parameters (MNIST-C's tables, lengths scaled to the image; definitions in "
        "`bnlab.lab.shift`):",
        "",
        *table(["corruption", *map(str, range(1, MAX_SEVERITY + 1))], rows),
        "",
    ]


def _severity_table(s: ShiftSummary) -> list[str]:
    severities = (0, *s.severities)
    rows = [
        [ln.label, *[pct(s.severity_mean(ln, v)) for v in severities], pct(s.shifted_mean(ln))]
        for ln in s.lines
    ]
    header = ["method", "clean", *map(str, s.severities), "mean"]
    return [
        f"## Accuracy (%) by severity, mean over corruptions (test batch {s.at})",
        "",
        *table(header, rows),
        "",
    ]


def _corruption_means(s: ShiftSummary) -> list[str]:
    rows = [[ln.label, *[pct(s.corruption_mean(ln, c)) for c in s.corruptions]] for ln in s.lines]
    return [
        f"## Accuracy (%) by corruption, mean over severities (test batch {s.at})",
        "",
        *table(["method", *s.corruptions], rows),
        "",
    ]


def _batch_tables(s: ShiftSummary) -> list[str]:
    out = ["## Accuracy (%) by test batch size", ""]
    for title, value in (
        ("Mean over the corrupted sets:", lambda ln, b: s.shifted_mean(ln, b)),
        ("Clean test set:", lambda ln, b: s.acc(ln, "clean", 0, b)),
    ):
        rows = [
            [ln.label, *[pct(value(ln, b if ln.per_batch else None)) for b in s.batch_sizes]]
            for ln in s.lines
        ]
        out += [title, "", *table(["method", *map(str, s.batch_sizes)], rows), ""]
    return out


def _claims_section(s: ShiftSummary) -> list[str]:
    out = ["## The papers' claims at lab scale", ""]
    if not s.claims:
        return out + ["Needs the clean set and at least one corrupted set.", ""]
    for claim in s.claims:
        out.append(f"- {claim.source}: {claim.claim}. Here: {claim.text()}: **{claim.verdict}**.")
    side = s.side
    return out + [
        "",
        "A tie: the two accuracies differ by less than one test image per set "
        f"({pct(s.claims[0].tie)} points). At test batch 1 the batch statistics are not "
        f"meaningless here: a BatchNorm2d still averages over the {side * side} positions of one "
        f"image (first conv) and {(side // 2) ** 2} (second), an instance norm.",
        "",
    ]


@experiment("shift", ShiftConfig, staged_report(summarize, write_files, render))
def shift(run: Run) -> None:
    """Distribution shift: source, AdaBN, prediction-time BN, batch statistics, TENT by severity."""
    c: ShiftConfig = run.config
    data = image_split(c)
    run.total_jobs = 1 + len(cells(c))
    train(run, data)
    evaluate_shift(run, data)
