"""The worker's loop against independent references, in one process: the figures a run reports are
assembled here (the step order, the global step a resumed run continues from, the weights' average,
the evaluation's reductions), so each is checked against a hand-written computation.

- The worker function of a run of two epochs, stopped after the first and resumed from its
  checkpoint, against a hand-written ST loop. Ray Train's session (the world, the checkpoint to resume
  from, `report`) is given by the test in this process, so this runs in seconds; the slow tests run
  the same function under Ray Train. The hand-written loop has its own cosine
  schedule, SGD with Nesterov momentum and weight decay on the weights only, CE plus KL to a
  sub-network drawn for its own global step, augmentation drawn for its own global step, the average
  updated after each optimizer step.
- Every rank builds the same BN calibration batches.
- The main net's accuracy measured by each of two ranks on shards of different sizes is the accuracy
  over every image, counted (not the mean of the ranks' percentages).
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from digits_data import digits_overrides
from processes import free_port

from st_scale.assembly import build_model_and_objective
from st_scale.config import load_config
from st_scale.data.loaders import BatchPreparer, memory_format
from st_scale.models import batchnorm_layers

pytestmark = pytest.mark.usefixtures("gloo_process_group")

BATCH, EPOCHS, LR, WEIGHT_DECAY, MOMENTUM, EMA_DECAY = 256, 2, 0.1, 5e-4, 0.9, 0.9
# One step of the worker against the hand-written one from the same weights: the gradients differ in
# the last bits (the shared prefix sums them in another order), the weights by at most 2.2e-6 (measured);
# a wrong rate, sub-network, augmentation or average moves them by 1e-3 or more.
TOLERANCE = 1e-4


def _config(digits_dir, root: Path, *extra: str):
    return load_config(
        "demo_st",
        [
            *digits_overrides(digits_dir),
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=1",
            f"data.batch_size={BATCH}",
            "data.calibration_images=256",
            f"optimizer.epochs={EPOCHS}",
            f"optimizer.ema_decay={EMA_DECAY}",
            "eval.max_subnets=1",
            "eval.shared_stats=false",
            "eval.compare_calibration=false",
            f"run.storage_path={root / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            "tracking.system_metrics=false",
            "tracking.log_every_steps=2",  # an epoch of 5 steps read back in three windows
            *extra,
        ],
    )


class RecordedLoader:
    """The training loader, keeping each batch it hands out (uint8 images and labels, as loaded) and
    the network's weights as each batch is asked for, and after the last: the weights before and after
    every step."""

    def __init__(self, loader, model):
        self.loader, self.model, self.batches, self.weights = loader, model, [], []

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> int:
        return self.loader.set_epoch(epoch)

    def __iter__(self):
        for images, labels in self.loader:
            self.weights.append(_learned(self.model))
            self.batches.append((images.clone(), labels.clone()))
            yield images, labels
        self.weights.append(_learned(self.model))


class HandWrittenST:
    """The reference: ST's loss and SGD's update written out, step by step from the weights the worker
    held before each step (this ResNet's gradients on 16 px digits are too sensitive to the last bits
    of the weights for two runs to stay within a tolerance over many steps: a change of 1e-7 in the
    first convolution's weights changes a gradient by 5e-4). Its own global step, schedule, sampler,
    augmentation, momentum and weights' average."""

    def __init__(self, model, cfg, steps_per_epoch: int, untrained: dict):
        self.model, self.total = model.train(), EPOCHS * steps_per_epoch
        self.preparer = BatchPreparer(
            cfg.data, torch.device("cpu"), torch.float32, cfg.run.seed, 0, memory_format=memory_format(cfg.model)
        )
        _, _, objective = build_model_and_objective(cfg)  # a sampler of its own, seeded as the run's
        self.sampler = objective.sampler
        self.momentum = {name: None for name, _ in model.named_parameters()}
        self.average = dict(untrained)
        self.step = 0

    def check_epoch(self, recorded: RecordedLoader) -> list[float]:
        """Each recorded step against the hand-written one; the losses of the epoch's steps."""
        losses = []
        for (images, labels), before, after in zip(recorded.batches, recorded.weights, recorded.weights[1:]):
            predicted, loss = self._step(before, images, labels)
            _assert_close(after, predicted, f"weights after global step {self.step}")
            for name, w in after.items():
                self.average[name] = EMA_DECAY * self.average[name] + (1 - EMA_DECAY) * w
            losses.append(loss)
            self.step += 1
        return losses

    def _step(self, weights: dict, images, labels) -> tuple[dict, float]:
        lr = 0.5 * LR * (1 + math.cos(math.pi * self.step / self.total))
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(weights[name])
        x, y = self.preparer.train(images, self.step), labels.long()
        depths = self.sampler.sample(self.step, 0, rank=0)
        main = self.model.run(x, self.model.plan_for_depths(None))
        sub = self.model.run(x, self.model.plan_for_depths(depths))
        teacher = F.softmax(main.detach(), dim=-1)
        kl = (teacher * (teacher.log() - F.log_softmax(sub, dim=-1))).sum(-1).mean()
        loss = F.cross_entropy(main, y) + kl
        self.model.zero_grad()
        loss.backward()
        predicted = {}
        for name, p in self.model.named_parameters():
            g = p.grad + (WEIGHT_DECAY * weights[name] if p.ndim > 1 else 0)  # no decay on BN and biases
            buf = self.momentum[name]
            self.momentum[name] = buf = g.clone() if buf is None else MOMENTUM * buf + g
            predicted[name] = weights[name] - lr * (g + MOMENTUM * buf)  # Nesterov
        return predicted, float(loss.detach())


def _learned(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The network's parameters as a checkpoint holds them (the trained module is model + objective)."""
    from st_scale import checkpoint

    state = checkpoint.module_state(folder)
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def _assert_close(ours: dict, theirs: dict, what: str) -> None:
    ours = {k: v for k, v in ours.items() if k in theirs}  # the parameters; BN's running statistics aside
    assert ours.keys() == theirs.keys()
    worst = max((ours[k].float() - theirs[k]).abs().max().item() for k in ours)
    assert worst < TOLERANCE, f"{what}: largest difference {worst:.2e}"


def _hand_accuracy(model, weights: dict, calibration, val) -> float:
    """Top-1 of `model` holding `weights`, its BN statistics re-estimated on `calibration` by hand
    (a cumulative average over the batches), counted over every validation image."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(weights[name])
        for bn in batchnorm_layers(net):
            bn.reset_running_stats()
            bn.momentum = None
        net.train()
        plan = net.plan_for_depths(None)
        for x, _ in calibration:
            net.run(x, plan)
        net.eval()
        correct = total = 0
        for x, y in val:
            correct += int((net.run(x, plan).argmax(-1) == y).sum())
            total += len(y)
    return 100 * correct / total


class WorkerSession:
    """What Ray Train gives the worker function, in this process: a world of one, the checkpoint to
    resume from, and `report`, which keeps each reported checkpoint folder as Ray Train would upload
    it. The contexts the worker builds are kept too, their training loaders recording each batch."""

    def __init__(self, tmp_path: Path, monkeypatch):
        import ray.train

        from st_scale.train import loop

        self.folder, self.reports, self.contexts, self.resume_from = tmp_path, [], [], None
        # MLflow puts a SQLite store's artifacts under ./mlruns of the process that creates the
        # experiment: here, the test's own folder rather than the checkout.
        monkeypatch.chdir(tmp_path)
        build = loop.build_worker_context

        def build_and_keep(*args, **kwargs):
            ctx, resumed = build(*args, **kwargs)
            ctx.data.train = RecordedLoader(ctx.data.train, ctx.model)
            self.contexts.append(ctx)
            return ctx, resumed

        class World:
            def get_world_rank(self):
                return 0

            def get_world_size(self):
                return 1

            def get_local_rank(self):
                return 0

        monkeypatch.setattr(loop, "build_worker_context", build_and_keep)
        monkeypatch.setattr(ray.train, "get_context", World)
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: self.resume_from)
        monkeypatch.setattr(ray.train, "report", self.report)

    def report(self, metrics, checkpoint=None, checkpoint_upload_fn=None):
        kept = self.folder / f"reported_{len(self.reports)}"
        shutil.copytree(checkpoint.path, kept)
        self.reports.append((metrics, kept))

    def resume_from_last_report(self) -> None:
        import ray.train

        self.resume_from = ray.train.Checkpoint.from_directory(str(self.reports[-1][1]))


def test_a_stopped_and_resumed_worker_trains_as_a_hand_written_loop(digits_dir, tmp_path, monkeypatch):
    import mlflow

    from st_scale import checkpoint
    from st_scale.train import loop
    from st_scale.train.driver import resolve_inputs, run_folder, run_summary
    from st_scale.train.loop import train_worker

    session = WorkerSession(tmp_path, monkeypatch)
    cfg = _config(digits_dir, tmp_path)
    train_worker(resolve_inputs(_config(digits_dir, tmp_path, "run.stop_after_epochs=1")).to_loop_config())
    (first,) = session.contexts
    untrained = first.data.train.weights[0]
    reference = HandWrittenST(copy.deepcopy(first.model), cfg, len(first.data.train), untrained)
    losses = reference.check_epoch(first.data.train)
    ((metrics, folder),) = session.reports
    _assert_close(_saved_weights(folder), first.data.train.weights[-1], "the checkpoint's weights after epoch 1")
    _assert_close(checkpoint.read_ema(folder), reference.average, "weights' average after epoch 1")
    assert metrics["epoch"] == 1 and metrics["step"] == reference.step == len(first.data.train)
    assert metrics["train/epoch_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    val = list(first.data.preparer.eval_batches(first.data.val_full))
    for key, weights in (("val/main_top1", _learned(first.model)), ("val/ema/main_top1", first.ema.weights())):
        assert metrics[key] == pytest.approx(_hand_accuracy(first.model, weights, first.data.calibration, val)), key

    # Every rank re-estimates BN statistics on the same images: rank 1 of 2 builds the same batches.
    other = loop._setup_data(first.cfg, first.inputs, first.engine, 1, 2, first.device)
    assert len(other.calibration) == len(first.data.calibration)
    for (x1, y1), (x0, y0) in zip(other.calibration, first.data.calibration):
        assert torch.equal(x1, x0) and torch.equal(y1, y0), "rank 1 calibrates on other images than rank 0"

    session.resume_from_last_report()
    train_worker(resolve_inputs(cfg).to_loop_config())
    second = session.contexts[1]
    assert second.run_id == first.run_id, "a resumed run continues the same MLflow run"
    _assert_close(second.data.train.weights[0], first.data.train.weights[-1], "the weights resumed from")
    losses += reference.check_epoch(second.data.train)
    metrics, folder = session.reports[-1]
    _assert_close(_saved_weights(folder), second.data.train.weights[-1], "the checkpoint's weights after epoch 2")
    _assert_close(checkpoint.read_ema(folder), reference.average, "weights' average after the resumed epoch 2")
    assert metrics["epoch"] == 2 and metrics["step"] == reference.step == EPOCHS * len(second.data.train)
    assert metrics["val/main_top1"] == pytest.approx(
        _hand_accuracy(second.model, _learned(second.model), second.data.calibration, val)
    )

    # The training loss logged every 2nd step: the mean of the hand-written losses of the steps since the
    # last value logged in that epoch (each epoch starts a window of its own), at the step reached.
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    logged = {m.step: m.value for m in client.get_metric_history(second.run_id, "train/loss")}
    per_epoch = len(first.data.train)
    expected, start = {}, 0
    for end in range(1, EPOCHS * per_epoch + 1):
        if (end - 1) % per_epoch == 0:  # the epoch's first step
            start = end - 1
        if end % 2 == 0:
            expected[end], start = sum(losses[start:end]) / (end - start), end
    assert logged.keys() == expected.keys()
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-4), f"train/loss at step {step}"

    # The summary `st-scale train` prints and writes (--summary-json) is what MLflow logged last.
    inputs = resolve_inputs(cfg)
    summary = run_summary(cfg, inputs, metrics, 12.34, folder.name)
    run = client.get_run(second.run_id)
    assert run.data.tags["st_scale.final_model_uri"].startswith("models:/"), "tracking.log_model is on by default"
    assert summary.mlflow_run_id == second.run_id and summary.mlflow_experiment_id == run.info.experiment_id
    for field in ("main_top1", "subnets_mean_top1", "subnets_std_top1", "subnets_min_top1", "num_subnets"):
        assert getattr(summary, field) == run.data.metrics[f"val/{field}"], field
    assert (summary.method, summary.model, summary.epochs, summary.wall_s) == ("st", cfg.model.name, EPOCHS, 12.3)
    assert summary.dataset == inputs.dataset and summary.checkpoint == (run_folder(cfg) / folder.name).uri


def _accuracy_on_ranks(rank: int, world: int, port: int, shards: list, weights: dict, folder: Path) -> None:
    import os

    from st_scale.evaluate.passes import main_metrics, subnet_reports
    from st_scale.models import create_model

    os.environ |= {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.distributed.init_process_group("gloo")
    try:
        model = create_model("cifar_resnet20", 10)
        model.net.load_state_dict(weights)
        model.eval()
        x, y = shards[rank]
        metrics = main_metrics(model, lambda: [(x, y)], None, torch.device("cpu"), prefix="val", shared_stats=False)
        (folder / f"rank{rank}.txt").write_text(repr(metrics["val/main_top1"]))
        subnets = [(1, 1, 1), (2, 2, 2), (3, 3, 3)]  # split over the ranks, gathered on each
        (report,) = subnet_reports(model, subnets, lambda: [(x, y)], None, shared_stats=False).values()
        (folder / f"rank{rank}_subnets.txt").write_text(repr([row.depths for row in report.rows]))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_count_the_main_net_over_every_image_and_split_the_sub_networks(tmp_path):
    """Rank 0 holds 2 images, both right (100%); rank 1 holds 8, 2 of them right (25%): 4 of 10 are
    right, 40% (the mean of the ranks' percentages would say 62.5%). The sub-networks are split over
    the two ranks and gathered, each once."""
    from st_scale.evaluate.distributed import rank_and_world
    from st_scale.models import create_model

    # This process is a group of one (the module's gloo fixture). The call also ties this test to
    # rank_and_world for `make mutate`, which records the functions a test calls in its own process
    # only: its mutants show only on the spawned ranks below.
    assert rank_and_world() == (0, 1)
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10).eval()
    x = torch.randn(10, 3, 16, 16)
    with torch.no_grad():
        predicted = model.run(x, model.plan_for_depths(None)).argmax(-1)
    y = predicted.clone()
    y[4:] = (predicted[4:] + 1) % 10  # images 0-3 right, 4-9 wrong
    shards = [(x[:2], y[:2]), (x[2:], y[2:])]
    torch.multiprocessing.spawn(
        _accuracy_on_ranks, args=(2, free_port(), shards, model.net.state_dict(), tmp_path), nprocs=2
    )
    assert [float((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)] == [pytest.approx(40.0)] * 2
    # each rank evaluated one share of the sub-networks: every rank holds each of the three once
    assert [(tmp_path / f"rank{r}_subnets.txt").read_text() for r in (0, 1)] == [
        "[(1, 1, 1), (2, 2, 2), (3, 3, 3)]"
    ] * 2
