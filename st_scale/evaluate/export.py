"""`st-scale export`: one sub-network of a trained checkpoint as a model of its own.

The sub-network `d` (stage s keeps its first d_s blocks) becomes the plain network of that
architecture (a torchvision ResNet whose `layerN` holds d_N blocks; a DenseNet whose dense blocks hold
d_N layers, its transitions reading the channels they produce; a ViT or Swin of those blocks), its
weights those blocks' (a DenseNet transition's, the leading input slices)
and (under the run's `eval.recalibrate`, the default) its BatchNorm statistics re-estimated for it on
the run's calibration set, exactly as the all-sub-network evaluation measures it. Before anything is written
it is checked on the whole validation set: its logits must equal the elastic model's for that
sub-network, so its accuracy is the evaluated one. Written as a state dict (for the same
architecture), as a `torch.export` program (.pt2) and as TorchScript (both run with torch alone),
optionally as ONNX (run back through onnxruntime on the validation set, logits within
ONNX_TOLERANCE), and logged to the training run in MLflow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models import ElasticNet, create_model
from ..provenance import provenance, write_raw
from .passes import EvalData, EvalOptions, evaluate
from .subnets import Batch, _Counts, evaluate_plan, preserved_bn, recalibrate_bn
from .trained import open_checkpoint

FORMATS = ("state_dict", "pt2", "torchscript", "onnx")
DEFAULT_FORMATS = ("state_dict", "pt2", "torchscript")
ONNX_TOLERANCE = 1e-4  # onnxruntime's logits against torch's: relative and absolute


@dataclass
class ExportedSubnet:
    depths: tuple[int, ...]
    name: str  # e.g. cifar_resnet20[1-2-1]
    top1: float  # percent, on the whole validation set: the elastic model's and the exported network's
    files: dict[str, str] = field(default_factory=dict)  # format -> path
    mlflow_model_uri: str | None = None
    onnx_top1: float | None = None  # the ONNX file run by onnxruntime on the same validation set
    onnx_max_abs_diff: float | None = None  # its largest logit difference from torch's


_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}  # a count's suffix, either case


def parse_count(text: str, option: str) -> int:
    """A budget such as 2.0G, 150M (or 150m) or 3e8."""
    suffix = text[-1:].lower()
    number, suffix = (text[:-1], suffix) if suffix in _SCALE else (text, "")
    try:
        value = float(number) * _SCALE[suffix]
    except ValueError:
        value = -1
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{option} {text!r}: give a positive, finite count such as 2.0G, 150M or 3e8")
    return int(value)


def parse_depths(text: str) -> tuple[int, ...]:
    """--subnet 1,2,1: blocks kept per stage."""
    try:
        depths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--subnet {text!r}: give the blocks kept per stage, e.g. --subnet 1,2,1") from None
    return depths


def standalone_subnet(model: ElasticNet, num_classes: int, depths, calibration: list[Batch] | None) -> nn.Module:
    """The plain network of sub-network `depths` with the trained weights of its blocks and, given
    `calibration`, BN statistics re-estimated for it; in eval mode. The elastic model is left as it was."""
    try:
        depths = model.check_depths(depths)
        shell = create_model(model.registry_name, num_classes, stage_depths=depths)
    except ValueError as error:
        raise ConfigError(f"--subnet: {error}") from None
    with preserved_bn(model):
        if calibration is not None:
            recalibrate_bn(model, model.plan_for_depths(depths), calibration)
        _copy_kept_blocks(model, shell)
    return shell.net.eval()


def _copy_kept_blocks(model: ElasticNet, shell: ElasticNet) -> None:
    """The trained weights into `shell`, the plain network of one sub-network, block by block: its
    stage s holds the first d_s blocks of the model's, its fixed segments the model's (a sliced one
    holding the leading slices of each tensor). Every tensor of the shell is filled."""
    filled = 0
    for segment, own in zip(model.segments, shell.segments, strict=True):
        for block, shell_block in zip(segment.blocks, own.blocks):  # the shorter: the kept blocks
            trained = block.state_dict()
            sliced = {
                k: trained[k][tuple(slice(0, n) for n in v.shape)].clone() for k, v in shell_block.state_dict().items()
            }
            shell_block.load_state_dict(sliced)
            filled += len(sliced)
    expected = len(shell.net.state_dict())
    if filled != expected:  # a tensor outside every block (or in two) would keep its random initialisation
        raise RuntimeError(f"{shell.name}: {filled} tensors copied block by block, the network has {expected}")


@torch.no_grad()
def check_same_outputs(model: ElasticNet, depths, standalone: nn.Module, val: list[Batch], calibration) -> float:
    """Top-1 (%) of the standalone network on `val`, after checking its logits equal the elastic
    model's for that sub-network (on its re-estimated statistics) batch by batch."""

    def same(images: torch.Tensor, elastic: torch.Tensor) -> None:
        ours = standalone(images)
        if not torch.equal(ours, elastic):
            raise RuntimeError(
                f"the exported network's logits differ from the trained sub-network's by up to "
                f"{float((ours - elastic).abs().max()):.3g}; nothing was written"
            )

    return evaluate_plan(model, model.plan_for_depths(depths), val, calibration, on_logits=same).top1


def write_formats(standalone: nn.Module, example: torch.Tensor, formats, out: Path, stem: str) -> dict[str, str]:
    """The network in each format under `out`; TorchScript is loaded back and checked against it."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    # traced on two images (a batch of one would be specialised to that size), any batch size after
    pair, any_batch = torch.cat([example] * 2), ({0: torch.export.Dim("batch", min=1)},)
    if "state_dict" in formats:
        path = out / f"{stem}.state_dict.pt"
        torch.save(standalone.state_dict(), path)
        files["state_dict"] = str(path)
    if "pt2" in formats:  # torch.export: any batch size
        path = out / f"{stem}.pt2"
        program = torch.export.export(standalone, (pair,), dynamic_shapes=any_batch)
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()
        with torch.no_grad():
            if not all(torch.equal(loaded(x), standalone(x)) for x in (example, torch.cat([example] * 3))):
                raise RuntimeError(f"{path}: the exported program does not reproduce the network's logits")
        files["pt2"] = str(path)
    if "onnx" in formats:
        path = out / f"{stem}.onnx"
        torch.onnx.export(standalone, (pair,), str(path), dynamic_shapes=any_batch, dynamo=True, verbose=False)
        files["onnx"] = str(path)
    if "torchscript" in formats:  # deprecated by torch in favour of pt2; still what many servers load
        path = out / f"{stem}.torchscript.pt"
        with torch.no_grad():
            traced = torch.jit.trace(standalone, example, check_trace=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            if not torch.equal(loaded(example), standalone(example)):
                raise RuntimeError(f"{path}: the TorchScript module does not reproduce the network's logits")
        files["torchscript"] = str(path)
    return files


def pick_subnet(
    trained, calibration, max_macs: int | None, max_params: int | None, max_latency_ms: float | None
) -> tuple[int, ...]:
    """The most accurate of the run's evaluated sub-networks (its `eval.max_subnets`, seeded as
    `st-scale eval` samples them) within the budgets, on the BN statistics `calibration` gives them;
    a latency budget times them here first."""

    cfg = trained.cfg
    timed = max_latency_ms is not None
    measured = evaluate(
        trained.model,
        EvalData(lambda: trained.val, lambda: trained.val, calibration, torch.device("cpu")),
        EvalOptions(
            prefix="export",
            shared_stats=False,
            subnets=trained.space.sample_subset(cfg.eval.max_subnets, seed=cfg.run.seed),
            latency=timed,
        ),
    )
    report = measured.reports[""]
    best = report.best_within(max_macs, max_params, max_latency_ms)
    if best is None:
        cheapest = min(report.rows, key=lambda r: (r.macs, r.params))
        timing = f", {min(r.latency_ms for r in report.rows):.3g} ms at the fastest" if timed else ""
        raise ConfigError(
            f"--budget-*: no evaluated sub-network fits (the cheapest, {'-'.join(map(str, cheapest.depths))}, has "
            f"{cheapest.macs:,} MACs and {cheapest.params:,} parameters{timing}); give a larger budget"
        )
    front = report.pareto_front("latency_ms" if timed else "macs")
    print(
        f"within the budget: {'-'.join(map(str, best.depths))}, top-1 {best.top1:.2f}, {best.macs / 1e6:.2f} MMACs, "
        f"{best.params / 1e6:.3f} M parameters"
        + (f", {best.latency_ms:.3g} ms" if timed else "")
        + f" (Pareto front of {len(report.rows)} sub-networks: {len(front)} points)"
    )
    return best.depths


def check_onnx(path: str, standalone: nn.Module, val: list[Batch]) -> tuple[float, float]:
    """Run the ONNX file with onnxruntime on `val`: its logits must agree with torch's within
    ONNX_TOLERANCE; returns its top-1 (%) and the largest logit difference."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    counts, worst = _Counts(), 0.0
    for images, labels in val:
        logits = session.run(None, {name: images.cpu().numpy()})[0]
        with torch.no_grad():
            expected = standalone(images).cpu().numpy()
        difference = float(np.abs(logits - expected).max())
        if not np.allclose(logits, expected, rtol=ONNX_TOLERANCE, atol=ONNX_TOLERANCE):
            raise RuntimeError(
                f"{path}: onnxruntime's logits differ from torch's by up to {difference:.3g} "
                f"(tolerance {ONNX_TOLERANCE})"
            )
        worst = max(worst, difference)
        counts.add(torch.from_numpy(logits), labels.cpu())
    return counts.result().top1, worst


def export_checkpoint(
    directory: str | Path,
    depths_text: str | None,
    *,
    max_macs: int | None = None,
    max_params: int | None = None,
    max_latency_ms: float | None = None,
    formats=DEFAULT_FORMATS,
    out: str | Path = "exported",
    storage_endpoint: str | None = None,
    register: str | None = None,
) -> ExportedSubnet:

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"--format {','.join(unknown)}: choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--format onnx needs onnx, onnxscript and onnxruntime: pip install 'st-scale[onnx]'"
            ) from None
    budgets = (max_macs, max_params, max_latency_ms)
    if (depths_text is None) == all(b is None for b in budgets):
        raise ConfigError(
            "give either --subnet D1,D2,... or a budget (--budget-macs, --budget-params, --budget-latency-ms) to pick "
            "it, not both"
        )
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise ConfigError(f"--budget-latency-ms {max_latency_ms}: give a positive number of milliseconds")
    depths = parse_depths(depths_text) if depths_text is not None else None
    started = provenance()  # the summary says which command, code and machine exported the sub-network
    trained = open_checkpoint(directory, storage_endpoint=storage_endpoint, recalibrate=True, command="export")
    cfg = trained.cfg
    calibration = trained.calibration if cfg.eval.recalibrate else None  # as the run evaluated its sub-networks
    if depths is None:
        depths = pick_subnet(trained, calibration, max_macs, max_params, max_latency_ms)
    standalone = standalone_subnet(trained.model, cfg.model.num_classes, depths, calibration)
    top1 = check_same_outputs(trained.model, depths, standalone, trained.val, calibration)
    name = f"{cfg.model.name}[{'-'.join(map(str, depths))}]"
    stem = f"{cfg.run.name}_{cfg.model.name}_{'-'.join(map(str, depths))}"
    example = trained.val[0][0][:1]
    files = write_formats(standalone, example, formats, Path(out).expanduser(), stem)
    result = ExportedSubnet(tuple(depths), name, top1, files)
    if "onnx" in files:
        result.onnx_top1, result.onnx_max_abs_diff = check_onnx(files["onnx"], standalone, trained.val)
    result.mlflow_model_uri = _log_model(trained, standalone, example, result, register)
    write_raw(Path(out, f"{stem}.json"), started, asdict(result))
    print(
        f"{name} from {trained.location} (epoch {trained.info.state.epoch}): top-1 {top1:.2f} on {len(trained.val)} "
        f"validation batches, equal to the trained sub-network's; written to {Path(out).expanduser()}; "
        f"logged to MLflow as {result.mlflow_model_uri}"
    )
    return result


def _log_model(trained, standalone: nn.Module, example: torch.Tensor, result: ExportedSubnet, register) -> str:
    """The network under the training run (and in the model registry as `register`)."""
    tracker = trained.tracker()
    artifact_name = f"subnet-{'-'.join(map(str, result.depths))}"
    uri = tracker.log_network(standalone, example, artifact_name, register)
    tracker.log_metrics({f"export/{artifact_name}/top1": result.top1}, step=trained.info.state.step)
    tracker.finish("FINISHED")
    return uri
