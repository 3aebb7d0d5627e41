"""The Method contract and the method registry.

A *method* is an ``nn.Module`` that owns everything it trains besides the backbone and everything it
keeps between steps (class centers, momentum encoders, queues, memories). The harness only ever calls:

- ``Method.from_config(backbone, num_classes, embedding_size, cfg, dist)``: build with the paper's
  defaults overridden by ``cfg`` (validated: an unknown key or a bad value is a one-line ConfigError);
- ``method.batch_spec``: which batches the harness's sampler must serve (plain random batches, or
  ``views_per_class = k`` images of each identity side by side);
- ``method(images, labels) -> LossOutput(loss, logs)``;
- ``method.on_step_end()`` after the optimizer step (momentum updates, queue writes);
- ``method.encoder(name)`` for inference, ``method.encoder_names`` for what exists;
- ``method.param_groups()`` for the optimizer; ``state_dict()`` holds all kept state so resume is exact.

Heads that are plain losses over embeddings (ArcFace, CosFace, ...) are ``nn.Module`` s usable alone,
``head(embeddings, labels) -> loss``; :func:`register_head` wraps one into a registered Method.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from methods.distributed import DistContext
from methods.registry import ConfigError, Registry


@dataclass(frozen=True)
class BatchSpec:
    """What a method needs in each batch.

    ``views_per_class == 1``: images drawn uniformly at random (each image once per epoch).
    ``views_per_class == k >= 2``: the batch holds ``batch_size // k`` identities with ``k`` images each,
    the ``k`` images of one identity at adjacent positions (identity-major order), drawn without
    replacement where the identity has enough images. Every image counts as a seen sample, so budgets
    stay equal across methods (DESIGN.md, fairness rules).

    ``views_with_replacement``: draw an identity's ``k`` images with replacement even when it has ``k``
    or more (DCQ's authors draw the reference image that way, so it may repeat the query image).

    ``identity_reuse_gap = G``: in the stream of identities the sampler serves (batch after batch,
    ``batch_size // k`` per batch), two appearances of one identity are at least ``G`` positions apart,
    also across epoch boundaries. SST's prototype queue of ``Q <= G`` rows, one per identity served,
    then never holds an older prototype of an identity in the batch (a false negative). 0 or 1: no
    constraint beyond one appearance per batch.
    """

    views_per_class: int = 1
    views_with_replacement: bool = False
    identity_reuse_gap: int = 0

    def __post_init__(self) -> None:
        if self.views_per_class < 1:
            raise ConfigError(f"views_per_class must be >= 1, got {self.views_per_class}")
        if self.identity_reuse_gap < 0:
            raise ConfigError(f"identity_reuse_gap must be >= 0, got {self.identity_reuse_gap}")


@dataclass
class LossOutput:
    """What a training forward returns: the scalar loss to minimise and values to log."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


def check_params(owner: str, defaults: Mapping[str, Any], cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``defaults`` updated with ``cfg``, each value coerced to its default's type.

    An unknown key, or a value that cannot be read as the default's type, raises :class:`ConfigError`
    naming ``owner``, the key and what is allowed.
    """
    out = dict(defaults)
    for key, value in (cfg or {}).items():
        if key not in defaults:
            raise ConfigError(f"{owner}: unknown parameter '{key}'; valid: {', '.join(defaults) or '(none)'}")
        out[key] = _coerce(owner, key, value, defaults[key])
    return out


def parameter_defaults(target: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword parameters of ``target`` with their defaults (those in ``skip`` left out)."""
    params = inspect.signature(target).parameters
    return {name: p.default for name, p in params.items()
            if name not in skip and name != "self" and p.default is not inspect.Parameter.empty}


def _coerce(owner: str, key: str, value: Any, default: Any) -> Any:
    """Read ``value`` as the type of ``default`` (YAML and the command line give strings and ints)."""
    kind = type(default)
    if default is None or type(value) is kind:
        return value
    text = str(value).strip().lower()
    if kind is bool and text in _BOOL_WORDS:
        return _BOOL_WORDS[text]
    if kind is int and not isinstance(value, bool):
        try:
            number = float(value)
            if number.is_integer():
                return int(number)
        except (TypeError, ValueError):
            pass
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if kind is str and isinstance(value, str):
        return value
    if kind not in (bool, int, float, str) and isinstance(value, kind):
        return value
    raise ConfigError(f"{owner}: parameter '{key}' must be {kind.__name__}, got {value!r}")


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class Method(nn.Module):
    """Base class of every training method (see the module docstring for the contract)."""

    #: Registered name, set by the registry decorator.
    name: ClassVar[str] = ""
    #: Names of the encoders this method can evaluate with; the first is the default.
    encoder_names: ClassVar[tuple[str, ...]] = ("backbone",)

    def __init__(self, backbone: nn.Module, batch_spec: BatchSpec = BatchSpec()) -> None:
        super().__init__()
        self.backbone = backbone
        self.batch_spec = batch_spec

    @classmethod
    def from_config(cls, backbone: nn.Module, num_classes: int, embedding_size: int,
                    cfg: Mapping[str, Any] | None = None, dist: DistContext | None = None) -> Method:
        raise NotImplementedError(f"{cls.__name__} must implement from_config")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The method's hyperparameters and their defaults (shown by ``bench list``)."""
        raise NotImplementedError(f"{cls.__name__} must implement defaults")

    @classmethod
    def resolve_params(cls, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults with ``cfg`` applied and validated (what a run record stores)."""
        return check_params(f"method '{cls.name}'", cls.defaults(), cfg)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def on_step_end(self) -> None:
        """Called after each optimizer step (momentum encoders, queues); nothing by default."""

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the optimizer built from :meth:`param_groups`, before the first step.

        For methods that keep optimizer state for rows they update sparsely (Partial FC keeps each class
        center's momentum and swaps the sampled rows in and out); nothing by default.
        """

    def encoder(self, which: str | None = None) -> nn.Module:
        """The network used at inference; ``which`` picks one of :attr:`encoder_names`."""
        which = which or self.encoder_names[0]
        if which not in self.encoder_names:
            raise ConfigError(f"method '{self.name}' has no encoder '{which}'; valid: {', '.join(self.encoder_names)}")
        return self.backbone

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: ``backbone`` (gradient-clipped by the harness) and ``head``.

        A group with ``"sharded": True`` holds parameters laid out in contiguous class shards across ranks
        (model-parallel class centers; a single shard on one rank); the harness averages the gradients of
        every other group over ranks, and a checkpoint re-shards these groups' optimizer state.
        """
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"name": "backbone", "params": backbone}]
        if head:
            groups.append({"name": "head", "params": head, "sharded": self.head_is_sharded})
        return groups

    @property
    def head_is_sharded(self) -> bool:
        """Whether the non-backbone parameters are laid out in class shards across ranks (model parallel)."""
        return False

    def sharded_state_keys(self) -> list[str]:
        """``state_dict`` entries split along dim 0 across ranks in contiguous class shards (class centers
        and their per-row state), which a checkpoint re-shards when the number of ranks changes."""
        return []


METHODS: Registry[type[Method]] = Registry("method")


class HeadMethod(Method):
    """A backbone followed by a loss head ``head(embeddings, labels) -> loss`` (ArcFace, CosFace, ...)."""

    #: The head class; set by :func:`register_head`.
    head_cls: ClassVar[type[nn.Module]]

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__(backbone)
        self.head = head

    @classmethod
    def from_config(cls, backbone: nn.Module, num_classes: int, embedding_size: int,
                    cfg: Mapping[str, Any] | None = None, dist: DistContext | None = None) -> HeadMethod:
        head_args = cls.resolve_params(cfg)
        if "dist" in inspect.signature(cls.head_cls).parameters:
            head_args["dist"] = dist
        return cls(backbone, cls.head_cls(embedding_size, num_classes, **head_args))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return parameter_defaults(cls.head_cls, _HEAD_SIZE_ARGS)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        return LossOutput(self.head(self.backbone(images), labels))

    @property
    def head_is_sharded(self) -> bool:
        # Class-sharded layout, whatever the world size (one shard on a single rank), so that a
        # checkpoint re-shards between any two numbers of ranks, 1 included.
        return hasattr(self.head, "sharded_state_keys")

    def sharded_state_keys(self) -> list[str]:
        if not self.head_is_sharded:
            return []
        return [f"head.{key}" for key in self.head.sharded_state_keys()]

    def on_step_end(self) -> None:
        step_end = getattr(self.head, "step_end", None)
        if step_end is not None:
            step_end()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        attach = getattr(self.head, "attach_optimizer", None)
        if attach is not None:
            attach(optimizer)


#: Constructor arguments of a head that are not hyperparameters.
_HEAD_SIZE_ARGS = ("embedding_size", "num_classes", "dist")


def register_head(name: str, head_cls: type[nn.Module], *, aliases: tuple[str, ...] = ()) -> type[HeadMethod]:
    """Register ``head_cls`` (constructor ``(embedding_size, num_classes, **hyperparameters)``) as method ``name``."""
    method_cls = type(f"{head_cls.__name__}Method", (HeadMethod,),
                      {"head_cls": head_cls, "name": name, "__doc__": head_cls.__doc__,
                       "__module__": head_cls.__module__})
    return METHODS.register(name, method_cls, aliases=aliases)


def register_method(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type[Method]], type[Method]]:
    """Class decorator registering a :class:`Method` subclass under ``name``."""

    def add(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name, cls, aliases=aliases)

    return add


def build_method(name: str, backbone: nn.Module, num_classes: int, embedding_size: int,
                 cfg: Mapping[str, Any] | None = None, dist: DistContext | None = None) -> Method:
    """Build the registered method ``name`` (an unknown name lists the valid ones)."""
    return METHODS.get(name).from_config(backbone, num_classes, embedding_size, cfg, dist or DistContext.current())
