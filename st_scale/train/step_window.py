"""Per-step training figures kept on the device between logging steps.

Reading a value back to the host (`float(loss)`) waits for every kernel queued before it: done each
step, it stops the CPU from queueing the next step while the GPU works. A `StepWindow` keeps the
steps' losses as device tensors and reads them back once per window (a logging step, the end of an
epoch), where it also checks that every step's loss was finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class WindowMeans:
    steps: int
    loss_sum: float
    means: dict[str, float]  # loss and each part, averaged over the window's steps


@dataclass
class StepWindow:
    first_step: int = 0  # the global step of the window's first entry
    losses: list[torch.Tensor] = field(default_factory=list)
    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.losses)

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.losses.append(loss.detach().float().reshape(()))
        for key, value in parts.items():
            self.parts.setdefault(key, []).append(torch.as_tensor(value).detach().float().reshape(()))

    def read(self, epoch: int) -> WindowMeans:
        """The window's means (one host sync), and a fresh window starting after it. Raises
        NonFiniteLossError naming the first step whose loss was not finite."""
        if not self.losses:
            return WindowMeans(0, 0.0, {})
        losses = torch.stack(self.losses).cpu()
        parts = {key: torch.stack(values).cpu() for key, values in self.parts.items()}
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            index = int(bad[0])
            shown = ", ".join(f"{key}={float(values[index]):.4g}" for key, values in parts.items())
            raise NonFiniteLossError(
                f"loss became {float(losses[index])} at global step {self.first_step + index} (epoch {epoch + 1}; "
                f"{shown}); training stopped, the last good checkpoint is kept. Lower optimizer.lr or "
                f"method.kl_weight and resume with the same run.name"
            )
        steps = len(losses)
        means = {"loss": float(losses.mean())} | {key: float(values.mean()) for key, values in parts.items()}
        self.first_step += steps
        self.losses, self.parts = [], {}
        return WindowMeans(steps, float(losses.double().sum()), means)
