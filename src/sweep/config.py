"""Composing configs outside the CLI, and validating them before any training starts.

Every command checks its config once, where it enters: `ValidateFirst`, a Hydra callback that
conf/config.yaml registers, runs the app's checks before Hydra creates the output folder.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobRuntime
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from sweep import CONF_DIR
from sweep.data import validate_dataset
from sweep.models import validate_model
from sweep.optim import validate_optimizer
from sweep.validation import (  # noqa: F401  (re-exported: callers import them from here)
    ConfigError,
    DataError,
    check_choice,
    check_finite,
    check_in_range,
    check_int_at_least,
    check_positive,
    fail,
    locate,
)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the config as `python -m sweep <overrides>` would, without running anything."""
    # Inside a running Hydra app (a CLI that composes one config per schedule or trial) Hydra is
    # already initialised; set its state aside for the compose and put it back afterwards.
    # Initialising sets Hydra's job name too ("app"), which a multirun reads for its later jobs.
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    job_name = JobRuntime.instance().get("name")
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides),
                                return_hydra_config=True)
    finally:
        if outer is not None:  # the singleton now is the one initialize_config_dir put back
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)
            JobRuntime.instance().set("name", job_name)
    return job_config(cfg)


def job_config(composed: DictConfig) -> DictConfig:
    """What an app's task gets of a config composed with its `hydra` node: a copy without it,
    with the option picked in each group recorded (`with_choices`)."""
    cfg = copy.deepcopy(composed)  # its flags too (struct: an unknown key stays an error)
    with open_dict(cfg):
        del cfg["hydra"]
    return with_choices(cfg, composed.hydra.runtime.choices)


def with_choices(cfg: DictConfig, choices: Mapping[str, Any]) -> DictConfig:
    """Record the option picked in each group (`scheduler: cosine`), for run names and tags."""
    picked = {g: c for g, c in choices.items() if not g.startswith("hydra") and c is not None}
    with open_dict(cfg):
        cfg.choices = picked
    return cfg


# `fuse: auto` trains up to this many compatible runs at once (`sweep.fused`). Measured on the
# 2-core development CPU (docs/benchmarks.md): 16 members of the article's MLP train 10.7x faster
# than one at a time, 64 members 16x.
AUTO_FUSE = 64


def check_fuse(value: Any) -> None:
    """`fuse`: auto, or the most runs trained at once (1 = one at a time, as `sweep.train`)."""
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        fail("fuse", value, f"auto (up to {AUTO_FUSE} compatible runs trained at once), 1 (one "
             "at a time) or an integer n >= 1 (at most n at once)")


def validate(cfg: DictConfig) -> None:
    """Check every value that can be checked before data is loaded; raises ConfigError.

    Cheap (milliseconds, nothing built or loaded), so every entry point may call it again. What
    needs the data (the schedule's lengths, the model's fit to the data, the files themselves)
    is checked by building the parts, before an MLflow run is opened (`sweep.__main__.run`).
    """
    t = cfg.trainer
    check_fuse(cfg.get("fuse", "auto"))
    check_int_at_least("trainer.epochs", t.epochs, 1)
    check_int_at_least("trainer.batch_size", t.batch_size, 1)
    check_choice("trainer.amp", t.amp, ("auto", "bf16", "fp16", "off"))
    check_choice("trainer.clip.mode", t.clip.mode, ("none", "norm", "value"))
    if t.clip.mode != "none":
        check_positive("trainer.clip.max", t.clip.max)
    check_choice("trainer.loss", t.loss, ("auto", "mse", "huber", "cross_entropy"))
    check_in_range("trainer.label_smoothing", t.label_smoothing, 0.0, 1.0, low_open=False,
                   high_open=True)
    check_positive("trainer.huber_delta", t.huber_delta)
    check_positive("trainer.divergence_factor", t.divergence_factor)
    check_int_at_least("trainer.log_every_n_steps", t.log_every_n_steps, 0)
    check_int_at_least("trainer.grad_norm_every", t.grad_norm_every, 0)
    check_int_at_least("trainer.checkpoint.every", t.checkpoint.every, 0)
    check_int_at_least("trainer.num_workers", t.num_workers, 0)
    if t.train_eval_loss != "auto" and not isinstance(t.train_eval_loss, bool):
        fail("trainer.train_eval_loss", t.train_eval_loss, "choose auto, true or false")
    device = str(t.device)
    if device not in ("auto", "cpu", "mps") and not re.fullmatch(r"cuda(:\d+)?", device):
        fail("trainer.device", device, "choose auto, cpu, cuda, cuda:<index> or mps")
    if t.checkpoint.path:
        check_folder_for("trainer.checkpoint.path", t.checkpoint.path,
                         Path(t.checkpoint.path).parent)
    if t.resume:
        check_file("trainer.resume", t.resume, "the checkpoint.pt of an earlier run (one with "
                   "trainer.checkpoint.every > 0)")
    validate_optimizer(cfg.optimizer)
    validate_model(cfg.model)
    validate_dataset(cfg.dataset)
    if cfg.tracking.enabled:
        validate_store(cfg)


def tracking_source(cfg: DictConfig) -> tuple[str, str]:
    """Which setting names the MLflow store, and its value: `tracking.uri`, else the variable
    MLFLOW_TRACKING_URI, else the default (a SQLite file in the working directory)."""
    if cfg.tracking.get("uri"):
        return "tracking.uri", str(cfg.tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"]
    return "tracking.uri", f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (also SQLite's `file:` form), else None."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return None
    path = uri.removeprefix("sqlite:///").partition("?")[0]
    if path.startswith("file:"):  # sqlite:///file:/abs/path?mode=ro&uri=true
        path = path.removeprefix("file:").removeprefix("//")
    return Path(path)


def validate_store(cfg: DictConfig) -> None:
    """A SQLite store must be a file we can write in a folder we can create or write.

    Other stores (servers, databases) say so when they are opened, before any run starts.
    """
    key, uri = tracking_source(cfg)
    path = sqlite_file(uri)
    if path is None:
        return
    allowed = "point it at a folder you can write, or use tracking=none"
    check_folder_for(key, uri, path.parent, allowed)
    if os.path.isdir(path):
        fail(key, uri, f"{path} is a folder, not a SQLite file; {allowed}")
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        fail(key, uri, f"{path} is read-only; {allowed}")


def check_folder_for(key: str, value: Any, folder: str | Path,
                     allowed: str = "choose a folder you can write") -> None:
    """Fail unless `folder` is, or could be created as, a folder this process can write into.

    Looks only: the nearest existing ancestor must be a writable folder. (Root passes every
    permission check; a file in the way, or a read-only file system, still fails.)
    """
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if not os.path.isdir(existing):
        made = "not a folder" if existing == folder else f"so {folder} cannot be made"
        fail(key, value, f"{existing} is a file, {made}; {allowed}")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(key, value, f"{existing} is not writable; {allowed}")


def check_file(key: str, value: Any, what: str) -> None:
    """Fail unless `value` names a readable, non-empty file; `what` says what it should be."""
    path = os.path.expanduser(str(value))
    if not os.path.exists(path):
        fail(key, str(value), f"no such file; give {what}")
    if not os.path.isfile(path):
        fail(key, str(value), f"is not a file; give {what}")
    if not os.access(path, os.R_OK):
        fail(key, str(value), f"cannot be read; give {what}")
    if os.path.getsize(path) == 0:
        fail(key, str(value), f"is empty; give {what}")


# --- overrides -----------------------------------------------------------------------------------

def override_key(override: str) -> str:
    """`+scheduler.gamma=0.8` -> `scheduler.gamma`: the key a Hydra override sets."""
    return override.split("=", 1)[0].lstrip("+~")


# --- validation before Hydra creates anything ------------------------------------------------

class ValidateFirst(Callback):
    """Runs the app's checks on the composed config before Hydra creates the output folder.

    conf/config.yaml registers it as `hydra.callbacks.validate`; each app's primary config names
    its checks, dotted paths of functions taking the whole config (`checks:`), so this module
    imports no app. A refused value prints `sweep: error: ...` and exits with code 2, leaving no
    folder and no MLflow run behind. (Hydra turns a callback's exceptions into warnings, hence
    the exit here.) A multirun checks the values its jobs share; a swept value is checked by
    the job that gets it.
    """

    def __init__(self, checks: Sequence[str] = ()) -> None:
        self.checks = list(checks)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    def _check(self, config: DictConfig, output_key: str) -> None:
        try:
            check_folder_for(output_key, OmegaConf.select(config, output_key),
                             OmegaConf.select(config, output_key))
            cfg = copy.deepcopy(config)  # the checks may add keys; Hydra's config stays as it is
            cfg = with_choices(cfg, cfg.hydra.runtime.choices)
            for check in self.checks:
                locate(check)(cfg)
        except (ConfigError, DataError) as err:  # DataError: a dataset the checks could not load
            print(f"sweep: error: {err}", file=sys.stderr)
            sys.exit(2)
