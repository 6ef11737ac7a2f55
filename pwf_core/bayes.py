"""Bayesian conversion of conv/linear layers: each weight becomes a pair (mu, sigma).

The conversion keeps every original module, its forward and its parameter names: ``weight``
and ``bias`` still hold the means (mu), and each gains a ``<name>_sigma`` parameter and a
boolean ``<name>_fixed_mask`` buffer. The module's class is swapped for a subclass whose
``weight``/``bias`` attributes return a sample ``mu + max(sigma, 2^-30) * eps`` inside a forward
call while sampling is on (train mode by default), and the means otherwise. So a converted model
is still a plain ``nn.Module``: timm's forward, ``state_dict``, ``.to(device)`` and evaluation
with sampling off (logits identical to the original model's) all keep working.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

SIGMA_FLOOR = 2.0**-30
_BELOW_FLOOR = float(torch.nextafter(torch.tensor(SIGMA_FLOOR), torch.tensor(0.0)))
SIGMA_CAP = 0.05
CONVERTIBLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_SAMPLED = ("weight", "bias")
_BAYESIAN_CLASSES: dict[type, type] = {}
_ORIGINAL_CLASSES: dict[type, type] = {}


#: ``filter_fn(module, name) -> bool``: whether a conv/linear layer is converted (torchao's
#: ``filter_fn``); ``name`` is the module's dotted name in the model, e.g. ``layer1.0.conv1``.
ModuleFilter = Callable[[nn.Module, str], bool]

_NOISE_CHUNK = 1 << 20
_noise_pool: ThreadPoolExecutor | None = None


def fill_standard_normal_(eps: torch.Tensor) -> torch.Tensor:
    """Fill ``eps`` with N(0, 1) noise, in parallel on the CPU for large tensors.

    The CPU generator is sequential and was the largest cost of a Bayesian training step, so a
    large tensor is filled in fixed 2^20-element chunks by a thread pool, each chunk from its own
    generator seeded from the default one: a seeded run draws the same noise on any number of
    threads. CUDA and small tensors use ``normal_`` directly.
    """
    global _noise_pool
    if (
        torch.compiler.is_compiling()
        or eps.device.type != "cpu"
        or eps.numel() < 2 * _NOISE_CHUNK
        or torch.get_num_threads() < 2
    ):
        return eps.normal_()
    if _noise_pool is None:
        _noise_pool = ThreadPoolExecutor(
            max_workers=min(torch.get_num_threads(), os.cpu_count() or 1)
        )
    base_seed = int(torch.randint(0, 2**62, ()))
    chunks = eps.view(-1).split(_NOISE_CHUNK)

    def fill(index: int) -> None:
        chunks[index].normal_(generator=torch.Generator().manual_seed(base_seed + index))

    list(_noise_pool.map(fill, range(len(chunks))))
    return eps


@torch.library.custom_op("pwf::fill_standard_normal_", mutates_args=("eps",))
def _fill_standard_normal_op(eps: torch.Tensor) -> None:
    """:func:`fill_standard_normal_` as an operator a compiled graph calls (a Python thread
    pool cannot be traced; the compiler's own CPU normal is single-threaded)."""
    fill_standard_normal_(eps)


def add_sigma_regulariser_(
    grad_sigma: torch.Tensor,
    sigma: torch.Tensor,
    eps: torch.Tensor,
    reg: float | torch.Tensor,
    cap: float | torch.Tensor = SIGMA_CAP,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's sigma-gradient edit, in place: ``grad_sigma -= reg * relu(cap - sigma) * |eps|``.

    It pushes each sigma up toward ``cap``, harder where the sampled noise was large; the same
    as the loss ``-reg |eps| (cap sigma - sigma^2 / 2)`` while sigma is below the cap.

    Args:
        scratch: Optional tensor shaped like ``sigma`` to compute in (spares an allocation).
    """
    if isinstance(reg, torch.Tensor):
        # A compiled graph's strengths are 0-dim tensors (graph inputs); Inductor fuses this.
        pull = torch.sub(sigma, cap).neg_().clamp_min_(0.0).mul_(eps).abs_()
        grad_sigma.sub_(pull.mul_(reg))
    elif reg:
        pull = scratch if scratch is not None else torch.empty_like(sigma)
        # relu(cap - sigma) >= 0, so |relu(cap - sigma) * eps| is the whole term.
        # |min(sigma - cap, 0) * eps| = relu(cap - sigma) * |eps|, one pass fewer than the
        # literal form.
        torch.sub(sigma, cap, out=pull).clamp_max_(0.0).mul_(eps).abs_()
        grad_sigma.add_(pull, alpha=-reg)
    return grad_sigma


class _SampleWeight(torch.autograd.Function):
    """``w = mu + max(sigma, 2^-30) * eps`` whose sigma gradient carries the regulariser.

    One function instead of separate ops and a post-backward pass keeps the Bayesian step
    within a few elementwise passes of the deterministic one. Nothing in it reads a value
    back to the host, so a training step never waits for the device and compiles whole.
    """

    @staticmethod
    def forward(ctx, mu, sigma, eps, scratch, reg, cap):  # type: ignore[override]
        ctx.save_for_backward(sigma, eps, scratch)
        ctx.reg, ctx.cap = reg, cap
        # Always clamping costs one elementwise pass; deciding whether to clamp would cost a
        # device-to-host sync per layer and step. Eager clamps into the scratch tensor: a
        # fresh 11 M-element tensor per step costs more in page faults than the clamp itself.
        if torch.compiler.is_compiling():
            return torch.addcmul(mu, sigma.clamp_min(SIGMA_FLOOR), eps)
        return torch.addcmul(mu, torch.clamp_min(sigma, SIGMA_FLOOR, out=scratch), eps)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        sigma, eps, scratch = ctx.saved_tensors
        grad_sigma = None
        if ctx.needs_input_grad[1]:
            # Below the floor the sample does not depend on sigma (the clamp's gradient): one
            # in-place pass keeps grad where sigma > the float below the floor, i.e. sigma >=
            # floor, without a boolean mask tensor.
            grad_sigma = torch.mul(grad, eps)
            torch.ops.aten.threshold_backward.grad_input(
                grad_sigma, sigma, _BELOW_FLOOR, grad_input=grad_sigma
            )
            add_sigma_regulariser_(grad_sigma, sigma, eps, ctx.reg, ctx.cap, scratch)
        return grad, grad_sigma, None, None, None, None


def _sampled_attribute(name: str) -> property:
    def get(module: nn.Module) -> torch.Tensor | None:
        sample = module.__dict__["_pwf_samples"].get(name)
        return sample if sample is not None else module._parameters[name]

    return property(get, doc=f"``{name}``: a sample inside a sampling forward, else its mean.")


def _bayesian_class(cls: type) -> type:
    if cls not in _BAYESIAN_CLASSES:
        attrs = {name: _sampled_attribute(name) for name in _SAMPLED}
        bayesian = type(f"Bayesian{cls.__name__}", (cls,), attrs)
        _BAYESIAN_CLASSES[cls] = bayesian
        _ORIGINAL_CLASSES[bayesian] = cls
    return _BAYESIAN_CLASSES[cls]


def _draw_samples(module: nn.Module, args: tuple) -> None:
    if module.__dict__.get("_pwf_external"):
        return  # a model-level sampler (2DGBNN's shared Gaussians) provided the weights
    samples = module.__dict__["_pwf_samples"]
    samples.clear()
    forced = module.__dict__["_pwf_sampling"]
    if not (module.training if forced is None else forced):
        return
    noise = module.__dict__["_pwf_noise"]
    for name in module.__dict__["_pwf_names"]:
        mu = module._parameters[name]
        sigma = module._parameters[f"{name}_sigma"]
        if torch.compiler.is_compiling():
            # Inside a graph the compiler plans the memory; filling the cache would make the
            # first call's graph guard on an empty cache and compile the model a second time.
            # Tensor strengths are graph inputs: a sweep over ``reg`` reuses one graph.
            strengths = module.__dict__.get("_pwf_regulariser_inputs")
            eps = torch.empty_like(mu, memory_format=torch.contiguous_format)
            if eps.device.type == "cpu":
                torch.ops.pwf.fill_standard_normal_(eps)
            else:
                eps.normal_()  # on a GPU, generated inside the fused sample kernel
            samples[name] = _SampleWeight.apply(
                mu, sigma, eps, torch.empty_like(eps), *(strengths or (0.0, SIGMA_CAP))
            )
            continue
        regulariser = module.__dict__["_pwf_regulariser"]
        buffers = noise.get(name)
        layout = (mu.shape, mu.device, mu.dtype)
        if buffers is None or (buffers[0].shape, buffers[0].device, buffers[0].dtype) != layout:
            buffers = noise[name] = tuple(
                torch.empty_like(mu, memory_format=torch.contiguous_format) for _ in range(2)
            )
        # Refilling persistent noise and scratch tensors spares two fresh allocations (page
        # faults) per tensor and step. Autograd's version counter still catches a second
        # sampling forward before the first one's backward.
        eps, scratch = buffers
        fill_standard_normal_(eps)
        samples[name] = _SampleWeight.apply(mu, sigma, eps, scratch, *regulariser)


def _drop_samples(module: nn.Module, args: tuple, output: object) -> None:
    module.__dict__["_pwf_samples"].clear()


@dataclass(frozen=True)
class BayesianParam:
    """One converted tensor: its mean, standard deviation and fixed mask.

    Args:
        name: Dotted parameter name in the model, e.g. ``layer1.0.conv1.weight``.
        module: The converted module that owns it.
        attr: ``weight`` or ``bias``.
    """

    name: str
    module: nn.Module
    attr: str

    @property
    def mu(self) -> nn.Parameter:
        return self.module._parameters[self.attr]

    @property
    def sigma(self) -> nn.Parameter:
        return self.module._parameters[f"{self.attr}_sigma"]

    @property
    def fixed_mask(self) -> torch.Tensor:
        return self.module._buffers[f"{self.attr}_fixed_mask"]


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` (fnmatch) names the module ``name`` or one of the modules it sits in, so
    ``head`` selects ``head.fc`` too."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:end]), pattern) for end in range(1, len(parts) + 1))


def convertible_names(model: nn.Module) -> list[str]:
    """Dotted names of the conv/linear layers of ``model`` (what conversion can select)."""
    return [name for name, module in model.named_modules() if isinstance(module, CONVERTIBLE)]


def check_patterns(model: nn.Module, include: Sequence[str], exclude: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every pattern that selects no conv/linear layer of ``model``
    (a typo would otherwise convert everything, or nothing, silently)."""
    names = convertible_names(model)
    for key, patterns in (("include", include), ("exclude", exclude)):
        unmatched = [p for p in patterns if not any(_matches(n, p) for n in names)]
        if unmatched:
            more = f", … ({len(names)} in all)" if len(names) > 12 else ""
            shown = ", ".join(names[:12]) + more
            raise ValueError(
                f"compression.{key}: {', '.join(map(repr, unmatched))} matches no conv/linear "
                f"layer of the model; its layers: {shown}"
            )
    if include and not any(
        _matches(n, p) for n in names for p in include if not any(_matches(n, e) for e in exclude)
    ):
        raise ValueError("compression.include and exclude leave no layer to compress")


def module_filter(
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    filter_fn: ModuleFilter | None = None,
) -> ModuleFilter | None:
    """The layers to convert: those ``include`` names (all when empty), but none ``exclude``
    names, and only those ``filter_fn`` accepts. ``None`` when everything is converted.

    Args:
        include: fnmatch patterns of module names (a pattern also selects the modules inside
            the one it names).
        exclude: Patterns of module names to keep in float.
        filter_fn: ``filter_fn(module, name) -> bool``, applied after the patterns.
    """
    if not include and not exclude and filter_fn is None:
        return None

    def selects(module: nn.Module, name: str) -> bool:
        if include and not any(_matches(name, p) for p in include):
            return False
        if any(_matches(name, p) for p in exclude):
            return False
        return filter_fn is None or bool(filter_fn(module, name))

    return selects


@dataclass
class ConversionReport:
    """Which parameters became (mu, sigma) pairs and which stayed deterministic.

    Args:
        converted: Converted tensors and their sizes.
        left: Every other parameter (norms, tokens, and layers kept in float).
        excluded: The parameters of conv/linear layers left in float by the selection.
    """

    converted: dict[str, int] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def num_converted(self) -> int:
        return sum(self.converted.values())

    @property
    def num_left(self) -> int:
        return sum(self.left.values())

    @property
    def num_excluded(self) -> int:
        return sum(self.excluded.values())

    def summary(self) -> str:
        line = (
            f"{len(self.converted)} tensors ({self.num_converted:,} values) converted to "
            f"(mu, sigma); {len(self.left)} tensors ({self.num_left:,} values) left deterministic"
        )
        if self.excluded:
            line += f", {self.num_excluded:,} of them in conv/linear layers kept in float"
        return line


def is_bayesian(module: nn.Module) -> bool:
    """Whether ``module`` (a single layer) has been converted."""
    return "_pwf_names" in module.__dict__


def to_bayesian(
    model: nn.Module,
    sigma_init: float = 1e-4,
    attrs: tuple[str, ...] = _SAMPLED,
    filter_fn: ModuleFilter | None = None,
) -> ConversionReport:
    """Convert every conv/linear weight and bias (or just ``attrs``) of ``model`` in place.

    Covers subclasses too (timm's ``Conv2dSame``, ``StdConv2d``, a ViT's attention ``Linear``).
    Sigma starts at the constant ``sigma_init``; a method's initialisation replaces it (PWFN:
    the power-of-two prior). Converting an already converted model changes nothing.

    Args:
        model: The network; it keeps its structure, names and forward.
        sigma_init: Initial standard deviation of every converted value.
        attrs: Which parameters of a layer to convert.
        filter_fn: ``filter_fn(module, name) -> bool``: convert only the layers it accepts
            (see :func:`module_filter`); the others stay float.

    Returns:
        The report of converted and untouched parameters (names and sizes).
    """
    for prefix, module in model.named_modules():
        if not isinstance(module, CONVERTIBLE) or is_bayesian(module):
            continue
        if filter_fn is not None and not filter_fn(module, prefix):
            continue
        names = tuple(n for n in attrs if module._parameters.get(n) is not None)
        for name in names:
            mu = module._parameters[name]
            module.register_parameter(
                f"{name}_sigma", nn.Parameter(torch.full_like(mu, sigma_init))
            )
            module.register_buffer(f"{name}_fixed_mask", torch.zeros_like(mu, dtype=torch.bool))
        module.__dict__.update(
            _pwf_names=names,
            _pwf_samples={},
            _pwf_noise={},
            _pwf_sampling=None,
            _pwf_regulariser=(0.0, SIGMA_CAP),
            _pwf_regulariser_inputs=None,
        )
        module.__class__ = _bayesian_class(type(module))
        module.__dict__["_pwf_hooks"] = (
            module.register_forward_pre_hook(_draw_samples),
            module.register_forward_hook(_drop_samples),
        )
    return conversion_report(model)


def strip(model: nn.Module) -> nn.Module:
    """Undo the conversion in place: original classes, original ``state_dict`` keys.

    Each converted weight keeps its mean (after fixing: its codebook value); sigmas, fixed
    masks and the sampling hooks are removed, and any structure a method attached to the
    model (e.g. shared Gaussians) is detached. The result loads into, and behaves like, a
    fresh instance of the user's class.

    Returns:
        ``model`` itself.
    """
    for detach in model.__dict__.pop("_pwf_detach", []):
        detach(model)
    for module in model.modules():
        if not is_bayesian(module):
            continue
        for handle in module.__dict__["_pwf_hooks"]:
            handle.remove()
        for name in module.__dict__["_pwf_names"]:
            del module._parameters[f"{name}_sigma"]
            del module._buffers[f"{name}_fixed_mask"]
        for key in [k for k in module.__dict__ if k.startswith("_pwf_")]:
            del module.__dict__[key]
        module.__class__ = _ORIGINAL_CLASSES[type(module)]
    return model


def conversion_report(model: nn.Module) -> ConversionReport:
    """List converted parameters (means) and the ones left deterministic (norms, tokens...)."""
    converted = {p.name: p.mu.numel() for p in bayesian_params(model)}
    sigma_names = {f"{name}_sigma" for name in converted}
    left = {
        name: p.numel()
        for name, p in model.named_parameters()
        if name not in converted and name not in sigma_names
    }
    excluded = {
        f"{prefix}.{name}" if prefix else name: p.numel()
        for prefix, module in model.named_modules()
        if isinstance(module, CONVERTIBLE) and not is_bayesian(module)
        for name, p in module.named_parameters(recurse=False)
    }
    return ConversionReport(converted=converted, left=left, excluded=excluded)


def bayesian_params(model: nn.Module) -> list[BayesianParam]:
    """Every converted tensor of ``model``, in module order."""
    return [
        BayesianParam(f"{prefix}.{attr}" if prefix else attr, module, attr)
        for prefix, module in model.named_modules()
        if is_bayesian(module)
        for attr in module.__dict__["_pwf_names"]
    ]


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the deterministic model: no sigmas, no fixed masks, nothing a method
    attached (its entries start with ``_pwf``)."""
    extra = set()
    for p in bayesian_params(model):
        extra |= {f"{p.name}_sigma", f"{p.name}_fixed_mask"}
    return {
        k: v for k, v in model.state_dict().items() if k not in extra and not k.startswith("_pwf")
    }


def sigma_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sigma parameters (they get no weight decay)."""
    return [p.sigma for p in bayesian_params(model)]


def set_sigma_regulariser(model: nn.Module, reg: float, cap: float = SIGMA_CAP) -> None:
    """Make every sampling forward's backward push sigma up (see :func:`add_sigma_regulariser_`).

    Off (``reg = 0``) after conversion. Fixed entries are excluded by the masked training step,
    which zeroes their gradients.
    """
    for module in model.modules():
        if is_bayesian(module):
            module.__dict__["_pwf_regulariser"] = (float(reg), float(cap))
    regulariser_inputs_(model)


def regulariser_inputs_(model: nn.Module) -> None:
    """Give every converted layer its regulariser strengths as 0-dim tensors on its device.

    A compiled graph takes them as inputs, where Python floats would be baked in as
    constants: without them every new ``reg`` (one per sweep trial) compiles the model again,
    and the ninth fails on the compiler's recompile limit. Call it after moving the model.
    """
    for module in model.modules():
        if is_bayesian(module):
            reg, cap = module.__dict__["_pwf_regulariser"]
            device = next(iter(module._parameters.values())).device
            module.__dict__["_pwf_regulariser_inputs"] = (
                (torch.tensor(reg, device=device), torch.tensor(cap, device=device))
                if reg
                else None  # off: the graph leaves the regulariser out
            )


def _samplers(model: nn.Module) -> list[nn.Module]:
    """Converted layers, and any model-level sampler a method installed."""
    return [m for m in model.modules() if "_pwf_sampling" in m.__dict__]


def set_sampling(model: nn.Module, enabled: bool | None) -> None:
    """Force sampling on or off in every converted layer; ``None`` follows train/eval mode."""
    for module in _samplers(model):
        module.__dict__["_pwf_sampling"] = enabled


@contextmanager
def sampling(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Temporarily force sampling on (e.g. Monte-Carlo evaluation) or off."""
    modules = _samplers(model)
    previous = [m.__dict__["_pwf_sampling"] for m in modules]
    set_sampling(model, enabled)
    try:
        yield model
    finally:
        for module, state in zip(modules, previous, strict=True):
            module.__dict__["_pwf_sampling"] = state


def fixed_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Fixed masks keyed by parameter, for both the mean and the sigma of each converted tensor.

    Only tensors with at least one fixed entry are included.
    """
    masks: dict[nn.Parameter, torch.Tensor] = {}
    for param in bayesian_params(model):
        if param.fixed_mask.any():
            masks[param.mu] = param.fixed_mask
            masks[param.sigma] = param.fixed_mask
    return masks
