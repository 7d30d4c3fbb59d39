"""The learning-rate schedule family: one YAML per schedule in conf/scheduler/, built for a run.

The modules, in reading order:
- `lengths`: `Budget`, and lengths as ticks, "3 epochs", "500 steps" or fractions of the run;
- `checks`: the rules a schedule's YAML declares for its arguments (`checks:`);
- `expressions`: the arithmetic of `lambda` schedules, and what a dotted path may name;
- `family`: the schedules PyTorch lacks, each a small function returning a multiplier f(t);
- `pytorch`: what PyTorch's own classes need from the run (a YAML's `prepare:`);
- `build`: `build_scheduler` and `validate_scheduler`: the config checked, warmup in front;
- `space`: `search_space`, the Optuna space each schedule declares;
- `draw`: `simulate`, and `python -m sweep.schedules`, which draws schedules without training.

Adding a schedule is one YAML in conf/scheduler/ (its target, arguments, interval, warmup, checks
and search space), plus at most one small function in `family` or `pytorch`.
"""

from sweep.schedules.build import META_KEYS, Schedule, build_scheduler, validate_scheduler
from sweep.schedules.draw import available_schedules, budget_from_config, simulate, write_csv
from sweep.schedules.expressions import parse_expression
from sweep.schedules.lengths import INTERVALS, Budget, to_ticks
from sweep.schedules.space import search_space

__all__ = ["INTERVALS", "META_KEYS", "Budget", "Schedule", "available_schedules",
           "budget_from_config", "build_scheduler", "parse_expression", "search_space", "simulate",
           "to_ticks", "validate_scheduler", "write_csv"]
