"""The claims registry: what each paper claims, on which setting, between which arms, judged on which metric.

One YAML file per paper in ``bench/repro/claims/`` (documented in README, "Reproduction verdicts"):

.. code-block:: yaml

    paper:
      key: sst
      citation: "Du et al., Semi-Siamese Training for Shallow Face Learning, ECCV 2020"
    claims:
      - id: sst-shallow
        claim: "SST beats conventional training on shallow data"   # one sentence
        where: "Sec. 4.3, Table 3"                                   # where the paper makes it
        metric: synth-lfw acc        # a results column (bench.report.runs.record_row)
        relation: better             # A better than B; or: equivalent, with eps and eps_reason
        set: {data.split.name: shallow, train.budget: 40000}   # the setting: config overrides, as --set
        a: {method: sst}
        b: {method: arcface, params: {s: 64.0}}
        comparisons:                 # optional: one verdict per comparison, each with its own setting
          - {name: shallow, set: {data.split.name: shallow}}
          - {name: longtail, set: {data.split.name: longtail}, b: {method: sst}}
        requires: [prototype_memory.mining]   # optional: parameters that must exist to run it

An arm may name its own ``metric`` (a results column of the same run), to compare two scores of one
model (``ri``'s own quality estimate against ERS, both from one run per seed); ``lower_is_better: true``
judges a metric where lower wins (an error, a pAUC of the error-versus-discard curve): the difference
judged is then ``B - A``, so that "A better than B" is still a positive difference.

A *trend* claim ("accuracy increases with X", judged over several levels of one setting rather than between
two arms) has ``relation: increases`` and a ``trend`` instead of arms:

.. code-block:: yaml

      - id: ssl-concentration
        metric: synth-lfw acc                         # y: the results column that should increase ...
        relation: increases
        set: {train.budget: 12800, eval.protocols: [synth-lfw, synth-geometry]}
        trend:
          method: infonce
          x: synth-geometry concentration sigma@0.8   # ... with this results column of the same run
          levels:                                     # one run per level and seed
            - {method_params.infonce.strength: 0.25, eval.geometry_strength: 0.25}
            - {method_params.infonce.strength: 1.0, eval.geometry_strength: 1.0}

It is judged by Spearman's rho between x and y over every (level, seed) run and its percentile bootstrap
interval (:func:`bench.stats.spearman_interval`): reproduced when the interval lies above 0, contradicted
when below.

Each comparison (or the claim itself when it lists none) is judged on its own: arm A and arm B, each a
method, its parameters and optional overrides of its own (``set``), over the claim's setting. Seed ``k``
of every arm trains with ``train.seed = k`` and ``data.split.seed = k``: the arms of one seed share the
split and the data order (paired), and the seeds vary both. ``--budget`` of ``bench reproduce`` replaces
every claim's ``train.budget``.

The registry builds configurations (:func:`arm_config`) but runs nothing and reads no record: running is
:mod:`bench.repro.reproduce`, judging :mod:`bench.repro.judge`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.config import RunConfig, load_config
from bench.stats import RELATIONS
from methods.registry import ConfigError

#: The registry shipped with FaceBench.
CLAIMS_DIR = Path(__file__).resolve().parent / "claims"
#: Where ``bench reproduce`` writes its runs by default: apart from ``bench run``'s, so that arms that
#: differ only in a parameter or a data option do not mix into the method tables.
CLAIMS_RESULTS = "results/claims"
#: The setting every claim starts from, below its own (ours, README "Reproduction verdicts"): a budget of
#: 40,000 samples (2 epochs of the full split, 20 of the shallow one; about 40 s per run on the 2-core CPU,
#: so that the registry at 5 seeds fits in 2 hours) and the two protocols the claims are judged on, so
#: that runs are shared between claims (the protocols are part of a run's configuration).
REGISTRY_SETTING: dict[str, Any] = {"train.budget": 40_000, "eval.protocols": ["synth-lfw", "synth-ijbc"]}


def settings_text(values: dict[str, Any]) -> str:
    """``data.split.name=full, train.budget=12800``: a mapping of overrides as one line."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: a method, its parameters, and overrides of the setting for this arm."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)
    #: The results column judged for this arm ("" = the claim's metric).
    metric: str = ""

    def label(self) -> str:
        """``pfc(sample_rate=0.1)``, plus its own overrides (``arcface [data.split.name=full]``) and metric."""
        text = self.method + (f"({settings_text(self.params)})" if self.params else "")
        text += f" [{settings_text(self.set)}]" if self.set else ""
        return text + (f" on '{self.metric}'" if self.metric else "")


@dataclass(frozen=True)
class Comparison:
    """A judged pair of arms: ``a`` against ``b`` over ``set`` (the claim's setting with this one's)."""

    claim: Claim
    name: str
    set: dict[str, Any]
    a: Arm
    b: Arm

    @property
    def row_id(self) -> str:
        return self.claim.id if not self.name else f"{self.claim.id}/{self.name}"

    def setting_text(self) -> str:
        return settings_text(self.set)


@dataclass(frozen=True)
class Trend:
    """A trend claim's runs: ``method`` (with ``params``) at each of ``levels`` (overrides of the claim's
    setting), judged on the rank correlation of results column ``x`` with the claim's metric."""

    method: str
    x: str
    levels: tuple[dict[str, Any], ...]
    set: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def level_label(self, index: int) -> str:
        """``strength=0.25, geometry_strength=0.25``: each override's last key component and value."""
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.levels[index].items())


#: The relation of a trend claim (the pairwise relations are :data:`bench.stats.RELATIONS`).
TREND_RELATION = "increases"


@dataclass(frozen=True)
class Claim:
    id: str
    paper_key: str
    citation: str
    claim: str
    where: str
    metric: str
    relation: str
    eps: float | None
    eps_reason: str
    requires: tuple[str, ...]
    source: Path
    comparisons: tuple[Comparison, ...] = ()
    #: The metric is an error or a cost: the judged difference is B - A.
    lower_is_better: bool = False
    #: A trend claim's runs (then ``comparisons`` is empty).
    trend: Trend | None = None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _arm(raw: Any, where: str) -> Arm:
    raw = _mapping(raw, where)
    unknown = set(raw) - {"method", "params", "set", "metric"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: method, params, set, metric")
    if not isinstance(raw.get("method"), str):
        raise ConfigError(f"{where}: an arm needs 'method' (a method name)")
    if not isinstance(raw.get("metric", ""), str):
        raise ConfigError(f"{where}: an arm's metric must be a results column name")
    return Arm(raw["method"], _mapping(raw.get("params"), f"{where}.params"), _mapping(raw.get("set"), f"{where}.set"),
               raw.get("metric", ""))


_CLAIM_KEYS = {"id", "claim", "where", "metric", "relation", "eps", "eps_reason", "set", "a", "b", "comparisons",
               "requires", "lower_is_better", "trend"}


def _trend(raw: Any, base_set: dict[str, Any], where: str) -> Trend:
    raw = _mapping(raw, f"{where}.trend")
    unknown = set(raw) - {"method", "params", "x", "levels"}
    if unknown:
        raise ConfigError(f"{where}.trend: unknown key(s) {', '.join(sorted(unknown))}; valid: levels, method, "
                          "params, x")
    if not isinstance(raw.get("method"), str) or not isinstance(raw.get("x"), str) or not raw["x"].strip():
        raise ConfigError(f"{where}.trend: needs 'method' (a method name) and 'x' (a results column)")
    levels = raw.get("levels")
    if not isinstance(levels, list) or len(levels) < 3:
        raise ConfigError(f"{where}.trend: 'levels' must list at least 3 settings (a rank correlation needs them)")
    return Trend(raw["method"], raw["x"], tuple(_mapping(level, f"{where}.trend.levels[{i}]")
                                                for i, level in enumerate(levels)),
                 base_set, _mapping(raw.get("params"), f"{where}.trend.params"))


def _claim(raw: Any, paper: dict[str, Any], source: Path, index: int) -> Claim:
    where = f"{source}: claims[{index}]"
    raw = _mapping(raw, where)
    unknown = set(raw) - _CLAIM_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(_CLAIM_KEYS))}")
    for key in ("id", "claim", "where", "metric", "relation"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ConfigError(f"{where}: '{key}' is required (a non-empty string)")
    where = f"{source}: claim '{raw['id']}'"
    if raw["relation"] not in (*RELATIONS, TREND_RELATION):
        raise ConfigError(f"{where}: relation must be one of {', '.join((*RELATIONS, TREND_RELATION))}, got "
                          f"{raw['relation']!r}")
    if ("trend" in raw) != (raw["relation"] == TREND_RELATION):
        raise ConfigError(f"{where}: relation '{TREND_RELATION}' goes with a 'trend' (and a trend with it)")
    if "trend" in raw and any(key in raw for key in ("a", "b", "comparisons", "lower_is_better")):
        raise ConfigError(f"{where}: a trend claim has levels, not arms a/b or comparisons")
    eps = raw.get("eps")
    if raw["relation"] == "equivalent":
        if not isinstance(eps, (int, float)) or eps <= 0 or not str(raw.get("eps_reason", "")).strip():
            raise ConfigError(f"{where}: an equivalence needs eps > 0 (in the metric's units, a fraction) and "
                              f"eps_reason (why that margin)")
    elif eps is not None:
        raise ConfigError(f"{where}: eps is only for relation 'equivalent'")
    requires = raw.get("requires") or []
    if not isinstance(requires, list) or not all(isinstance(r, str) and r.count(".") == 1 for r in requires):
        raise ConfigError(f"{where}: requires must be a list of 'method.parameter' names")
    claim = Claim(id=raw["id"], paper_key=paper["key"], citation=paper["citation"], claim=raw["claim"].strip(),
                  where=raw["where"], metric=raw["metric"], relation=raw["relation"],
                  eps=float(eps) if eps is not None else None, eps_reason=str(raw.get("eps_reason", "")).strip(),
                  requires=tuple(requires), source=source, lower_is_better=_flag(raw, "lower_is_better", where))
    base_set = _mapping(raw.get("set"), f"{where}.set")
    if "trend" in raw:
        object.__setattr__(claim, "trend", _trend(raw["trend"], base_set, where))
        return claim
    entries = raw.get("comparisons") or [{"name": ""}]
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: comparisons must be a list")
    comparisons = []
    for number, entry in enumerate(entries):
        entry = _mapping(entry, f"{where}.comparisons[{number}]")
        unknown = set(entry) - {"name", "set", "a", "b"}
        if unknown:
            raise ConfigError(f"{where}.comparisons[{number}]: unknown key(s) {', '.join(sorted(unknown))}")
        a_raw, b_raw = entry.get("a", raw.get("a")), entry.get("b", raw.get("b"))
        if a_raw is None or b_raw is None:
            raise ConfigError(f"{where}: every comparison needs arms 'a' and 'b'")
        comparisons.append(Comparison(claim, str(entry.get("name", "")),
                                      {**base_set, **_mapping(entry.get("set"), f"{where}.comparisons[{number}].set")},
                                      _arm(a_raw, f"{where}.a"), _arm(b_raw, f"{where}.b")))
    object.__setattr__(claim, "comparisons", tuple(comparisons))
    return claim


def _flag(raw: dict[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def load_claims(directory: Path = CLAIMS_DIR) -> list[Claim]:
    """Every claim of every ``*.yaml`` in ``directory``, in file then listing order (ids unique)."""
    claims: list[Claim] = []
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        raise ConfigError(f"{directory}: no claim files (*.yaml)")
    for path in files:
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        raw = _mapping(raw, str(path))
        paper = _mapping(raw.get("paper"), f"{path}: paper")
        if not isinstance(paper.get("key"), str) or not isinstance(paper.get("citation"), str):
            raise ConfigError(f"{path}: 'paper' needs 'key' and 'citation'")
        entries = raw.get("claims")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{path}: 'claims' must be a non-empty list")
        claims += [_claim(entry, paper, path, i) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for claim in claims:
        if claim.id in seen:
            raise ConfigError(f"{claim.source}: claim id '{claim.id}' is used twice")
        seen.add(claim.id)
    return claims


def select_claims(claims: list[Claim], ids: list[str] | None) -> list[Claim]:
    """The claims named in ``ids`` (all when None), in registry order; an unknown id is one line."""
    if not ids:
        return claims
    known = {c.id for c in claims}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ConfigError(f"unknown claim id(s) {', '.join(unknown)}; valid: {', '.join(c.id for c in claims)}")
    return [c for c in claims if c.id in ids]


def missing_requirements(claim: Claim) -> list[str]:
    """The ``method.parameter`` names a claim requires that no method has yet (README: "not yet runnable")."""
    from methods.base import METHODS  # imports torch: only when claims are run or judged

    missing = []
    for requirement in claim.requires:
        method, param = requirement.split(".")
        if method not in METHODS or param not in METHODS.get(method).resolve_params(None):
            missing.append(requirement)
    return missing


def arm_config(comparison: Comparison, arm: Arm, seed: int, budget: int | None = None,
               out: str = CLAIMS_RESULTS, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run configuration of ``arm`` of ``comparison`` with seed ``seed`` (see the module docstring).

    Precedence: defaults < :data:`REGISTRY_SETTING` < the claim's and comparison's setting < the arm's own
    ``set`` < ``budget`` and ``overrides`` (``bench reproduce --budget`` / ``--set``) < the seed, the method
    and ``out``."""
    return _run_config({**comparison.set, **arm.set}, arm.method, arm.params, seed, budget, out, overrides,
                       f"{comparison.claim.source}: claim '{comparison.row_id}', arm {arm.label()}")


def trend_config(claim: Claim, level: int, seed: int, budget: int | None = None, out: str = CLAIMS_RESULTS,
                 overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run configuration of level ``level`` of trend claim ``claim`` with seed ``seed``: the same
    precedence as :func:`arm_config`, the level's overrides in the place of an arm's ``set``."""
    trend = claim.trend
    if trend is None:
        raise ValueError(f"claim '{claim.id}' is not a trend claim")
    return _run_config({**trend.set, **trend.levels[level]}, trend.method, trend.params, seed, budget, out, overrides,
                       f"{claim.source}: claim '{claim.id}', level {trend.level_label(level)}")


def _run_config(setting: dict[str, Any], method: str, params: dict[str, Any], seed: int, budget: int | None,
                out: str, overrides: dict[str, Any] | None, where: str) -> RunConfig:
    values: dict[str, Any] = {**REGISTRY_SETTING, **setting}
    if budget is not None:
        values["train.budget"] = budget
    values.update(overrides or {})
    values.update({"methods": [method], "train.seed": seed, "data.split.seed": seed, "out": out})
    for param, value in params.items():
        values[f"method_params.{method}.{param}"] = value
    try:
        return load_config(None, values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def run_fingerprint(config: RunConfig) -> str:
    """The configuration fingerprint the run record of one-method ``config`` carries (what reuse and the
    judge look runs up by)."""
    return config.for_method(config.methods[0]).resolved().fingerprint()


def arm_fingerprint(comparison: Comparison, arm: Arm, seed: int, budget: int | None = None,
                    out: str = CLAIMS_RESULTS, overrides: dict[str, Any] | None = None) -> tuple[RunConfig, str]:
    """:func:`arm_config` and the configuration fingerprint its run record carries (what reuse and the
    judge look runs up by)."""
    config = arm_config(comparison, arm, seed, budget, out, overrides)
    return config, run_fingerprint(config)
