"""The Method contract and the method registry.

A *method* is an ``nn.Module`` that owns everything it trains besides the backbone and everything it
keeps between steps (class centers, momentum encoders, queues, memories). The harness only ever calls:

- ``Method.from_config(backbone, ctx, cfg)``: build with the paper's defaults overridden by ``cfg``.
  ``ctx`` is the run's shape (:class:`MethodContext`: classes, embedding size, global batch size, steps,
  processes), built once by the runner. ``from_config`` is a template method of this base class:
  resolve the defaults (one place per method: its constructor's signature) with ``cfg`` (unknown key or
  bad type: a one-line ConfigError) -> ``cls.check(ctx, params)`` (ranges) -> ``cls(backbone, ctx,
  **params)``. Every method allocates all of its state (queues, memories, centers) in ``__init__``, so
  ``load_state_dict`` never resizes anything;
- ``method.batch_spec``: which batches the harness's sampler must serve (plain random batches, or
  ``views_per_class = k`` images of each identity side by side);
- ``method(images, labels) -> LossOutput(loss, logs)``;
- ``method.on_step_end()`` after the optimizer step (momentum updates, queue writes);
- optional hooks: ``method.nearest_classes(classes, count)`` when ``batch_spec.hard_class_neighbours``
  asks the sampler for hard-class mining; ``method.curate(embeddings, labels)`` once after
  ``method.curation_step`` when the method cleans its training data (sub-center ArcFace);
- ``method.encoder(name)`` for inference, ``method.encoder_names`` for what exists;
  ``method.quality(features)`` for a method that also estimates face quality (Recognizability Index);
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

from methods.catalog import import_method_modules
from methods.distributed import DistContext
from methods.params import coerce
from methods.registry import ConfigError, Registry


@dataclass(frozen=True)
class MethodContext:
    """The run's shape, as far as a method needs it (ours: built once by the runner, so that a method
    sizes its state in ``__init__`` instead of at its first step).

    ``global_batch_size``: images per optimizer step over all ranks, all views counted;
    ``total_steps``: optimizer steps of the run; ``dist``: this process among how many.
    """

    num_classes: int
    embedding_size: int
    global_batch_size: int
    total_steps: int = 1
    dist: DistContext = field(default_factory=DistContext)

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.global_batch_size % self.dist.world_size:
            raise ConfigError(f"batch size {self.global_batch_size} does not split over {self.dist.world_size} "
                              f"rank(s)")

    @property
    def local_batch_size(self) -> int:
        """Images per step on this rank."""
        return self.global_batch_size // self.dist.world_size


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

    ``hard_class_neighbours = n >= 1`` (hard-class mining; needs ``views_per_class >= 2``): a batch is made
    of anchor identities drawn as above, each followed by ``n`` identities the method names as its
    nearest (:meth:`Method.nearest_classes`, asked when the batch is composed, so it reflects the
    method's state after the previous step); slots the method cannot fill (identities it has not seen
    yet, repeats) take further random identities. 0: no mining.
    """

    views_per_class: int = 1
    views_with_replacement: bool = False
    identity_reuse_gap: int = 0
    hard_class_neighbours: int = 0

    def __post_init__(self) -> None:
        if self.views_per_class < 1:
            raise ConfigError(f"views_per_class must be >= 1, got {self.views_per_class}")
        if self.identity_reuse_gap < 0:
            raise ConfigError(f"identity_reuse_gap must be >= 0, got {self.identity_reuse_gap}")
        if self.hard_class_neighbours < 0:
            raise ConfigError(f"hard_class_neighbours must be >= 0, got {self.hard_class_neighbours}")
        if self.hard_class_neighbours and self.views_per_class < 2:
            raise ConfigError("hard_class_neighbours needs views_per_class >= 2 (batches composed of identities)")


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
        default = defaults[key]
        out[key] = coerce(value, None if default is None else type(default), f"{owner}: parameter '{key}'")
    return out


def parameter_defaults(target: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword parameters of ``target`` with their defaults (those in ``skip`` left out)."""
    params = inspect.signature(target).parameters
    return {name: p.default for name, p in params.items()
            if name not in skip and name != "self" and p.default is not inspect.Parameter.empty}


class Method(nn.Module):
    """Base class of every training method (see the module docstring for the contract)."""

    #: Registered name, set by the registry decorator.
    name: ClassVar[str] = ""
    #: Names of the encoders this method can evaluate with; the first is the default.
    encoder_names: ClassVar[tuple[str, ...]] = ("backbone",)
    #: Parameters whose default is ours or not confirmed by the paper or the authors' code (the module
    #: docstring says why); ``bench list`` marks them. A subclass adds to its parent's; a head registered
    #: with :func:`register_head` declares them on the head class.
    unconfirmed_defaults: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: nn.Module, batch_spec: BatchSpec = BatchSpec()) -> None:
        super().__init__()
        self.backbone = backbone
        self.batch_spec = batch_spec

    @classmethod
    def from_config(cls, backbone: nn.Module, ctx: MethodContext, cfg: Mapping[str, Any] | None = None) -> Method:
        """Build with the defaults overridden by ``cfg``: resolve -> :meth:`check` -> construct (ours: the
        one place parameters are read, so no method re-implements it)."""
        params = cls.resolve_params(cfg)
        cls.check(ctx, params)
        return cls(backbone, ctx, **params)

    @classmethod
    def check(cls, ctx: MethodContext, params: Mapping[str, Any]) -> None:
        """Range checks of resolved ``params`` for a run of shape ``ctx`` (ConfigError naming the method and
        the key); nothing by default (a head checks its values in its own constructor)."""

    @classmethod
    def owner(cls) -> str:
        """How errors name this method: ``method '<name>'``."""
        return f"method '{cls.name}'"

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The method's hyperparameters and their defaults (shown by ``bench list``): the keyword defaults of
        the constructors of the method's classes (a subclass adds to its parent's, as MASST to SST's)."""
        own = cls.__mro__[:cls.__mro__.index(Method)]
        out: dict[str, Any] = {}
        for klass in reversed(own):
            if "__init__" in vars(klass):
                out.update(parameter_defaults(klass.__init__, _CONTRACT_ARGS))
        return out

    @classmethod
    def unconfirmed(cls) -> tuple[str, ...]:
        """The parameters of :meth:`defaults` whose default is ours or unconfirmed, in :meth:`defaults` order."""
        marked = {name for klass in cls.__mro__ for name in vars(klass).get("unconfirmed_defaults", ())}
        head = getattr(cls, "head_cls", None)
        if head is not None and "__init__" not in vars(cls):
            marked = set(getattr(head, "unconfirmed_defaults", ()))
        return tuple(name for name in cls.defaults() if name in marked)

    @classmethod
    def resolve_params(cls, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults with ``cfg`` applied and validated (what a run record stores)."""
        return check_params(cls.owner(), cls.defaults(), cfg)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def on_step_end(self) -> None:
        """Called after each optimizer step (momentum encoders, queues); nothing by default."""

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the optimizer built from :meth:`param_groups`, before the first step.

        For methods that keep optimizer state for rows they update sparsely (Partial FC keeps each class
        center's momentum and swaps the sampled rows in and out); nothing by default.
        """

    def nearest_classes(self, classes: torch.Tensor, count: int) -> torch.Tensor:
        """Hard-class mining (``batch_spec.hard_class_neighbours > 0``): for each class id in ``classes`` ``[A]``,
        the ``count`` class ids the method finds nearest to it ``[A, count]``, ``-1`` where it knows fewer.

        Only methods whose batch spec asks for mining implement it; the sampler calls it when it composes a
        batch (between optimizer steps, after :meth:`on_step_end`)."""
        raise NotImplementedError(f"method '{self.name}' does not name nearest classes (no hard-class mining)")

    @property
    def curation_step(self) -> int | None:
        """The optimizer step after which the harness calls :meth:`curate` once (None, the default: never)."""
        return None

    def curate(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training-data curation (sub-center ArcFace's purification): given the L2-normalised embeddings
        ``[N, D]`` of every training image (default encoder, eval mode, no flip) and their labels ``[N]``,
        update the method's own state and return which images to keep (bool ``[N]``); the harness trains on
        the kept images from the next step on. Called once, after step :attr:`curation_step`."""
        raise NotImplementedError(f"method '{self.name}' does not curate its training data")

    def quality(self, features: torch.Tensor) -> torch.Tensor | None:
        """Face quality estimation: one score per row of encoder features ``[N, D]`` (the default encoder's
        output, unnormalised; higher = more recognizable), or None, the default, for a method that estimates
        no quality (the quality protocol then scores only the method-independent quality measures)."""
        return None

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


METHODS: Registry[type[Method]] = Registry("method", populate=import_method_modules)

#: Constructor arguments of a Method that are not hyperparameters.
_CONTRACT_ARGS = ("backbone", "ctx")


class HeadMethod(Method):
    """A backbone followed by a loss head ``head(embeddings, labels) -> loss`` (ArcFace, CosFace, ...)."""

    #: The head class; set by :func:`register_head`.
    head_cls: ClassVar[type[nn.Module]]

    def __init__(self, backbone: nn.Module, ctx: MethodContext, **head_params: Any) -> None:
        super().__init__(backbone)
        if "dist" in inspect.signature(self.head_cls).parameters:
            head_params["dist"] = ctx.dist
        self.head = self.head_cls(ctx.embedding_size, ctx.num_classes, **head_params)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The head constructor's keyword defaults (the one place they are written); a subclass with its own
        constructor (a head plus the method's own parameters) lists that constructor's, as any Method."""
        if "__init__" in vars(cls):
            return super().defaults()
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


def build_method(name: str, backbone: nn.Module, ctx: MethodContext, cfg: Mapping[str, Any] | None = None) -> Method:
    """Build the registered method ``name`` for a run of shape ``ctx`` (an unknown name lists the valid ones)."""
    return METHODS.get(name).from_config(backbone, ctx, cfg)
