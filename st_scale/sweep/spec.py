"""Sweep specifications (`tune/*.yaml`): which recipe, which fields to search and how, what to
optimise, the scheduler and the resources of each trial. Everything is checked against the recipe on
the driver, before any trial starts, and each error names the spec field.

    space:
      method.kl_weight: {loguniform: [0.1, 10]}     # a config field and its distribution
      sampler:                                       # a family: each option sets several fields
        family:
          uniform: {sampling.space: full, sampling.decay: 1.0}
          biased_to_large: {sampling.decay: {uniform: [0.3, 0.9]}}
    run:                                             # `search: grid` runs every option (a study)
      family: {ct: {method: {name: ct}}, st: {method: {name: st}}}
      search: grid
"""

from __future__ import annotations

import difflib
import os
import typing
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..assembly import check_buildable
from ..config import (
    Config,
    ConfigError,
    Section,
    apply_override,
    assign,
    build_config,
    explain_validation_error,
    flatten,
    load_recipe_tree,
    parse_yaml,
)
from ..evaluate.passes import reported_metrics
from ..schema import checked_name

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
FAMILY_KEY = "family"  # the option name inside a family's trial value


class SweepObjective(Section):
    """One reported metric, or a weighted sum of several (declared here, recorded in MLflow)."""

    metric: str | None = None
    weights: dict[str, float] | None = None
    mode: Literal["max", "min"] = "max"

    @model_validator(mode="after")
    def _one_of(self) -> SweepObjective:
        if (self.metric is None) == (self.weights is None):
            raise ValueError(
                "give exactly one of metric (e.g. val/subnets_mean_top1) or weights "
                "(e.g. {val/main_top1: 0.5, val/subnets_mean_top1: 0.5})"
            )
        if self.weights is not None and not self.weights:
            raise ValueError("weights is empty; name at least one metric")
        return self

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if self.metric else list(self.weights)

    def describe(self) -> str:
        if self.metric:
            return self.metric
        return " + ".join(f"{w:g}*{name}" for name, w in self.weights.items())

    def value(self, metrics: dict[str, Any]) -> float | None:
        if any(name not in metrics for name in self.metrics):
            return None
        if self.metric:
            return float(metrics[self.metric])
        return float(sum(w * float(metrics[name]) for name, w in self.weights.items()))


class Scheduler(Section):
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="asha: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep 1/reduction_factor of trials at each rung")


class SearchSection(Section):
    algorithm: Literal["random", "hyperopt", "optuna"] = Field(
        "random",
        description="random: draw every trial from the space (grid entries run every value); hyperopt, optuna: "
        "TPE, which proposes each trial from the results so far (no grid entries; optuna: no families)",
    )
    initial_points: int = Field(
        4, ge=1, description="hyperopt, optuna: trials drawn at random before the model proposes them"
    )


class TrialSection(Section):
    cpus: float = Field(1.0, gt=0, description="the trial's own process (the Ray Train driver), besides its workers")
    max_failures: int = Field(0, ge=-1, description="retries of a failed trial (it resumes from its last checkpoint)")


class SweepSpec(Section):
    name: str = Field(description="the sweep's name: results under storage_path/name; running it again resumes it")
    recipe: str = Field(description="packaged recipe name or .yaml path every trial starts from")
    set: dict[str, Any] = Field(default_factory=dict, description="fixed dotted overrides for every trial")
    space: dict[str, Any] = Field(description="dotted config field -> distribution, or label -> {family: options}")
    objective: SweepObjective
    scheduler: Scheduler = Scheduler()
    search: SearchSection = SearchSection()
    num_samples: int = Field(8, ge=1, description="trials (times each grid point)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="default: as many as fit the cluster now; set it higher on an autoscaling cluster"
    )
    trial: TrialSection = TrialSection()
    storage_path: str = Field(
        "~/st_scale_sweeps", description="a folder; on a cluster one every node shares (Tune keeps its state there)"
    )
    seed: int = Field(0, ge=0, description="seeds the search")

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value):
        return checked_name("name", value)

    @model_validator(mode="after")
    def _storage_is_a_folder(self) -> SweepSpec:
        if "://" in self.storage_path:
            raise ValueError(
                f"storage_path={self.storage_path!r}: a sweep keeps its trials' runs and Tune's state in a folder "
                f"(on a cluster, one every node shares); give a folder path. Single runs take an s3:// "
                f"run.storage_path"
            )
        overlap = sorted(set(self.set) & set(_space_fields(self.space)))
        if overlap:
            raise ValueError(
                f"{overlap[0]} is in both `set:` and `space:`; a field is fixed or searched, not both: remove it "
                f"from one"
            )
        return self


def _space_fields(space: dict[str, Any]) -> list[str]:
    """The config fields a search space names directly (families' options name theirs inside)."""
    return [key for key, value in space.items() if not (isinstance(value, dict) and "family" in value)]


# ------------------------------------------------------------------------------------ search space
@dataclass
class Distribution:
    kind: str
    values: list

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(self.values)
        if self.kind == "grid":
            return tune.grid_search(self.values)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](
            *self.values
        )

    def probes(self) -> list:
        """Values that exercise the whole range when checked against the config."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.kind == "randint" else [low, high]


@dataclass
class Dimension:
    """One entry of `space`: a config field with its distribution, or a family of option dicts."""

    label: str
    distribution: Distribution | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # family: name -> {field: value|Distribution}
    grid: bool = False  # family: every option (grid search) instead of one drawn per trial

    @property
    def is_family(self) -> bool:
        return bool(self.options)

    def to_tune(self):
        if not self.is_family:
            return self.distribution.to_tune()
        from ray import tune

        options = [
            {FAMILY_KEY: name} | {k: v.to_tune() if isinstance(v, Distribution) else v for k, v in option.items()}
            for name, option in self.options.items()
        ]
        return tune.grid_search(options) if self.grid else tune.choice(options)

    def probe_assignments(self) -> list[tuple[str, dict[str, Any]]]:
        """(description, {field: value}) pairs to check against the config."""
        if not self.is_family:
            return [(f"value {v!r}", {self.label: v}) for v in self.distribution.probes()]
        out = []
        for name, option in self.options.items():
            fixed = {k: v for k, v in option.items() if not isinstance(v, Distribution)}
            ranged = {k: v for k, v in option.items() if isinstance(v, Distribution)}
            if not ranged:
                out.append((f"option {name!r}", fixed))
            for key, dist in ranged.items():
                out += [(f"option {name!r} with {key}={v!r}", fixed | {key: v}) for v in dist.probes()]
        return out


def parse_distribution(where: str, raw: Any) -> Distribution:
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: expected one of {{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}}, got {raw!r}; "
            f"fixed values go under `set:`"
        )
    kind, values = next(iter(raw.items()))
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
        return Distribution(kind, values)
    if not (
        isinstance(values, list)
        and len(values) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise ConfigError(f"{where}: {kind} needs [low, high] as two numbers, got {values!r}")
    low, high = values
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}: randint needs integer bounds, got {values!r}")
    if not low < high:
        raise ConfigError(
            f"{where}: the {kind} range [{low}, {high}] is empty or inverted; low must be below high"
            + (" (randint's high is exclusive)" if kind == "randint" else "")
        )
    if kind == "loguniform" and low <= 0:
        raise ConfigError(
            f"{where}: loguniform needs low > 0, got [{low}, {high}]; use uniform for ranges that reach 0"
        )
    return Distribution(kind, [low, high])


def _is_distribution(value: Any) -> bool:
    """A family option's value is a distribution when it is {kind: ...}; other mappings (a whole
    section, e.g. `method: {name: ct}`) are fixed values."""
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def parse_space(space: dict[str, Any]) -> list[Dimension]:
    if not space:
        raise ConfigError(
            "space: empty; name at least one field to search, e.g. method.kl_weight: {loguniform: [0.1, 10]}"
        )
    dimensions = []
    for label, raw in space.items():
        where = f"space.{label}"
        if isinstance(raw, dict) and FAMILY_KEY in raw and set(raw) <= {FAMILY_KEY, "search"}:
            search = raw.get("search", "choice")
            if search not in ("choice", "grid"):
                raise ConfigError(
                    f"{where}.search: {search!r}; choose choice (one option drawn per trial) or grid "
                    f"(every option, times the other grid entries)"
                )
            options = raw[FAMILY_KEY]
            if not isinstance(options, dict) or not options or not all(isinstance(o, dict) for o in options.values()):
                raise ConfigError(f"{where}.family: needs named options, each a mapping of dotted fields to values")
            parsed = {
                name: {
                    k: parse_distribution(f"{where}.family.{name}.{k}", v) if _is_distribution(v) else v
                    for k, v in option.items()
                }
                for name, option in options.items()
            }
            dimensions.append(Dimension(label, options=parsed, grid=search == "grid"))
        else:
            dimensions.append(Dimension(label, distribution=parse_distribution(where, raw)))
    return dimensions


def trial_assignments(trial_config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's config as dotted config fields (family options expanded)."""
    out = {}
    for label, value in trial_config.items():
        if isinstance(value, dict) and FAMILY_KEY in value:
            out.update({k: v for k, v in value.items() if k != FAMILY_KEY})
        else:
            out[label] = value
    return out


def trial_labels(trial_config: dict[str, Any]) -> dict[str, Any]:
    """label -> what the trial drew (a family's option name, else the value): for tables and plots."""
    return {
        label: value[FAMILY_KEY] if isinstance(value, dict) and FAMILY_KEY in value else value
        for label, value in trial_config.items()
    }


# ------------------------------------------------------------------------------------ checking
def _section_models(annotation) -> list[type[BaseModel]]:
    """The models a field holds: itself, or every member of a (discriminated) union such as `method`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [a for arg in typing.get_args(annotation) for a in _section_models(arg)]


def _known_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, info in model.model_fields.items():
        sections = _section_models(info.annotation)
        if sections:
            for section in sections:
                out += [f for f in _known_fields(section, f"{prefix}{name}.") if f not in out]
        else:
            out.append(f"{prefix}{name}")
    return out


def _check_field(where: str, key: str) -> None:
    known = _known_fields()
    if key in known or key.startswith("deepspeed.overrides."):  # free-form: merged into the DeepSpeed JSON
        return
    if any(f.startswith(key + ".") for f in known):  # a whole section, e.g. method: {name: ct}
        return
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see `st-scale train RECIPE --print-config` for the fields"
    raise ConfigError(f"{where}: unknown parameter {key!r}; {hint}")


def with_assignments(tree: dict, assignments: dict[str, Any]) -> dict:
    """A copy of the config tree with dotted fields set."""
    tree = deepcopy(tree)
    for key, value in assignments.items():
        assign(tree, key, value)
    return tree


@dataclass
class CheckedSweep:
    spec: SweepSpec
    dimensions: list[Dimension]
    base_tree: dict  # the recipe with `set` applied: every trial starts from it
    base: Config

    def param_space(self) -> dict[str, Any]:
        return {d.label: d.to_tune() for d in self.dimensions}

    def trial_config(self, trial_config: dict[str, Any]) -> Config:
        return build_config(with_assignments(self.base_tree, trial_assignments(trial_config)))


def check_spec(spec: SweepSpec) -> CheckedSweep:

    for key in spec.set:
        _check_field(f"set.{key}", key)
    base_tree = with_assignments(load_recipe_tree(spec.recipe), spec.set)
    try:
        base = build_config(base_tree)
        check_buildable(base)
    except ConfigError as error:
        raise ConfigError(f"recipe {spec.recipe!r} with `set`: {error}") from None
    dimensions = parse_space(spec.space)
    for dim in dimensions:
        for description, assignment in dim.probe_assignments():
            for key in assignment:
                _check_field(f"space.{dim.label}" + (f" ({description})" if dim.is_family else ""), key)
            try:
                check_buildable(build_config(with_assignments(base_tree, assignment)))
            except ConfigError as error:
                raise ConfigError(f"space.{dim.label}: {description} gives an invalid trial config:\n{error}") from None
    _check_pairs(base_tree, dimensions)
    _check_objective(spec, base)
    _check_search(spec, dimensions)
    return CheckedSweep(spec, dimensions, base_tree, base)


def _check_pairs(base_tree: dict, dimensions: list[Dimension]) -> None:
    """Every two entries of the space drawn together: a rule that ties two fields (an optimizer and its
    own options, warm-up and epochs) is broken only by a combination, which a searcher may draw in
    any trial. (Each entry alone was checked first; three-way rules are left to the trials.)"""
    probes = [(dim, dim.probe_assignments()) for dim in dimensions]
    for i, (first, first_probes) in enumerate(probes):
        for second, second_probes in probes[i + 1 :]:
            for first_says, first_sets in first_probes:
                for second_says, second_sets in second_probes:
                    try:
                        check_buildable(build_config(with_assignments(base_tree, first_sets | second_sets)))
                    except ConfigError as error:
                        raise ConfigError(
                            f"space.{first.label} ({first_says}) with space.{second.label} ({second_says}) gives an "
                            f"invalid trial config, and the search may draw them together:\n{error}"
                        ) from None


def _check_search(spec: SweepSpec, dimensions: list[Dimension]) -> None:
    """What a model-based search cannot take: grid entries (it proposes values, it does not enumerate
    them) and, for Optuna, families (it takes flat spaces of single values)."""
    algorithm = spec.search.algorithm
    if algorithm == "random":
        return
    for dim in dimensions:
        where = f"space.{dim.label}"
        if dim.is_family and algorithm == "optuna":
            raise ConfigError(
                f"{where}: a family under search.algorithm=optuna; Optuna searches flat spaces of single values. "
                f"Use search.algorithm=hyperopt (it searches nested families) or random, or replace the family "
                f"by the fields it sets"
            )
        if dim.grid or (dim.distribution is not None and dim.distribution.kind == "grid"):
            raise ConfigError(
                f"{where}: a grid under search.algorithm={algorithm}, which proposes values instead of running "
                f"every one; use {{choice: [...]}} (search: choice for a family), or search.algorithm=random"
            )


def _check_objective(spec: SweepSpec, cfg: Config) -> None:
    every_epoch, sometimes = reported_metrics(cfg)
    for name in spec.objective.metrics:
        where = "objective.metric" if spec.objective.metric else f"objective.weights.{name}"
        if name in sometimes:
            raise ConfigError(
                f"{where}: {name!r} is reported only every eval.subnets_every={cfg.eval.subnets_every} epochs and at "
                f"the end, but the scheduler compares trials every epoch; add `eval.subnets_every: 1` under `set:` "
                f"(keep eval.max_subnets small to bound its cost)"
            )
        if name not in every_epoch and name.startswith("val/ema/"):
            raise ConfigError(
                f"{where}: {name!r} is the weights' average, reported only when optimizer.ema_decay is set and "
                f"eval.recalibrate is on (the average has no BN statistics of its own); add `optimizer.ema_decay: "
                f"0.999` (or another decay) under `set:`"
            )
        if name not in every_epoch:
            raise ConfigError(f"{where}: training never reports {name!r}; it reports: {', '.join(sorted(every_epoch))}")
    if spec.scheduler.name == "asha" and spec.scheduler.grace_period > cfg.optimizer.epochs:
        raise ConfigError(
            f"scheduler.grace_period={spec.scheduler.grace_period} is longer than the trials "
            f"(optimizer.epochs={cfg.optimizer.epochs}); lower it"
        )


# ------------------------------------------------------------------------------------ loading
def spec_path(spec: str) -> Path:
    """A path, or the name of a spec in ./tune/."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    named = Path("tune") / f"{spec}.yaml"
    if path.suffix not in (".yaml", ".yml") and os.sep not in spec and named.is_file():
        return named.resolve()
    raise ConfigError(f"sweep spec {spec!r}: no such file (give a path, or the name of a file in ./tune/)")


def load_spec(spec: str, overrides: list[str] = ()) -> SweepSpec:
    """The spec file, with `--set` overrides of its own keys: num_samples=4, scheduler.grace_period=2,
    set.optimizer.epochs=2, 'space.method.kl_weight={loguniform: [0.5, 2]}'."""

    path = spec_path(spec)
    tree = parse_yaml(path.read_text(), f"sweep spec {path}") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"sweep spec {path}: must be a mapping")
    for assignment in overrides:
        key, _, raw = assignment.partition("=")
        section = key.split(".", 1)[0]
        if section in ("set", "space") and "." in key:  # their keys are dotted fields: set.optimizer.epochs=3
            value = parse_yaml(raw, f"--set {assignment!r}") if raw.strip() else ""
            tree.setdefault(section, {})[key.split(".", 1)[1]] = value
        else:
            apply_override(tree, assignment)
    try:
        return SweepSpec.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(explain_validation_error(error, f"invalid sweep spec {path}")) from None


def flat_spec_params(spec: SweepSpec) -> dict[str, Any]:
    """The spec as MLflow params of the parent run."""
    tree = spec.model_dump(mode="json")
    tree.pop("space")
    params = flatten(tree)
    params["objective"] = spec.objective.describe()
    return params
