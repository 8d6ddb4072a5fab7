"""The names of the files an evaluation logs into a run's MLflow artifacts: one scheme, used by the
writers (training's per-epoch evaluation, `st-scale eval`) and by the readers (the study report).

    subnets/subnets_epoch<NNN><suffix>.csv   every evaluated sub-network after epoch NNN (training)
    plots/subnets_epoch<NNN><suffix>.png     their accuracy against their cost
    destruction/destruction.csv              the destruction tests after the last epoch (training)
    plots/destruction.png
    eval/subnets<suffix>.csv, .png           the same from `st-scale eval` of a checkpoint
    eval/destruction.csv, .png

`<suffix>` names the BatchNorm statistics of a second version of the figures: `_shared_stats` (the
running statistics training left) or `_calib_<protocol>` (the other calibration protocol).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArtifactLayout:
    """Where one evaluation's tables and figures go."""

    tables: str  # the folder of the sub-network tables
    figures: str  # the folder of the figures
    stem: str  # the sub-network files' name
    destruction_tables: str  # the folder of the destruction table

    def subnets_csv(self, suffix: str = "") -> str:
        return f"{self.tables}/{self.stem}{suffix}.csv"

    def subnets_png(self, suffix: str = "") -> str:
        return f"{self.figures}/{self.stem}{suffix}.png"

    def destruction_csv(self) -> str:
        return f"{self.destruction_tables}/destruction.csv"

    def destruction_png(self) -> str:
        return f"{self.figures}/destruction.png"


def epoch_layout(epoch: int) -> ArtifactLayout:
    """Training's files after epoch `epoch` (counted from 1)."""
    return ArtifactLayout("subnets", "plots", f"subnets_epoch{epoch:03d}", "destruction")


# `st-scale eval`'s files: beside the training run's own, under eval/.
CHECKPOINT_LAYOUT = ArtifactLayout("eval", "eval", "subnets", "eval")
