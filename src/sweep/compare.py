"""The one comparison: groups of runs (a study's schedules, a sensitivity study's models) ranked,
each tested against the leader, and said at the precision the data supports.

Every command that compares uses this module, so they cannot disagree: the study's summary
(`sweep.study_report`), the report read back from MLflow (`sweep.report`) and the sensitivity
study (`sweep.sensitivity_analysis`).

The rules, in order:
1. Each group's score is the mean of its runs' final values, with a Student t interval over seeds.
2. The leader is the best mean. Every other group is tested against it: paired over seeds where at
   least two seeds are shared (`scipy.stats.ttest_rel`; runs with one seed share data order and
   initialisation), else Welch's `ttest_ind`. One seed gives no noise estimate and no test.
3. Holm's correction across those tests: with k schedules there are k - 1 chances of a fluke.
4. The leaders are the leader and every group not clearly worse than it. A single leader is a
   winner. Otherwise "no clear difference", with how many seeds would settle it if the observed
   difference held (the n at which Student's t on that difference and spread crosses the line).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

import numpy as np
from omegaconf import DictConfig
from scipy import stats

from sweep.data import load_data

ALPHA = 0.05          # a difference is "clear" when its Holm-corrected p is below this
LEVEL = 0.95          # confidence level of every interval
# Metrics are float32 sums: differences below ~1e-6 of the value are arithmetic, not data.
FLOAT_NOISE = 1e-6
MAX_SEEDS = 1000      # beyond this, "more than 1000 seeds": the effect is too small to chase


# --- runs and numbers --------------------------------------------------------------------------

def final_value(status: str, curve: Sequence[float]) -> float:
    """A run's last epoch's value; nan for a run that diverged (it has none)."""
    if status == "diverged" or not curve or not math.isfinite(curve[-1]):
        return math.nan
    return curve[-1]


@dataclass
class Run:
    """One finished run as a comparison needs it, whether just trained or read back from MLflow."""

    group: str                       # the schedule (or the model) it belongs to
    seed: int | None
    status: str                      # completed | diverged | stalled | stopped | ...
    curve: list[float]               # the compared metric after epochs 1..n
    lr: list[tuple[float, float]] = field(default_factory=list)  # (epoch, lr); epochs fractional
    steps_per_epoch: int | None = None
    epoch_times: list[float] = field(default_factory=list)  # seconds per epoch, on `device`
    device: str | None = None        # what the wall-clock times were measured on, if recorded
    run_id: str | None = None

    @property
    def final(self) -> float:
        return final_value(self.status, self.curve)


@dataclass
class Estimate:
    """A mean over seeds with its t interval; with one value the interval is unknown (nan)."""

    n: int
    mean: float
    low: float
    high: float
    std: float

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2


def estimate(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """Mean and Student t interval of `values` (nan where there are too few)."""
    x = np.asarray([v for v in values if math.isfinite(v)], float)
    if len(x) == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if len(x) < 2:
        return Estimate(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if std == 0:
        return Estimate(len(x), mean, mean, mean, 0.0)
    low, high = stats.t.interval(level, len(x) - 1, loc=mean, scale=std / math.sqrt(len(x)))
    return Estimate(len(x), mean, float(low), float(high), std)


def decimals(uncertainty: float, value: float = math.nan) -> int:
    """Decimal places the data supports: two significant digits of the uncertainty; without one,
    four significant digits of the value."""
    if math.isfinite(uncertainty) and uncertainty > 0:
        return max(0, 1 - math.floor(math.log10(uncertainty)))
    if math.isfinite(value) and value != 0:
        return max(0, 3 - math.floor(math.log10(abs(value))))
    return 4


def number(value: float, uncertainty: float = math.nan, signed: bool = False) -> str:
    """`value` at the precision `uncertainty` supports; what rounds to zero prints as 0."""
    if not math.isfinite(value):
        return "-" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    places = min(decimals(uncertainty, value), 12)
    text = f"{value:+.{places}f}" if signed else f"{value:.{places}f}"
    return "0" if float(text) == 0 else text


def p_text(p: float) -> str:
    """A p-value in two significant digits; the ones that round to 1 print as 1."""
    if not math.isfinite(p):
        return "-"
    return "1" if p >= 0.995 else f"{p:.2g}"


def estimate_text(e: Estimate) -> str:
    """`0.913 (0.901 .. 0.925)`: the mean and its interval, at the interval's precision."""
    if e.n == 0:
        return "-"
    if e.n == 1:
        return f"{number(e.mean)} (1 seed)"
    return f"{number(e.mean, e.half)} ({number(e.low, e.half)} .. {number(e.high, e.half)})"


# --- one group against the leader ---------------------------------------------------------------

@dataclass
class Versus:
    """A group against the leader: the difference (this - leader) over seeds and its test."""

    diff: float
    low: float                       # t interval of the mean difference
    high: float
    p: float                         # the test's two-sided p (nan without a test)
    n: int                           # pairs, or the smaller group
    test: str                        # "paired t-test" | "Welch t-test" | "too few seeds"
    spread: float                    # sd of the differences (paired) or of the values (Welch)
    p_holm: float = math.nan         # after Holm's correction across the comparison's tests

    def clear(self, alpha: float = ALPHA) -> bool:
        return math.isfinite(self.p_holm) and self.p_holm < alpha


def versus(leader: dict[int | None, float], other: dict[int | None, float],
           level: float = LEVEL) -> Versus:
    """`other` (final values by seed) against `leader`: paired by seed where at least two seeds are
    shared, else Welch's t-test; differences within float noise are ties (p = 1)."""
    leader = {s: v for s, v in leader.items() if math.isfinite(v)}
    other = {s: v for s, v in other.items() if math.isfinite(v)}
    common = sorted(s for s in leader.keys() & other.keys() if s is not None)
    paired = len(common) >= 2
    a = np.array([other[s] for s in common] if paired else list(other.values()), float)
    b = np.array([leader[s] for s in common] if paired else list(leader.values()), float)
    if not (paired or (len(a) >= 2 and len(b) >= 2)):
        diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
        return Versus(diff, math.nan, math.nan, math.nan, min(len(a), len(b)), "too few seeds",
                      math.nan)
    noise = FLOAT_NOISE * max(float(np.abs(b).mean()), 1e-12)
    diff = float(a.mean() - b.mean())
    if paired:
        n, test, spread = len(a), "paired t-test", float((a - b).std(ddof=1))
    else:
        n, test = min(len(a), len(b)), "Welch t-test"
        spread = float(math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))
    if abs(diff) <= noise:  # the same runs up to rounding: a tie, whatever t says
        return Versus(0.0, 0.0, 0.0, 1.0, n, test, spread)
    if spread <= noise:  # no seed-to-seed noise at all: every seed shows the same gap
        return Versus(diff, diff, diff, 0.0, n, test, 0.0)
    result = stats.ttest_rel(a, b) if paired else stats.ttest_ind(a, b, equal_var=False)
    low, high = result.confidence_interval(level)
    return Versus(diff, float(low), float(high), float(result.pvalue), n, test, spread)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (nan stays nan and does not count as a test)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    m, out, running = len(order), [math.nan] * len(pvalues), 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


def seeds_to_settle(v: Versus, alpha: float, tests: int) -> int | None:
    """Seeds per group at which Student's t would call `v`'s difference clear if its mean and
    spread held; None when there is nothing to settle (no difference, or no spread measured).

    The level is alpha / tests, the strictest step of Holm's correction, so the count suffices.
    """
    if not (math.isfinite(v.spread) and v.spread > 0 and v.diff != 0 and math.isfinite(v.diff)):
        return None
    level = alpha / max(tests, 1)
    for n in range(2, MAX_SEEDS + 1):
        # Paired: the differences' spread; Welch with equal groups: the two spreads pooled.
        se = v.spread / math.sqrt(n) * (1 if v.test == "paired t-test" else math.sqrt(2))
        dof = n - 1 if v.test == "paired t-test" else 2 * n - 2
        if abs(v.diff) / se > stats.t.ppf(1 - level / 2, dof):
            return n
    return MAX_SEEDS + 1


# --- the comparison ------------------------------------------------------------------------------

@dataclass
class Group:
    """One group's runs, its score and its test against the leader."""

    name: str
    runs: list[Run]
    columns: dict[str, str] = field(default_factory=dict)  # extra table cells: tuned settings, ...
    score: Estimate = field(default_factory=lambda: estimate([]))
    versus: Versus | None = None
    to_target: list[int | None] = field(default_factory=list)  # epochs, per run

    @property
    def values(self) -> list[float]:
        return [r.final for r in self.runs if math.isfinite(r.final)]

    def by_seed(self) -> dict[int | None, float]:
        return {r.seed: r.final for r in self.runs if math.isfinite(r.final)}


@dataclass
class Comparison:
    """Groups ranked best first (those without a finished run last), each against the leader."""

    metric: str
    maximize: bool
    groups: list[Group]
    alpha: float
    target: float | None
    target_from: str                 # how the target was set

    @property
    def scored(self) -> list[Group]:
        return [g for g in self.groups if g.values]

    @property
    def leader(self) -> Group | None:
        return self.scored[0] if self.scored else None

    @property
    def leaders(self) -> list[str]:
        """The leader and every group not clearly worse than it."""
        return [g.name for g in self.scored if g.versus is None or not g.versus.clear(self.alpha)]

    @property
    def winner(self) -> str | None:
        """The one leader, if it beat every other group on every seed it ran: a group whose mean
        leaves out seeds that diverged is scored on its lucky seeds only, so it cannot win."""
        if len(self.scored) > 1 and len(self.leaders) == 1 and not self.diverged(self.scored[0]):
            return self.leaders[0]
        return None

    @staticmethod
    def diverged(group: Group) -> int:
        return sum(r.status == "diverged" for r in group.runs)

    def seeds_needed(self) -> dict[str, int]:
        """Per group tied with the leader: the seeds per group that would separate the two if
        the observed difference held (groups whose difference is nil are left out)."""
        tests = sum(math.isfinite(g.versus.p) for g in self.scored if g.versus)
        needed = {g.name: seeds_to_settle(g.versus, self.alpha, tests) for g in self.scored[1:]
                  if g.name in self.leaders and g.versus is not None}
        return {name: n for name, n in needed.items() if n is not None}

    def sentence(self, noun: str = "schedule") -> str:
        """Which groups lead, which are clearly worse, and what would settle a tie."""
        scored, metric = self.scored, self.metric
        if not scored:
            return f"No {noun} has a finished run to compare."
        lead = scored[0]
        if len(scored) == 1:
            return (f"Only {lead.name} has finished runs (final {metric} "
                    f"{estimate_text(lead.score)}).")
        better = "higher" if self.maximize else "lower"
        worse = [g.name for g in scored if g.name not in self.leaders]
        failed = [g.name for g in self.groups if not g.values]
        stalled = [g.name for g in self.groups if g.runs and all(r.status == "stalled"
                                                                   for r in g.runs)]
        tail = (f" Clearly worse than {lead.name}: {', '.join(worse)}." if worse else "")
        tail += f" No finished run: {', '.join(failed)}." if failed else ""
        tail += (f" Did not learn in any run (stalled): {', '.join(stalled)}; a lead among "
                 "runs that did not learn means little." if stalled else "")
        if len(self.leaders) == 1 and self.diverged(lead):
            return (f"{lead.name} has the best mean (final {metric} {estimate_text(lead.score)}, "
                    f"{better} is better) over the seeds that finished, but diverged in "
                    f"{self.diverged(lead)} of {len(lead.runs)}: not a reliable winner.{tail}")
        if self.winner:
            return (f"{lead.name} is best: final {metric} {estimate_text(lead.score)}, {better} "
                    f"is better; every other {noun} is worse by more than the seed-to-seed noise "
                    f"(Holm-corrected p < {self.alpha:g}).{tail}")
        ties = [g for g in scored[1:] if g.name in self.leaders and g.versus is not None]
        untested = [g.name for g in ties if g.versus.test == "too few seeds"]
        reasons = []
        if lead.score.n < 2 or len(untested) == len(ties):
            reasons.append("one seed measures no seed-to-seed noise; set two or more seeds to "
                           "compare")
        elif untested:
            reasons.append(f"{', '.join(untested)} {'has' if len(untested) == 1 else 'have'} "
                           f"too few seeds for a test against {lead.name}")
        if len(untested) < len(ties) and lead.score.n >= 2:
            needed = self.seeds_needed()
            most = max(needed.values(), default=None)
            each = ("" if len(needed) < 2 else " (" + ", ".join(
                f"{lead.name} vs {name}: {n if n <= MAX_SEEDS else f'> {MAX_SEEDS}'}"
                for name, n in needed.items()) + ")")
            reasons.append(
                "the observed differences are within rounding: more seeds would not separate "
                "them" if most is None else
                f"if the observed differences held, {most} seeds per {noun} would settle "
                f"it{each}" if most <= MAX_SEEDS else
                f"the observed differences are so small that more than {MAX_SEEDS} seeds "
                f"per {noun} would be needed{each}")
        why = "; ".join(reasons)
        best = number(lead.score.mean, lead.score.half)
        return (f"No clear difference between {', '.join(self.leaders)} (final {metric}, "
                f"{better} is better; {lead.name} has the best mean, {best}): {why}.{tail}")

    # --- tables -----------------------------------------------------------------------------

    def summary_table(self, fmt: str = "md", extra: Sequence[str] = (),
                      noun: str = "schedule") -> str:
        """Per group: the extra columns named (keys of `Group.columns`), runs, final metric with
        its interval, time to target in epochs and optimizer steps (and seconds beside the device
        they ran on)."""
        target = "target" if self.target is None else number(self.target)
        clock = all(r.device and r.epoch_times for g in self.groups for r in g.runs)
        head = [noun, *extra, "runs",
                f"final {self.metric} mean ({LEVEL:.0%} CI)", f"epochs to {target}",
                f"steps to {target}"]
        if clock:
            head.append(f"seconds to {target} (wall clock, device)")
        rows = []
        for g in self.groups:
            bad = {s: sum(r.status == s for r in g.runs) for s in ("diverged", "stalled")}
            runs = str(len(g.runs)) + "".join(f" ({k} {s})" for s, k in bad.items() if k)
            epochs = g.to_target
            steps = [e * r.steps_per_epoch if e is not None and r.steps_per_epoch else None
                     for e, r in zip(epochs, g.runs, strict=True)]
            known = all(r.steps_per_epoch for r in g.runs)  # else steps are unknown, not "never"
            row = [g.name, *(g.columns.get(k, "-") for k in extra), runs,
                   estimate_text(g.score), reached(epochs, 1),
                   reached(steps, 0) if known else "-"]
            if clock:
                seconds = [sum(r.epoch_times[:e]) if e is not None else None
                           for e, r in zip(epochs, g.runs, strict=True)]
                devices = ", ".join(sorted({r.device for r in g.runs if r.device}))
                row.append(f"{reached(seconds, 1)} on {devices}")
            rows.append(row)
        return table(head, rows, fmt)

    def versus_table(self, fmt: str = "md", noun: str = "schedule") -> str:
        """Every group against the leader: difference with its interval, test, p and Holm's p."""
        head = ["rank", noun, f"difference to the leader ({LEVEL:.0%} CI)", "test", "p",
                "p (Holm)", "verdict"]
        rows = []
        for i, g in enumerate(self.groups, 1):
            v = g.versus
            if not g.values:
                rows.append([str(i), g.name, "-", "-", "-", "-", "no finished run"])
            elif v is None:
                rows.append([str(i), g.name, "leader", "-", "-", "-",
                             "best" if self.winner else "tied (leader)"])
            else:
                half = (v.high - v.low) / 2
                interval = (f"{number(v.diff, half, True)} ({number(v.low, half, True)} .. "
                            f"{number(v.high, half, True)})" if math.isfinite(v.low)
                            else number(v.diff, signed=True))
                verdict = "clearly worse" if v.clear(self.alpha) else "tied with the leader"
                rows.append([str(i), g.name, interval, f"{v.test}, n={v.n}", p_text(v.p),
                             p_text(v.p_holm), verdict])
        return table(head, rows, fmt)

    def notes(self) -> list[str]:
        """How to read the tables."""
        direction = ">=" if self.maximize else "<="
        out = [f"Final = the last epoch's {self.metric}; a diverged run has none. Intervals are "
               f"{LEVEL:.0%} Student t intervals over seeds; numbers are rounded to the precision "
               "their interval supports."]
        if self.target is not None:
            out.append(f"Time to target: the first epoch at {self.metric} {direction} "
                       f"{number(self.target)} ({self.target_from}), mean over the runs that "
                       "reach it, and the optimizer steps that is.")
        if not all(r.device and r.epoch_times for g in self.groups for r in g.runs):
            out.append("Wall-clock time is not shown: these runs do not record the device they "
                       "ran on, and seconds mean little without it.")
        else:
            out.append("Seconds are wall-clock training and evaluation time on the device named; "
                       "on a shared or different machine they differ.")
        out.append(f"Every {self.leader.name if self.leader else 'leader'}-vs-other difference is "
                   "tested paired by seed where the seeds match (Welch's t-test otherwise), with "
                   f"Holm's correction across the tests; clear = corrected p < {self.alpha:g}.")
        return out


def steps_per_epoch(cfg: DictConfig) -> int:
    """Optimizer steps per epoch of a run's config: its training split in batches."""
    return load_data(cfg.dataset).steps_per_epoch(cfg.trainer.batch_size)


def reached(values: Sequence[float | None], places: int) -> str:
    done = [v for v in values if v is not None]
    if not done:
        return "not reached"
    text = f"{float(np.mean(done)):.{places}f}"
    return text if len(done) == len(values) else f"{text} ({len(done)}/{len(values)} runs)"


def epochs_to(curve: Sequence[float], target: float, maximize: bool) -> int | None:
    """The first epoch (1-based) whose value reaches the target, or None."""
    for epoch, value in enumerate(curve, 1):
        if (value >= target) if maximize else (value <= target):
            return epoch
    return None


def compare(runs: Sequence[Run], metric: str, maximize: bool, alpha: float = ALPHA,
            target: float | None = None,
            columns: dict[str, dict[str, str]] | None = None,
            names: Sequence[str] = ()) -> Comparison:
    """Rank the runs' groups by mean final value and test each against the leader (Holm-corrected
    over the tests); epochs to `target` (default: the worst group's mean, which every group
    reaches on average). `columns`: extra table cells per group name; `names`: groups to list
    even without a run."""
    names = list(dict.fromkeys([*names, *(r.group for r in runs)]))
    groups = [Group(n, [r for r in runs if r.group == n], dict((columns or {}).get(n, {})))
              for n in names]
    for g in groups:
        g.score = estimate(g.values)
    sign = -1 if maximize else 1
    scored = sorted((g for g in groups if g.values), key=lambda g: sign * g.score.mean)
    ranked = scored + [g for g in groups if not g.values]
    if scored:
        lead = scored[0].by_seed()
        for g in scored[1:]:
            g.versus = versus(lead, g.by_seed())
        for g, p in zip(scored[1:], holm([g.versus.p for g in scored[1:]]), strict=True):
            g.versus.p_holm = p
    target_from = "set by the user" if target is not None else "the worst mean over groups"
    if target is None and scored:
        target = scored[-1].score.mean
    for g in ranked:
        g.to_target = [epochs_to(r.curve, target, maximize) if target is not None else None
                       for r in g.runs]
    return Comparison(metric, maximize, ranked, alpha, target, target_from)


# --- tables --------------------------------------------------------------------------------------

def table(head: Sequence[str], rows: Sequence[Sequence[str]], fmt: str = "md") -> str:
    """The one table formatter: aligned Markdown (reads on a terminal, renders in MLflow and on
    GitHub) or an HTML table."""
    if fmt == "html":
        cells = "".join(f"<th>{escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                       for row in rows)
        return f"<table><tr>{cells}</tr>{body}</table>"
    if fmt != "md":
        raise ValueError(f"fmt={fmt!r}: choose md or html")
    body = [[c.replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(line[i]) for line in [list(head), *body]) for i in range(len(head))]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def html_page(title: str, sections: Sequence[tuple[str, str]], images: dict[str, bytes]) -> str:
    """One self-contained page: (heading, html) sections, then the PNGs inline."""
    import base64

    figures = "".join(f'<figure><img alt="{escape(name)}" src="data:image/png;base64,'
                      f'{base64.b64encode(data).decode()}"><figcaption>{escape(name)}'
                      "</figcaption></figure>" for name, data in images.items())
    body = "".join(f"<h2>{escape(h)}</h2>{html}" if h else html for h, html in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
            "img{max-width:100%}</style></head><body>"
            f"<h1>{escape(title)}</h1>{body}<h2>Figures</h2>{figures}</body></html>\n")
