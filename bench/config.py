"""Typed run configuration: one dataclass per concern, filled from defaults, a YAML preset and
command-line overrides, then validated once.

A bad key or value fails with one line naming where it came from (the YAML file or the command line),
the key and what is allowed. Values are read by :func:`methods.params.coerce`, the project's one coercion
function, so a method parameter is read exactly like a configuration key.

Method names are canonical after loading: ``methods`` entries and ``method_params`` keys given as an
alias (``pm``) become the registered name (``prototype_memory``); two spellings of one method in
``methods`` are an error; a ``method_params`` key that names no registered method is an error. Parameters
of a registered method that is not in ``methods`` are allowed (and validated), so one preset can hold the
parameters of every method and be reused with ``--methods``.

The optimizer keys (``train.lr``, ``momentum``, ``weight_decay``, ``betas``, ``eps``) default to the chosen
``train.optimizer``'s values (:data:`OPTIMIZER_DEFAULTS`, with their sources): a key no layer sets takes the
final optimizer's default, a key the optimizer does not use stays ``null`` and may not be set.

The resolved configuration (:meth:`RunConfig.resolved`: every method's parameters with their defaults
filled in) is saved as ``config.yaml`` in every run record, together with the record's own keys
(:data:`RECORD_KEYS`), which loading a preset ignores: ``bench run --config results/<run>/config.yaml``
reproduces that run's configuration and fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from methods.params import coerce, require
from methods.registry import ConfigError

#: Keys a run record's ``config.yaml`` holds besides the configuration (bench/runner.py writes them; the
#: report and ``bench check`` read them). Loading a preset ignores them, so a record is a preset.
RECORD_KEYS = ("method", "run_id", "group", "config_fingerprint", "steps", "num_classes", "world_size")

#: Environment variable that overrides the default data root (``datasets/``).
DATA_ROOT_ENV = "FACEBENCH_DATA_ROOT"

#: ``train.optimizer`` values and their defaults, applied to the optimizer keys a configuration leaves
#: unset (``None``); a key an optimizer does not use stays ``None`` (and may not be set).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    # insightface arcface_torch configs/base.py: optimizer "sgd", lr 0.1, weight_decay 5e-4; momentum 0.9
    # (train_v2.py builds torch.optim.SGD with momentum=0.9 literally).
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    # insightface arcface_torch configs/wf42m_pfc03_40epoch_8gpu_vit_b.py (and the other ViT configs):
    # optimizer "adamw", lr 0.001, weight_decay 0.1 (also the commented alternative in configs/base.py);
    # train_v2.py builds torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), so betas and
    # eps are torch's defaults: (0.9, 0.999) and 1e-8.
    "adamw": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8},
}
#: The keys whose default depends on ``train.optimizer``.
OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay", "betas", "eps")
#: Keys added after run records existed, and the value every earlier run had: left out of the fingerprint at
#: that value, so that earlier records (results/claims) keep their fingerprint and are still reused.
FINGERPRINT_NEUTRAL_TRAIN = {"optimizer": "sgd", "betas": None, "eps": None}
#: The same for ``eval`` keys.
FINGERPRINT_NEUTRAL_EVAL = {"geometry_strength": 0.5}
#: The same for ``data.synthface`` keys.
FINGERPRINT_NEUTRAL_SYNTHFACE = {"lowres_fraction": 0.0, "lowres_min_px": 8}

#: ``train.device`` values: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (ours: the spellings the harness
#: resolves; anything else, e.g. ``cuda:x``, would reach ``torch.device`` and fail with a traceback).
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclass
class SynthFaceSettings:
    """The built-in synthetic training pool (see :mod:`bench.data.synthface`)."""

    #: Seed of the synthetic world: which faces exist. Independent of the training seed.
    seed: int = 0
    num_identities: int = 1000
    #: 20 images per identity: at the default budget (120k samples, 6 epochs of the full split) the full
    #: split trains best, then longtail, then shallow; with 40 the full split saw 3 epochs and trained
    #: worse than the long-tail one (measured; see README, calibration).
    images_per_identity: int = 20
    image_size: int = 32
    nuisance: float = 1.0
    twin_fraction: float = 0.1
    #: Fraction of training images whose label is flipped to another identity of the split.
    label_noise: float = 0.0
    #: Fraction of training images brought down to a random side in [lowres_min_px, image_size) px with
    #: antialiasing and back up (very-low-resolution training faces, as TinyFace's; ours: 0 = none).
    lowres_fraction: float = 0.0
    lowres_min_px: int = 8


@dataclass
class SplitSettings:
    """Which images of the pool are trained on (see :mod:`bench.data.splits`)."""

    name: str = "full"
    seed: int = 0
    #: Images kept per identity by the ``shallow`` split (2 in the SST / MASST papers).
    shallow_images: int = 2
    #: Exponent ``a`` of the long-tail power law P(n) ~ n^-a over per-identity image counts.
    longtail_exponent: float = 1.5
    longtail_min_images: int = 1
    #: Keep only this many identities (0: all).
    max_identities: int = 0


@dataclass
class DataSettings:
    dataset: str = "synthface"
    #: Where generated data, caches and split index files live ("" = $FACEBENCH_DATA_ROOT or ./datasets).
    root: str = ""
    split: SplitSettings = field(default_factory=SplitSettings)
    synthface: SynthFaceSettings = field(default_factory=SynthFaceSettings)
    #: Folder of a real dataset's files ("" = the card's environment variable, else <root>/<card's path>).
    path: str = ""
    #: A dataset card (YAML) to use instead of datasets/<dataset>.yaml; required by dataset "custom".
    card: str = ""
    #: DataLoader worker processes decoding real (on-disk) images; 0 decodes in the training process.
    workers: int = 2

    def resolved_root(self) -> Path:
        return Path(self.root or os.environ.get(DATA_ROOT_ENV) or "datasets")


@dataclass
class TrainSettings:
    """Identical for every method of one ``bench run`` (DESIGN.md, fairness rules)."""

    backbone: str = "small"
    embedding_size: int = 128
    #: Images per optimizer step, all views counted.
    batch_size: int = 128
    #: Samples seen per method (all views counted); the number of steps is budget // batch_size.
    budget: int = 120_000
    #: ``sgd`` or ``adamw`` (:data:`OPTIMIZER_DEFAULTS`, which gives each default below its source).
    optimizer: str = "sgd"
    #: None: the optimizer's default (sgd 0.1, adamw 1e-3), filled in at construction; a run record shows
    #: the value used. Presets and --set switch optimizers cleanly: keys they do not set take the final
    #: optimizer's defaults (:func:`load_config`).
    lr: float | None = None
    #: SGD only (None: 0.9).
    momentum: float | None = None
    #: None: the optimizer's default (sgd 5e-4, adamw 0.1).
    weight_decay: float | None = None
    #: AdamW only (None: [0.9, 0.999]).
    betas: list[float] | None = None
    #: AdamW only (None: 1e-8).
    eps: float | None = None
    #: Linear warm-up over this fraction of the steps, then polynomial decay to 0.
    warmup_fraction: float = 0.05
    lr_power: float = 2.0
    #: Gradient-norm clip of the backbone only (insightface train_v2.py clips at 5); 0 disables.
    grad_clip_norm: float = 5.0
    #: Mixed precision (float16 autocast + GradScaler) on CUDA; ignored on CPU.
    amp: bool = True
    seed: int = 0
    #: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    #: torch.use_deterministic_algorithms for bit-reproducible runs (slower on CUDA).
    deterministic: bool = False
    #: Steps between train.jsonl lines.
    log_every: int = 25
    #: Steps between checkpoints (one is always written after the last step); 0: only at the end.
    ckpt_every: int = 1000
    #: Intra-op CPU threads (0: torch's default).
    threads: int = 0

    def __post_init__(self) -> None:
        """Fill the optimizer keys left unset with the optimizer's defaults (an unknown optimizer is left to
        :func:`validate`)."""
        for key, value in OPTIMIZER_DEFAULTS.get(self.optimizer, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)


@dataclass
class EvalSettings:
    """Evaluation protocols and their named variants (recorded in every metrics.json)."""

    #: Protocols (``bench list protocols``). The synthetic defaults embed 12,000 + 3,111 + 1,400 images per
    #: method (sizes in bench/eval/synth_benchmarks.py).
    protocols: list[str] = field(default_factory=lambda: ["synth-lfw", "synth-ijbc", "synth-megaface"])
    batch_size: int = 512
    #: Which encoder of a method to evaluate ("" = the method's default, e.g. DCQ's momentum encoder).
    encoder: str = ""
    #: Flip test: image feature f(x) + f(flip x) (insightface's verification, eval_ijbc, gen_megaface).
    flip: bool = True
    #: TAR@FAR read-off: "nearest" (the ROC point with the nearest FPR, insightface) or "at_most".
    tar_read_off: str = "nearest"
    #: IJB: L2-normalise each image feature before pooling (insightface eval_ijbc: no; FaceX-Zoo: yes).
    ijb_normalize_images: bool = False
    #: IJB: multiply each image feature by its detector score (insightface eval_ijbc: yes).
    ijb_detector_score: bool = True
    #: MegaFace variants: "raw" (all files) and/or "refined" (insightface's noise lists applied).
    megaface_variants: list[str] = field(default_factory=lambda: ["raw", "refined"])
    #: synth-geometry: strength of the augmentation whose views it measures (alignment of views,
    #: concentration); set it to a self-supervised run's own training strength to measure that augmentation.
    geometry_strength: float = 0.5


@dataclass
class RunConfig:
    methods: list[str] = field(default_factory=lambda: ["arcface", "cosface"])
    #: Per-method hyperparameter overrides, e.g. ``{"arcface": {"m": 0.45}}``.
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    #: Results directory; each method run writes ``<out>/<run-id>/``.
    out: str = "results"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self) -> RunConfig:
        """This configuration with the full parameters of every method in ``methods`` or ``method_params``
        (defaults filled in), nested under the canonical method names: what a run record saves."""
        from methods.base import METHODS  # imports torch: only when a run is configured

        names = list(dict.fromkeys([*self.methods, *self.method_params]))
        params = {name: METHODS.get(name).resolve_params(self.method_params.get(name)) for name in names}
        return dataclasses.replace(self, method_params=params)

    def for_method(self, name: str) -> RunConfig:
        """The configuration of one method's run: ``methods = [name]`` and only that method's parameters."""
        return dataclasses.replace(self, methods=[name], method_params={name: dict(self.method_params.get(name, {}))})

    def fingerprint(self) -> str:
        """A short hash of everything that determines the results (not where they are written), over the
        :meth:`resolved` configuration, so that writing a default out does not change it."""
        payload = {k: v for k, v in self.resolved().to_dict().items() if k != "out"}
        payload["train"] = {k: v for k, v in payload["train"].items()
                            if k not in ("device", "log_every", "ckpt_every")
                            and not (k in FINGERPRINT_NEUTRAL_TRAIN and v == FINGERPRINT_NEUTRAL_TRAIN[k])}
        payload["eval"] = {k: v for k, v in payload["eval"].items()
                           if not (k in FINGERPRINT_NEUTRAL_EVAL and v == FINGERPRINT_NEUTRAL_EVAL[k])}
        # Where the files are and how many processes decode them do not change the results.
        payload["data"] = {k: v for k, v in payload["data"].items() if k not in ("path", "workers")}
        lowres_off = payload["data"]["synthface"].get("lowres_fraction") == 0.0
        payload["data"]["synthface"] = {k: v for k, v in payload["data"]["synthface"].items()
                                        if not (k in FINGERPRINT_NEUTRAL_SYNTHFACE
                                                and (lowres_off or v == FINGERPRINT_NEUTRAL_SYNTHFACE[k]))}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def config_from_dict(raw: dict[str, Any], source: str) -> RunConfig:
    """A validated :class:`RunConfig` from a mapping shaped like a preset (``source`` names it in errors);
    the :data:`RECORD_KEYS` of a run record are ignored."""
    cfg = _merge(RunConfig(), _without_record_keys(raw), source=source, prefix="")
    return _finish(cfg, _train_keys_in(raw))


def _without_record_keys(raw: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in raw.items() if key not in RECORD_KEYS}


def _train_keys_in(raw: Any) -> set[str]:
    """The ``train`` keys a preset-shaped mapping sets."""
    train = raw.get("train") if isinstance(raw, dict) else None
    return set(train) if isinstance(train, dict) else set()


def _finish(cfg: RunConfig, given_train_keys: set[str]) -> RunConfig:
    """``cfg`` with canonical method names and the final optimizer's defaults for every optimizer key no
    layer set (``train.optimizer=adamw`` alone gives AdamW's lr and weight decay, not SGD's), validated."""
    from methods.base import METHODS  # imports torch: only when a run is configured

    unset = {key: None for key in OPTIMIZER_KEYS if key not in given_train_keys}
    cfg = dataclasses.replace(cfg, methods=[METHODS.canonical(name) for name in cfg.methods],
                              train=dataclasses.replace(cfg.train, **unset))
    validate(cfg)
    return cfg


def _canonical_method_key(key: str, source: str, path: str) -> str:
    """The registered name of the method a ``method_params`` key names (the name or an alias); any other
    key is one line naming it."""
    from methods.base import METHODS  # imports torch: only when a run is configured

    if key not in METHODS:
        aliases = [f"{alias} ({name})" for name in METHODS.names() for alias in METHODS.aliases_of(name)]
        raise ConfigError(f"{source}: '{path}.{key}' names no method; valid: {', '.join(METHODS.names())}"
                          + (f"; aliases: {', '.join(aliases)}" if aliases else ""))
    return METHODS.canonical(key)


def load_config(preset: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the YAML ``preset`` (if any), then dotted ``overrides`` (``"train.lr": 0.05``)."""
    cfg = RunConfig()
    given_train_keys: set[str] = set()
    if preset is not None:
        path = Path(preset)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if raw is not None:
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
            cfg = _merge(cfg, _without_record_keys(raw), source=str(path), prefix="")
            given_train_keys |= _train_keys_in(raw)
    for key, value in (overrides or {}).items():
        nested = _nest(key.split("."), value)
        cfg = _merge(cfg, nested, source="command line", prefix="")
        given_train_keys |= _train_keys_in(nested)
    return _finish(cfg, given_train_keys)


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    return {parts[0]: value} if len(parts) == 1 else {parts[0]: _nest(parts[1:], value)}


def _merge(obj: Any, raw: dict[str, Any], source: str, prefix: str) -> Any:
    """A copy of dataclass ``obj`` with the keys of ``raw`` applied (recursively), type-checked."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    updates: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{path}'; valid: {', '.join(prefix + n for n in names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{path}' must be a mapping, got {value!r}")
            updates[key] = _merge(current, value, source, f"{path}.")
        elif key == "method_params":
            updates[key] = _method_params(current, value, source, path)
        else:
            updates[key] = _read(value, hints[key], f"{source}: '{path}'")
    return dataclasses.replace(obj, **updates)


def _read(value: Any, hint: Any, what: str) -> Any:
    """``value`` read as the field type ``hint``: :func:`methods.params.coerce`'s types, plus ``X | None``
    (null: unset) and ``list[float]`` (a list, or a comma-separated text)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        (hint,) = [arg for arg in args if arg is not type(None)]
    if typing.get_origin(hint) is list and typing.get_args(hint) == (float,):
        return [coerce(item, float, what) for item in coerce(value, list[str], what)]
    return coerce(value, hint, what)


def _method_params(current: dict[str, dict[str, Any]], value: Any, source: str, path: str) -> dict:
    """``current`` with the parameter mappings of ``value`` applied, under canonical method names, each
    value read as its default's type (:meth:`methods.base.Method.resolve_params`)."""
    from methods.base import METHODS  # imports torch: only when a run is configured

    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{source}: '{path}' must map method names to parameter mappings, got {value!r}")
    merged = {name: dict(params) for name, params in current.items()}
    given: dict[str, dict[str, Any]] = {}
    for key, params in value.items():
        name = _canonical_method_key(str(key), source, path)
        for param, setting in params.items():
            require(given.setdefault(name, {}).get(param, setting) == setting,
                    f"'{path}': {name}.{param} is set twice ({name} and its alias) with different values", source)
            given[name][param] = setting
    for name, params in given.items():
        resolved = METHODS.get(name).resolve_params(params)
        merged.setdefault(name, {}).update({param: resolved[param] for param in params})
    return merged


def validate(cfg: RunConfig) -> None:
    """Range checks on every value; the message names the key and the allowed values."""
    t, s, sp, e = cfg.train, cfg.data.synthface, cfg.data.split, cfg.eval
    require(len(cfg.methods) > 0, "methods: give at least one method")
    require(len(set(cfg.methods)) == len(cfg.methods), f"methods: duplicate names in {cfg.methods}")
    require(t.batch_size >= 2, f"train.batch_size must be >= 2, got {t.batch_size}")
    require(t.budget >= t.batch_size, f"train.budget ({t.budget}) must be >= train.batch_size ({t.batch_size})")
    require(t.embedding_size >= 2, f"train.embedding_size must be >= 2, got {t.embedding_size}")
    _validate_optimizer(t)
    require(0 <= t.warmup_fraction < 1, f"train.warmup_fraction must be in [0, 1), got {t.warmup_fraction}")
    require(t.lr_power >= 0, f"train.lr_power must be >= 0, got {t.lr_power}")
    require(t.grad_clip_norm >= 0, f"train.grad_clip_norm must be >= 0 (0 disables), got {t.grad_clip_norm}")
    require(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    require(t.ckpt_every >= 0, f"train.ckpt_every must be >= 0 (0: only at the end), got {t.ckpt_every}")
    require(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")
    require(DEVICE_PATTERN.fullmatch(t.device) is not None,
            f"train.device must be auto, cpu, cuda or cuda:N (N a device index), got {t.device!r}")
    require(s.num_identities >= 2, f"data.synthface.num_identities must be >= 2, got {s.num_identities}")
    require(s.images_per_identity >= 2,
            f"data.synthface.images_per_identity must be >= 2, got {s.images_per_identity}")
    require(16 <= s.image_size <= 512, f"data.synthface.image_size must be in [16, 512], got {s.image_size}")
    require(0 <= s.nuisance <= 3, f"data.synthface.nuisance must be in [0, 3], got {s.nuisance}")
    require(0 <= s.twin_fraction <= 1, f"data.synthface.twin_fraction must be in [0, 1], got {s.twin_fraction}")
    require(0 <= s.label_noise < 1, f"data.synthface.label_noise must be in [0, 1), got {s.label_noise}")
    require(0 <= s.lowres_fraction <= 1, f"data.synthface.lowres_fraction must be in [0, 1], got {s.lowres_fraction}")
    require(1 <= s.lowres_min_px < s.image_size, f"data.synthface.lowres_min_px must be in [1, image_size = "
                                                  f"{s.image_size}), got {s.lowres_min_px}")
    require(sp.shallow_images >= 1, f"data.split.shallow_images must be >= 1, got {sp.shallow_images}")
    require(sp.longtail_exponent > 0, f"data.split.longtail_exponent must be > 0, got {sp.longtail_exponent}")
    require(sp.longtail_min_images >= 1,
            f"data.split.longtail_min_images must be >= 1, got {sp.longtail_min_images}")
    require(sp.max_identities >= 0, f"data.split.max_identities must be >= 0 (0: all), got {sp.max_identities}")
    require(cfg.data.workers >= 0, f"data.workers must be >= 0, got {cfg.data.workers}")
    require(cfg.data.dataset != "custom" or bool(cfg.data.card),
            "data.card: dataset 'custom' needs a dataset card, e.g. --set data.card=my_dataset.yaml")
    require(len(e.protocols) > 0, "eval.protocols: give at least one protocol")
    require(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    require(0.0 <= e.geometry_strength <= 1.0, f"eval.geometry_strength must be in [0, 1], got {e.geometry_strength}")
    require(e.tar_read_off in ("nearest", "at_most"),
            f"eval.tar_read_off must be nearest or at_most, got {e.tar_read_off!r}")
    require(len(e.megaface_variants) > 0 and set(e.megaface_variants) <= {"raw", "refined"},
            f"eval.megaface_variants must be raw and/or refined, got {e.megaface_variants}")


def _validate_optimizer(t: TrainSettings) -> None:
    """``train.optimizer`` and its keys: the optimizer is known, every key it uses is set and in range,
    and no key of another optimizer is set."""
    require(t.optimizer in OPTIMIZER_DEFAULTS,
            f"train.optimizer must be one of {', '.join(OPTIMIZER_DEFAULTS)}, got {t.optimizer!r}")
    uses = OPTIMIZER_DEFAULTS[t.optimizer]
    for key in OPTIMIZER_KEYS:
        require(key in uses or getattr(t, key) is None,
                f"train.{key} does not apply to optimizer {t.optimizer} (its keys: {', '.join(uses)}), "
                f"got {getattr(t, key)!r}")
    require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if "momentum" in uses:
        require(0 <= t.momentum < 1, f"train.momentum must be in [0, 1), got {t.momentum}")
    if "betas" in uses:
        require(len(t.betas) == 2 and all(0 <= beta < 1 for beta in t.betas),
                f"train.betas must be two values in [0, 1), got {t.betas}")
    if "eps" in uses:
        require(t.eps > 0, f"train.eps must be > 0, got {t.eps}")


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
