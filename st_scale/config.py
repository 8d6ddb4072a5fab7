"""Typed, validated run configuration: YAML recipes plus dotted `--set a.b=value` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo fails on the driver, before
any worker starts, with the field's dotted path in the message.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .methods import METHODS, MethodOptions
from .models import FIXED_IMAGE_SIZES, MODEL_NAMES
from .schema import NAME_RULE, Section, checked_name, one_of
from .storage import check_storage_fields

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelSection(Section):
    name: str
    num_classes: int = Field(ge=2)
    stage_depths: list[int] | None = Field(
        None,
        description="build only the first d blocks of each stage: a sub-network's architecture as a model of "
        "its own (e.g. [1, 1, 1] of cifar_resnet20 is ResNet-8), to train it alone",
    )
    channels_last: bool = Field(
        False,
        description="batches in channels_last (NHWC) memory from the loader on, in training, BN re-estimation and "
        "evaluation, so every convolution runs NHWC: the layout tensor-core convolutions run fastest on",
    )
    compile: bool = Field(
        False,
        description="torch.compile each block on its own (regional compilation): the number of compiled graphs "
        "is bounded by the distinct block shapes, whatever sub-networks are drawn; compiling takes a minute or more",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return one_of("model", name, MODEL_NAMES)


class ProgressiveResizing(Section):
    """ffcv-imagenet's resolution schedule: low-resolution crops early (cheap steps), rising linearly to
    data.image_size. Epochs count from 1, as logged."""

    min_size: int = Field(ge=8, description="training resolution up to start_epoch")
    start_epoch: int = Field(ge=0, description="the last epoch at min_size")
    end_epoch: int = Field(ge=1, description="the first epoch at data.image_size")
    multiple: int = Field(32, ge=1, description="sizes between the two are rounded to a multiple of this")

    @model_validator(mode="after")
    def _ordered(self) -> ProgressiveResizing:
        if self.end_epoch <= self.start_epoch:
            raise ValueError(
                f"data.progressive_resizing.end_epoch={self.end_epoch} must come after start_epoch={self.start_epoch}"
            )
        return self


class DataSection(Section):
    train: str = Field(description="training .beton file")
    val: str = Field(description="validation .beton file")
    pipeline: Literal["cifar", "imagenet"] = "cifar"
    image_size: int = Field(32, ge=8, description="training resolution (crop size for imagenet)")
    val_image_size: int | None = Field(None, ge=8, description="validation crop (default image_size)")
    val_crop_ratio: float = Field(224 / 256, gt=0, le=1, description="imagenet: center crop / resize ratio")
    pad_crop: int = Field(4, ge=0, description="cifar: random crop after zero padding by this many pixels")
    flip: bool = True
    color_jitter: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="imagenet: brightness, contrast and saturation jitter "
        "(factors drawn in [1-v, 1+v], as torchvision's ColorJitter)",
    )
    pca_lighting: float = Field(0.0, ge=0, description="imagenet: AlexNet PCA lighting noise, std of the alphas")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = Field(128, ge=1, description="global batch size, split over the workers")
    val_batch_size: int = Field(256, ge=1, description="per-worker evaluation batch size")
    num_workers: int | None = Field(None, ge=1, description="loader threads (default: the worker's CPUs)")
    calibration_images: int = Field(
        512, ge=1, description="training images for BN re-estimation (a seeded random sample)"
    )
    progressive_resizing: ProgressiveResizing | None = Field(
        None,
        description="imagenet: train at a resolution rising from min_size to image_size over the epochs "
        "(BN re-estimation and evaluation stay at their own sizes)",
    )
    calibration_protocol: Literal["eval", "train"] = Field(
        "eval",
        description="BN re-estimation images: eval = un-augmented, evaluation transform; train = the training "
        "augmentation at training resolution (the authors' protocol)",
    )

    @model_validator(mode="after")
    def _pipeline_fields(self) -> DataSection:
        if self.pipeline == "cifar":
            defaults = type(self).model_fields
            for name in ("color_jitter", "pca_lighting", "val_image_size", "val_crop_ratio", "progressive_resizing"):
                if getattr(self, name) != defaults[name].default:
                    raise ValueError(
                        f"data.{name}={getattr(self, name)} applies to the imagenet pipeline only; "
                        f"remove it or set data.pipeline=imagenet"
                    )
        ramp = self.progressive_resizing
        if ramp is not None and ramp.min_size >= self.image_size:
            raise ValueError(
                f"data.progressive_resizing.min_size={ramp.min_size} must be below data.image_size={self.image_size}, "
                f"the resolution the ramp ends at"
            )
        return self

    def train_image_size(self, epoch: int) -> int:
        """The training resolution of 0-based `epoch` (ffcv-imagenet's schedule, in epochs counted from 1)."""
        ramp = self.progressive_resizing
        if ramp is None or epoch + 1 >= ramp.end_epoch:
            return self.image_size
        if epoch + 1 <= ramp.start_epoch:
            return ramp.min_size
        fraction = (epoch + 1 - ramp.start_epoch) / (ramp.end_epoch - ramp.start_epoch)
        size = ramp.min_size + fraction * (self.image_size - ramp.min_size)
        return min(max(int(round(size / ramp.multiple)) * ramp.multiple, ramp.min_size), self.image_size)


class SamplingSection(Section):
    space: Literal["full", "restricted"] = "full"
    max_dropped: list[int] | None = Field(None, description="restricted: trailing blocks each stage may drop")
    decay: float = Field(1.0, gt=0, le=1, description="1 = uniform; <1 favours larger sub-nets")
    include_full: bool = True
    per_rank: bool = False

    @model_validator(mode="after")
    def _restricted_needs_bounds(self) -> SamplingSection:
        if self.space == "restricted" and self.max_dropped is None:
            raise ValueError("space 'restricted' needs max_dropped, one entry per stage (e.g. [0, 1, 3, 0])")
        return self


OWN_DEFAULTS = {"sgd": {"momentum": 0.9, "nesterov": True}, "adamw": {"betas": (0.9, 0.999), "eps": 1e-8}}


def stored_config(tree: dict) -> dict:
    """A config as a checkpoint stored it, in this version's form: configs stored before the two
    optimizers' own fields could be unset hold the other optimizer's at their defaults."""
    optimizer = tree.get("optimizer")
    if not isinstance(optimizer, dict) or optimizer.get("name", "sgd") not in OWN_DEFAULTS:
        return tree  # (validation names what is wrong)
    (other,) = set(OWN_DEFAULTS) - {optimizer.get("name", "sgd")}
    written_by_default = {k for k, v in OWN_DEFAULTS[other].items() if k in optimizer and _as_stored(optimizer[k]) == v}
    return tree | {"optimizer": {k: v for k, v in optimizer.items() if k not in written_by_default}}


def _as_stored(value):
    return tuple(value) if isinstance(value, list) else value


class OptimizerSection(Section):
    name: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd (momentum, Nesterov) or adamw (Adam with decoupled weight decay: what ViTs and Swins "
        "train with)"
    )  # fmt: skip
    epochs: int = Field(ge=1)
    lr: float = Field(0.1, gt=0, description="peak learning rate for the global batch size")
    lr_min: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    # The two optimizers' own fields: unset (None) takes the optimizer's default (OWN_DEFAULTS), and a
    # field of the other optimizer is refused when set at all, so none is ignored in silence.
    momentum: float | None = Field(None, ge=0, lt=1, description="sgd's (default 0.9)")
    nesterov: bool | None = Field(None, description="sgd's (default true)")
    betas: tuple[float, float] | None = Field(
        None, description="adamw's decay rates of its two moment estimates (default [0.9, 0.999])"
    )
    eps: float | None = Field(None, gt=0, description="adamw's (default 1e-8)")
    weight_decay: float = Field(5e-4, ge=0)
    decay_norm_and_bias: bool = Field(
        False,
        description="apply weight decay to norm, bias and transformer embedding parameters (class token, position "
        "embedding, relative position bias) too",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an exponential moving average of the weights (ema <- d * ema + (1 - d) * w after each "
        "optimizer step), evaluated every epoch like the main net on its own re-estimated BN statistics (val/ema/*)",
    )
    implementation: Literal["fused", "foreach", "for_loop"] = Field(
        "fused",
        description="torch's optimizer kernels: fused (one kernel updates every parameter), foreach (one op per "
        "step over all tensors) or for_loop (one op per tensor, the slowest); the same update in each",
    )

    @model_validator(mode="after")
    def _own_options(self) -> OptimizerSection:
        (other,) = set(OWN_DEFAULTS) - {self.name}
        stray = [f for f in OWN_DEFAULTS[other] if getattr(self, f) is not None]
        if stray:
            raise ValueError(
                f"optimizer.{stray[0]}={getattr(self, stray[0])!r} is set but optimizer.name={self.name} does not use "
                f"it ({' and '.join(OWN_DEFAULTS[other])} are {other}'s); remove it or choose optimizer.name={other}"
            )
        for name, default in OWN_DEFAULTS[self.name].items():
            if getattr(self, name) is None:
                self.__dict__[name] = default  # (not setattr: that would validate the section again)
        if self.name == "adamw" and not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas={list(self.betas)}: each must lie in [0, 1)")
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"optimizer.warmup_epochs={self.warmup_epochs:g} is longer than optimizer.epochs={self.epochs}: the "
                f"learning rate would never reach optimizer.lr; shorten the warm-up (0 for a short test run)"
            )
        if self.lr_min > self.lr:
            raise ValueError(
                f"optimizer.lr_min={self.lr_min:g} is above optimizer.lr={self.lr:g}: the schedule would rise, not "
                f"decay; set lr_min below lr"
            )
        return self


class DeepSpeedSection(Section):
    config: str = Field("cpu_fp32.json", description="a file in ds_configs/ or a path")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged over the JSON (dotted keys allowed)")


class ScalingSection(Section):
    num_workers: int | tuple[int, int] = Field(
        2,
        description="workers; [min, max] for an elastic group: it starts with as many as fit (at least min), "
        "continues on fewer when a node is lost and grows back when nodes return, from the last checkpoint",
    )
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    resize_check_s: float = Field(
        60.0, gt=0, description="elastic groups: how often a healthy group looks for room to grow"
    )

    @field_validator("num_workers")
    @classmethod
    def _positive_range(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError(
                f"{list(value) if isinstance(value, tuple) else value}: give N >= 1 or [min, max] with 1 <= min <= max"
            )
        return value

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    @property
    def worker_counts(self) -> range:
        """Every number of workers the run may train on."""
        return range(self.min_workers, self.max_workers + 1)

    def describe(self) -> str:
        return f"{self.min_workers}-{self.max_workers}" if self.elastic else str(self.num_workers)


class EvalSection(Section):
    subnets_every: int = Field(5, ge=0, description="all-sub-net evaluation every N epochs (0: only at the end)")
    max_subnets: int = Field(1000, ge=1, description="evaluate a fixed-seed sample when the space is larger")
    recalibrate: bool = True
    shared_stats: bool = Field(True, description="also report figures on the shared running statistics")
    destruction: bool = Field(False, description="run network destruction tests at the end")
    destruction_images: int | None = Field(
        None,
        ge=1,
        description="destruction tests on the first N validation images (default: all; each test evaluates a net)",
    )
    latency: bool = Field(
        False,
        description="at the end (and in st-scale eval), also time each evaluated sub-network on the evaluating "
        "device: one image (latency_ms) and a validation batch (images_per_s), for the latency Pareto front",
    )
    compare_calibration: bool = Field(
        False,
        description="at the end, also measure main net and sub-nets with BN "
        "re-estimated under the other data.calibration_protocol",
    )


class TrackingSection(Section):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else ./mlflow.db (SQLite)")
    experiment: str = Field("st-scale", description=f"MLflow experiment name (created if missing): {NAME_RULE}")
    run_name: str | None = Field(None, description=f"the MLflow run's name (default run.name): {NAME_RULE}")
    log_every_steps: int = Field(10, ge=1)
    system_metrics: bool = True
    log_model: bool = Field(
        True,
        description="at the end, log the main network as an MLflow model too (torch.export with an input example "
        "and signature: seconds of CPU); its weights are logged either way. A sweep of many trials can turn it off",
    )

    @field_validator("experiment", "run_name", mode="before")
    @classmethod
    def _names(cls, value, info):
        return None if value is None else checked_name(f"tracking.{info.field_name}", value)


class RunSection(Section):
    name: str = Field(
        description=f"the Ray Train run name, its folder under storage_path; running the same name again resumes "
        f"it: {NAME_RULE}"
    )
    storage_path: str = Field(
        "~/st_scale_runs",
        description="checkpoints and results: a folder (shared by every node on a cluster) or an object store, "
        "s3://bucket/prefix",
    )
    storage_endpoint: str | None = Field(
        None,
        description="an S3-compatible store's URL (http(s)://host:port: MinIO, Ceph, R2) for an s3:// storage_path; "
        "default $AWS_ENDPOINT_URL, else AWS S3",
    )
    storage_retry_s: float = Field(
        300,
        ge=0,
        description="how long a checkpoint write or read waits for an object store that does not answer (a store "
        "restarting, a network blip) before the worker fails and run.max_failures applies",
    )
    seed: int = Field(0, ge=0)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1: unlimited)")
    checkpoints_to_keep: int = Field(2, ge=1)
    stop_after_epochs: int | None = Field(
        None, ge=1, description="end the job after N epochs (resumable), e.g. for smoke runs"
    )

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value):
        return checked_name("run.name", value)

    @model_validator(mode="after")
    def _storage(self) -> RunSection:

        check_storage_fields(self.storage_path, self.storage_endpoint)
        return self


class Config(Section):
    model: ModelSection
    data: DataSection
    method: MethodOptions = Field(default_factory=lambda: METHODS["st"].options())
    sampling: SamplingSection = SamplingSection()
    optimizer: OptimizerSection
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    eval: EvalSection = EvalSection()
    tracking: TrackingSection = TrackingSection()
    run: RunSection

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        misfits = [n for n in self.scaling.worker_counts if self.data.batch_size % n]
        if misfits:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is not divisible by scaling.num_workers="
                f"{self.scaling.describe()}"
                + (f" ({', '.join(map(str, misfits))} workers)" if self.scaling.elastic else "")
                + "; the global batch is kept whatever the number of workers (a resumed or elastic run included): "
                "choose worker counts that divide it, or a global batch size that is a multiple of each"
            )
        if self.optimizer.ema_decay and not self.eval.recalibrate:
            raise ValueError(
                f"optimizer.ema_decay={self.optimizer.ema_decay} needs eval.recalibrate=true: the averaged weights "
                f"have no BN statistics of their own until they are re-estimated for them"
            )
        self._check_fixed_image_size()
        if _same_file(self.data.train, self.data.val):
            raise ValueError(
                f"data.val={self.data.val!r} is the training file (data.train={self.data.train!r}): a validation "
                f"figure on the images the network trained on says nothing; give the held-out split"
            )
        ramp = self.data.progressive_resizing
        if ramp is not None and ramp.end_epoch > self.optimizer.epochs:
            raise ValueError(
                f"data.progressive_resizing.end_epoch={ramp.end_epoch} is after the last epoch (optimizer.epochs="
                f"{self.optimizer.epochs}): training would never reach data.image_size; end the ramp by then"
            )
        return self

    def _check_fixed_image_size(self) -> None:
        """A ViT's position embedding has one entry per patch: it takes the one size it was built for."""
        size = FIXED_IMAGE_SIZES.get(self.model.name)
        if size is None:
            return
        for field, value in (("image_size", self.data.image_size), ("val_image_size", self.data.val_image_size)):
            if value not in (None, size):
                raise ValueError(
                    f"data.{field}={value}: {self.model.name} takes {size} px images only (its position embedding "
                    f"has one entry per patch); set data.{field} to {size} or choose a Swin, which takes any size"
                )
        if self.data.progressive_resizing is not None:
            raise ValueError(
                f"data.progressive_resizing is set: {self.model.name} takes {size} px images only; remove it"
            )

    def flat(self) -> dict[str, Any]:
        """The resolved config as dotted keys (MLflow params)."""
        return flatten(self.model_dump(mode="json"))


def _same_file(a: str, b: str) -> bool:
    """Whether two data paths name one file (after ~, links and relative parts)."""
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


# ------------------------------------------------------------------------------------ loading
def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def recipe_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("st_scale.recipes").iterdir() if p.name.endswith(".yaml")
    )


def _recipe_text(recipe: str) -> tuple[str, str]:
    path = Path(recipe).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in recipe:
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe!r} does not exist")
        return path.read_text(), str(path.resolve())
    packaged = resources.files("st_scale.recipes") / f"{recipe}.yaml"
    if not packaged.is_file():
        raise ConfigError(
            f"unknown recipe {recipe!r}; packaged recipes: {', '.join(recipe_names())} (or give a .yaml path)"
        )
    return packaged.read_text(), f"st_scale/recipes/{recipe}.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (plain YAML keeps the last one,
    silently)."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice (first at line {first[key] + 1}); keep one",
                    key_node.start_mark,
                )  # fmt: skip
            if isinstance(key, str | int | float | bool):
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, origin: str):
    """YAML from a recipe, a sweep spec or a --set value; a syntax error or a key given twice names
    where, and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{origin}, line {mark.line + 1} column {mark.column + 1}" if mark else origin
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and start:
            problem += f"; {context} at line {start.line + 1}"
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax there") from None


def load_recipe_tree(recipe: str, _seen: tuple[str, ...] = ()) -> dict:
    """The recipe as a nested dict; a `base:` key names a recipe it extends."""
    text, origin = _recipe_text(recipe)
    if origin in _seen:
        raise ConfigError(f"recipe {recipe!r} extends itself through 'base'")
    tree = parse_yaml(text, f"recipe {origin}") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {origin} must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"recipe {origin}: base={base!r} must name one recipe: a packaged recipe's name or a .yaml path"
        )
    return deep_merge(load_recipe_tree(_beside(base, origin), _seen + (origin,)), tree)


def _beside(base: str, origin: str) -> str:
    """A relative .yaml path in `base:` is looked up beside the recipe that names it, not in the
    current folder; a packaged recipe's name stays a name."""
    path = Path(base).expanduser()
    if path.is_absolute() or not (path.suffix in (".yaml", ".yml") or os.sep in base) or not Path(origin).is_file():
        return base
    return str(Path(origin).parent / path)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(tree: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
    key, raw = assignment.split("=", 1)
    value = parse_yaml(raw, f"--set {assignment!r}") if raw.strip() else ""
    assign(tree, key.strip(), value, what=f"override {assignment!r}")


def assign(tree: dict, key: str, value: Any, *, what: str | None = None) -> None:
    """Set a dotted field of a recipe tree. Setting `method.name` to another method switches
    methods: the section keeps only the options the new method has (each method owns its options)."""
    method = tree.get("method")
    if (
        key == "method.name"
        and isinstance(method, dict)
        and isinstance(value, str)
        and value in METHODS
        and method.get("name", "st") != value
    ):
        fields = METHODS[value].options.model_fields
        tree["method"] = {k: v for k, v in method.items() if k in fields}
    set_dotted(tree, key, value, what=what)


def set_dotted(tree: dict, key: str, value: Any, *, what: str | None = None) -> None:
    """tree[a][b][c] = value for key 'a.b.c', creating sections on the way."""
    what = what or repr(key)
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{what}: empty key part")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def explain_validation_error(error: ValidationError, title: str = "invalid configuration") -> str:
    """One line per problem, each naming the dotted field."""
    lines = []
    for e in error.errors():
        loc = list(e["loc"])
        method = loc[1] if len(loc) > 2 and loc[0] == "method" and loc[1] in METHODS else None
        if method:  # pydantic names the union member: method.ct.kl_weight -> method.kl_weight
            del loc[1]
        field = ".".join(str(p) for p in loc) or "(top level)"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and method:
            message = (
                f"unknown key for method {method!r} (its options: {', '.join(METHODS[method].options.model_fields)})"
            )
            owners = [m for m, spec in METHODS.items() if loc[-1] in spec.options.model_fields]
            if owners:
                message += f"; {loc[-1]!r} is an option of method {' / '.join(owners)}"
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found") and loc == ["method"]:
            field = "method.name"
            message = f"unknown method {e.get('ctx', {}).get('tag')!r}; choose one of: {', '.join(METHODS)}"
        elif e["type"] == "extra_forbidden":
            message = "unknown key; check its spelling (`st-scale train RECIPE --print-config` shows every field)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f" (got {value!r})"
        lines.append(f"  {field}: {message}{shown}")
    return f"{title}:\n" + "\n".join(lines)


def build_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(explain_validation_error(error)) from None


def load_config(recipe: str, overrides: list[str] = ()) -> Config:
    tree = load_recipe_tree(recipe)
    for assignment in overrides:
        apply_override(tree, assignment)
    return build_config(tree)
