"""`hydra/launcher=fused`: a Hydra multirun of `python -m sweep` whose compatible jobs train fused.

`python -m sweep -m optimizer.lr=0.1,0.03,0.01 seed=1,2,3 hydra/launcher=fused` keeps Hydra's
multirun interface (the sweeper, the job folders and their `.hydra/`, callbacks, return values);
only the training of jobs that can train together happens at once (`sweep.fused`). Hydra looks
for launchers in the `hydra_plugins` package and imports every module in it when any Hydra app
starts, so this one stays light: the work is in `sweep.fused.launcher`, imported on launch.
"""

# No `from __future__ import annotations`: Hydra executes this module outside sys.modules, where
# a dataclass cannot resolve string annotations.
from collections.abc import Sequence
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.sweep_fused.FusedLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf,
                             provider="sweep")


class FusedLauncher(Launcher):
    """Runs a multirun's jobs as Hydra's basic launcher does, training compatible ones fused."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from sweep.fused.launcher import launch

        return launch(self.hydra_context, self.config, job_overrides, initial_job_idx)
