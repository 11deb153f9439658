"""The experiment trackers a run reports to (`--report-to tensorboard,wandb,mlflow`): each gets every metrics.jsonl
value under the TensorBoard tags (`train/loss`, `eval/ppl`, ...) at its optimizer step, the resolved settings, and
the summary at the end. `metrics.jsonl` stays the record that resume, plots and tests read; a tracker is a copy.

- W&B (`wandb`): a run in `WANDB_PROJECT` (default tinyllama-lora) and `WANDB_ENTITY`, its config the settings,
  its summary the summary; `WANDB_MODE=offline` logs to `WANDB_DIR` for `wandb sync` later.
- MLflow (`mlflow`): a run in `MLFLOW_EXPERIMENT_NAME` (default tinyllama-lora) on `MLFLOW_TRACKING_URI`, its
  params the settings, the summary's numbers as `summary/NAME` metrics and its text as `summary.NAME` tags.
- TensorBoard: event files in OUT/tensorboard, the settings and summary as text.

Checked with the settings (`problems`): a name that is no tracker, a package that is not installed (naming the
extra), a server that does not answer. Started by the main process alone: W&B and MLflow once the output folder
is locked and checked, before the model loads (`start_remote`), so a login or a store they refuse stops the run at
once; TensorBoard once the folder is begun, since it writes there. The ids of the W&B and MLflow runs are kept in
OUT/trackers.json (`save_ids`), so a resumed run continues the same runs. Neither can replace a value it holds
(W&B drops a step below its last one, MLflow keeps both), so the steps a resume repeats are not sent again
(TensorBoard hides the old ones with `purge_step`). A tracker that fails mid-run is warned about once and dropped
(`report.Metrics`); training goes on.

Deliberately left out: artifacts (the adapter and checkpoints stay in OUT), system metrics, W&B's run rewind
(`resume_from`, a preview feature that offline runs do not have).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import json
import os
import time
import uuid
from pathlib import Path

from . import TrainingError, run_folder

NAMES = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
DEFAULT_PROJECT = "tinyllama-lora"  # W&B's project and MLflow's experiment when the environment names none
REACH_TIMEOUT_S = 10.0
MLFLOW_BATCH = 100  # MLflow's limit of params (and of tags) in one log_batch call


def requested(cfg) -> list[str]:
    """The trackers a run's settings ask for, in order, once each (`--tensorboard` is `--report-to tensorboard`)."""
    names = [n.strip().lower() for n in cfg.report_to.split(",") if n.strip() and n.strip().lower() != "none"]
    return list(dict.fromkeys(names + (["tensorboard"] if cfg.tensorboard else [])))


def problems(cfg) -> list[str]:
    """Why a requested tracker cannot work, a line each: checked with the settings, before anything loads."""
    names = requested(cfg)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        return [f"--report-to: {', '.join(unknown)} is no tracker this project reports to; expected some of "
                f"{', '.join(NAMES)}, comma-separated"]
    found = []
    for name in names:
        problem = missing_package(name) or unreachable(name)
        if problem:
            found.append(problem)
    return found


def missing_package(name: str) -> str | None:
    """Why `name`'s package cannot be used, naming the extra that installs it. W&B and MLflow are found without
    importing them (seconds each); TensorBoard is imported, as the run will."""
    install = f"install it with pip install -e .[{name}], or leave {name} out of --report-to"
    if name == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package itself)
        except ImportError as e:
            return f"--tensorboard needs the tensorboard package ({e}); {install} (and --tensorboard)"
        return None
    if importlib.util.find_spec(name) is None:
        return f"--report-to {name} needs the {name} package, which is not installed; {install}"
    return None


def unreachable(name: str) -> str | None:
    """Why the server a tracker will talk to does not answer, or None (no server to ask: offline W&B, a local
    MLflow store)."""
    if name == "wandb" and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun"):
        url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        why = _no_answer(url)
        return why and (f"--report-to wandb: the W&B server {url} cannot be reached ({why}); set WANDB_MODE=offline "
                        "to log locally and `wandb sync` later, or leave wandb out")
    if name == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        why = _no_answer(uri) if uri.startswith(("http://", "https://")) else None
        return why and (f"--report-to mlflow: the tracking server {uri} (MLFLOW_TRACKING_URI) cannot be reached "
                        f"({why}); start it, point MLFLOW_TRACKING_URI at a running one, or leave mlflow out")
    return None


def _no_answer(url: str) -> str | None:
    """None when a server answers at `url` (any HTTP status: authentication is the tool's to check)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=REACH_TIMEOUT_S).close()  # noqa: S310  (an http(s) URL, checked above)
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def values_of(row: dict) -> dict[str, float]:
    """A metrics.jsonl row's numbers under their TensorBoard tags: `split/name`."""
    return {f"{row['split']}/{name}": value for name, value in row.items()
            if name not in ("step", "split") and _number(value)}


def read_ids(out: Path) -> dict:
    try:
        found = json.loads((out / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


# ---- the trackers ------------------------------------------------------------------------------------------------

class TensorBoard:
    name = "tensorboard"

    def __init__(self, out: Path, settings: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        run_folder.claim(out, TENSORBOARD_DIR)
        # A resumed run may start before steps an earlier leg logged (resume from an older checkpoint):
        # purge_step hides those events, as start_resume sets metrics.jsonl's later rows aside.
        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
        run_folder.record(out, TENSORBOARD_DIR)
        self.writer.add_text("config", _code(settings), start_step)
        self.continues = False  # every step is sent: purge_step replaces the repeated ones

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a crash loses at most the step being written, as with metrics.jsonl

    def finish(self, summary: dict) -> None:
        self.writer.add_text("summary", _code(summary), summary.get("steps", 0))
        self.close()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandB:
    name = "wandb"

    def __init__(self, settings: dict, run_name: str, saved: dict):
        import wandb

        self.continues = bool(saved.get("id"))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or saved.get("project") or DEFAULT_PROJECT,
                              id=saved.get("id") or uuid.uuid4().hex[:8], resume="allow", name=run_name,
                              config=settings, allow_val_change=True)
        self.ids = {"id": self.run.id, "project": self.run.project, "entity": self.run.entity}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update(summary)
        self.close()

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    name = "mlflow"

    def __init__(self, settings: dict, run_name: str, saved: dict, log):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient()  # MLFLOW_TRACKING_URI, else MLflow's default store
        self.run_id, self.continues = saved.get("run_id"), False
        if self.run_id:
            try:
                client.update_run(self.run_id, status="RUNNING")
                self.continues = True
            except Exception as e:  # noqa: BLE001  (another store, or the run was deleted: a new one is started)
                log(f"mlflow: the run {self.run_id} recorded in {IDS_FILE} cannot be continued ({e}); starting a "
                    "new one")
                self.run_id = None
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            found = client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else client.create_experiment(name)
            self.run_id = client.create_run(experiment, run_name=run_name).info.run_id
        # Params cannot change once logged: a resumed run adds the settings its run does not have yet (what it
        # changed, train.py prints).
        held = client.get_run(self.run_id).data.params
        params = [Param(k, _param(v)) for k, v in settings.items() if k not in held]
        for i in range(0, len(params), MLFLOW_BATCH):
            client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH])
        self.ids = {"run_id": self.run_id, "tracking_uri": client.tracking_uri}
        # A run stopped by an error or Ctrl-C never reaches close(): marked FAILED at exit rather than left RUNNING
        # (W&B's own exit hook does this for W&B).
        atexit.register(self._abandoned)

    def _abandoned(self) -> None:
        with contextlib.suppress(Exception):  # the interpreter is exiting: nothing left to report to
            self.client.set_terminated(self.run_id, "FAILED")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def finish(self, summary: dict) -> None:
        from mlflow.entities import Metric, RunTag

        now, step = int(time.time() * 1000), summary.get("steps", 0)
        numbers = [Metric(f"summary/{k}", float(v), now, step) for k, v in summary.items() if _number(v)]
        tags = [RunTag(f"summary.{k}", _param(v)) for k, v in summary.items() if v is not None and not _number(v)]
        self.client.log_batch(self.run_id, metrics=numbers, tags=tags[:MLFLOW_BATCH])
        self.close()

    def close(self, failed: bool = False) -> None:
        atexit.unregister(self._abandoned)
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _param(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _code(values: dict) -> str:
    """`values` as a Markdown code block (TensorBoard renders its text as Markdown)."""
    return "```\n" + json.dumps(values, indent=2) + "\n```"


REMOTE = ("wandb", "mlflow")


def start_remote(cfg, out: Path, resume_from: Path | None, log) -> list:
    """The W&B and MLflow runs `cfg` asks for, started by the main process before the model loads: one that cannot
    start (no login, a project it may not write, a store it cannot open) stops the run then, in one line. A resume
    that continues in its checkpoint's folder continues the runs OUT/trackers.json names (`save_ids`)."""
    names = [n for n in requested(cfg) if n in REMOTE]
    saved = read_ids(out) if names and run_folder.continues_in(resume_from, out) else {}
    settings, run_name, started = dataclasses.asdict(cfg), cfg.run_name or out.resolve().name, []
    for name in names:
        with _starting(name, started):
            started.append(WandB(settings, run_name, saved.get("wandb", {})) if name == "wandb" else
                           MLflow(settings, run_name, saved.get("mlflow", {}), log))
    return started


def start_tensorboard(out: Path, settings: dict, start_step: int) -> TensorBoard:
    """TensorBoard's writer, once the output folder is begun (it writes into OUT/tensorboard)."""
    with _starting("tensorboard", []):
        return TensorBoard(out, settings, start_step)


@contextlib.contextmanager
def _starting(name: str, started: list):
    try:
        yield
    except Exception as e:  # noqa: BLE001  (each tool raises its own kinds; all mean the same here)
        close_failed(started)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TrainingError(f"--report-to {name}: could not start its run ({type(e).__name__}: {first})") from e


def close_failed(started: list) -> None:
    """End runs a run that stopped before training leaves behind, marked as failed."""
    for tracker in started:
        with contextlib.suppress(Exception):  # already failing: the first error is the one to report
            tracker.close(failed=True)


def save_ids(out: Path, started: list) -> None:
    """OUT/trackers.json: the ids of the W&B and MLflow runs, once the output folder is begun."""
    saved = read_ids(out)
    ids = {**saved, **{t.name: t.ids for t in started if hasattr(t, "ids")}}
    if ids != saved:
        run_folder.claim(out, IDS_FILE)
        run_folder.write_text(out / IDS_FILE, json.dumps(ids, indent=2) + "\n")
