"""The MLflow UI as a reviewer sees it, in a real browser: a tiny study's runs and a trial's charts.

    python scripts/ui_check.py [--out ui-check]

1. Runs a tiny real study (`study=tiny`, one trial per schedule, an MLP on 200 synthetic
   samples) into a fresh SQLite store under --out.
2. Starts `mlflow ui` on 127.0.0.1 on a free port, on that store.
3. Drives headless Chromium (Debian's `chromium` and `chromium-driver`, Python's `selenium`):
   the experiment's runs page must list the study's run and, expanded, every trial and
   confirmation run by name (`step-0`, `cosine-best-seed1`, ...); a trial's "Model metrics" page
   must show its `val_mse`, `val_loss` and `lr` charts.
4. Saves a screenshot of each page under --out (`experiment.png`, `trial.png`) and stops the
   server. Exit code 0 when every check passed, 1 otherwise (it says which).

MLflow 3.17 opens an experiment in its GenAI view unless the "Model training" toggle (top left)
is on; `?workflowType=machine_learning` in a page's address turns it on, as `make ui` says.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ML = "workflowType=machine_learning"  # the UI's "Model training" mode, not GenAI's
# Two schedules, one trial and one confirmation seed each: four child runs under the study's.
STUDY = ["study=tiny", "study.trials=1", "study.seeds=[1]", "model=mlp",
         "dataset=synthetic_regression", "dataset.n_samples=200", "trainer.batch_size=50"]


def make_store(out: Path) -> str:
    """A tiny real study logged to `out/mlflow.db`; returns the store's URI."""
    uri = f"sqlite:///{out / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-m", "sweep.study", *STUDY,
                           f"study.output_dir={out / 'study'}"], cwd=out, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the study failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(uri: str, log: Path) -> Iterator[str]:
    """`mlflow ui` on 127.0.0.1 and a free port, until the block ends; yields its address."""
    port = free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner
    with open(log, "w") as handle:
        proc = subprocess.Popen([mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a loaded machine takes tens of seconds to start it
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow ui did not start:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the server and its uvicorn worker
            try:
                os.killpg(proc.pid, sig)
                proc.wait(15)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@contextmanager
def chromium() -> Iterator[object]:
    """Headless Chromium through chromedriver, tall enough to show a run's charts at once."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1600,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path()))
    try:
        yield driver
    finally:
        driver.quit()


def driver_path() -> str:
    return next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
                 if os.path.exists(p)), "chromedriver")


def wait_for_text(driver, texts: list[str], timeout: float = 90.0) -> list[str]:
    """Wait until the page shows every one of `texts`; returns those still missing."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [t for t in texts if t not in body.split("\n")]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.5)


def check(url: str, uri: str, out: Path) -> list[str]:
    """Drive the UI; returns what failed (empty when everything passed)."""
    import mlflow
    from selenium.webdriver.common.by import By

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "study")
    children = sorted(r.info.run_name for r in runs if r is not parent)
    trial = next(r for r in runs if r.data.tags.get("role") == "trial"
                 and r.data.tags.get("state") == "complete")
    failures = []
    with chromium() as driver:
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs?{ML}")
        missing = wait_for_text(driver, [parent.info.run_name])
        if not missing:  # the study's runs are nested under it: expand them
            driver.find_element(By.CSS_SELECTOR,
                                "button[data-component-id*='runnamecellrenderer']").click()
            missing = wait_for_text(driver, children)
        driver.save_screenshot(str(out / "experiment.png"))
        if missing:
            failures.append(f"the experiment page does not list {missing}")

        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs/{trial.info.run_id}"
                   f"/model-metrics?{ML}")
        missing = wait_for_text(driver, [trial.info.run_name, "val_mse", "val_loss", "lr"])
        time.sleep(2)  # the charts draw after their titles
        driver.save_screenshot(str(out / "trial.png"))
        if missing:
            failures.append(f"trial {trial.info.run_name}'s page shows no chart {missing}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the store and the screenshots (default: a temporary "
                             "folder, kept)")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="ui-check-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    uri = make_store(out)
    print(f"tiny study logged to {uri} in {time.monotonic() - started:.0f}s", flush=True)
    with mlflow_ui(uri, out / "mlflow-ui.log") as url:
        failures = check(url, uri, out)
    for failure in failures:
        print(f"FAILED: {failure}")
    print(f"screenshots: {out / 'experiment.png'}, {out / 'trial.png'}")
    if not failures:
        print("ok: the runs are listed by name and a trial shows its val_* and lr charts")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
