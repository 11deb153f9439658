"""--report-to wandb,mlflow: read back with each tool's own reader (W&B's offline run files, MLflow's client on a
local sqlite store), every value equals metrics.jsonl's at its step, the settings and the summary are there, and a
resumed run continues the same runs without sending a step twice. Refusals come before anything loads; a tracker
that fails mid-run is one warning."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

import train
from helpers import GUANACO_SAMPLE, metrics, run
from training import TrainingError, report, trackers

# W&B and MLflow take seconds to import and to build a store: `make test` only, not test-fast.
pytestmark = pytest.mark.slow
# The tests of what W&B and MLflow hold need the packages (the [wandb] and [mlflow] extras, which `make setup`
# installs); without them they are skipped, saying so, and the rest runs.
NEEDS_BOTH = pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in ("wandb", "mlflow")),
                                reason="needs the wandb and mlflow packages: pip install -e .[wandb,mlflow]")


def wandb_records(path: Path):
    """The records of a W&B run file (`run-ID.wandb`): a 7-byte header (`:W&B`, magic, version), then LevelDB's log
    format: 32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last)
    and its bytes, each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's zero padding
            pos += left
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def key(item) -> str:
    """An item's name: W&B stores `train/loss` as the nested key ("train", "loss")."""
    return item.key or "/".join(item.nested_key)


def wandb_run(wandb_dir: Path, run_id: str) -> dict:
    """What every offline run file of `run_id` holds: its history by tag, its config and its summary."""
    history, config, summary, files = {}, {}, {}, sorted(glob.glob(f"{wandb_dir}/wandb/offline-run-*-{run_id}/"
                                                                    f"run-{run_id}.wandb"))
    for file in files:
        for r in wandb_records(Path(file)):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                for item in r.history.item:
                    if not key(item).startswith("_"):
                        history.setdefault(key(item), []).append((r.history.step.num, json.loads(item.value_json)))
            elif kind == "run":
                config.update({key(i): json.loads(i.value_json) for i in r.run.config.update if key(i) != "_wandb"})
            elif kind == "summary":
                summary.update({key(i): json.loads(i.value_json) for i in r.summary.update
                                if not key(i).startswith("_")})
    return {"legs": len(files), "history": history, "config": config, "summary": summary}


def by_tag(rows) -> dict[str, list[tuple[int, float]]]:
    found = {}
    for row in rows:
        for tag, value in trackers.values_of(row).items():
            found.setdefault(tag, []).append((row["step"], value))
    return found


def empty_mlflow_store(cache, dest: Path) -> str:
    """A new sqlite MLflow store at `dest`, as the tracking URI. MLflow builds one by running its ~100 schema
    migrations (9 s on a busy 2-core machine, more than everything else here), so the empty store it built is kept
    in pytest's cache, per MLflow version, and copied (built where it is needed under `-p no:cacheprovider`)."""
    import mlflow

    if cache is None:
        mlflow.tracking.MlflowClient(f"sqlite:///{dest}").search_experiments()
        return f"sqlite:///{dest}"
    kept = Path(cache.mkdir(f"mlflow-{mlflow.__version__}-empty-store")) / "mlflow.db"
    if not kept.is_file():
        building = kept.with_name(f".{os.getpid()}.db")
        mlflow.tracking.MlflowClient(f"sqlite:///{building}").search_experiments()  # creates the tables
        os.replace(building, kept)
    shutil.copy(kept, dest)
    return f"sqlite:///{dest}"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_ckpt, pytestconfig):
    """One tiny run reported to W&B (offline) and MLflow (sqlite), 4 steps, then resumed from its step 2 to 6 steps:
    the resume repeats steps 3 and 4 and adds 5 and 6."""
    tmp = tmp_path_factory.mktemp("tracked")
    store = empty_mlflow_store(getattr(pytestconfig, "cache", None), tmp / "mlflow.db")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(tmp))
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_PROJECT", "tests")
        env.setenv("MLFLOW_TRACKING_URI", store)
        env.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
        settings = dict(report_to="wandb,mlflow", steps=4, eval_every=2, eval_data=str(GUANACO_SAMPLE), save_every=2,
                        keep_checkpoints=3)
        first_summary, first_rows = run(tmp, tiny_ckpt, **settings)
        out = tmp / "run"
        first_ids = json.loads((out / "trackers.json").read_text())
        first_config = json.loads((out / "config.json").read_text())
        summary, _ = run(tmp, tiny_ckpt, **{**settings, "steps": 6, "resume": str(out / "checkpoint-2")})
    return dict(tmp=tmp, out=out, first_rows=first_rows, first_summary=first_summary, first_ids=first_ids,
                first_config=first_config, summary=summary, rows=metrics(out),
                ids=json.loads((out / "trackers.json").read_text()))


def sent(t) -> dict:
    """What the trackers should hold: the first leg's rows, then the resumed leg's past step 4 (W&B and MLflow
    cannot replace a value, so the repeated steps 3 and 4 are not sent again)."""
    return by_tag(t["first_rows"] + [r for r in t["rows"] if r["step"] > 4])


@NEEDS_BOTH
def test_wandb_offline_run_files_hold_every_metric_the_config_and_the_summary(tracked):
    wandb_id = tracked["ids"]["wandb"]["id"]
    assert wandb_id == tracked["first_ids"]["wandb"]["id"]  # the resumed leg continued the same run
    found = wandb_run(tracked["tmp"], wandb_id)
    assert found["legs"] == 2
    want = sent(tracked)
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/ppl"} <= want.keys()
    assert [s for s, _ in want["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert found["history"] == want  # every value, at its step, once, exactly (JSON carries the float64)
    assert found["config"] == {**tracked["first_config"], "steps": 6,
                               "resume": str(tracked["out"] / "checkpoint-2")}  # the resumed leg's settings
    assert found["summary"]["last_loss"] == tracked["summary"]["last_loss"]
    assert found["summary"]["steps"] == 6


@NEEDS_BOTH
def test_mlflow_sqlite_store_holds_every_metric_the_params_and_the_summary(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked['tmp']}/mlflow.db")
    run_id = tracked["ids"]["mlflow"]["run_id"]
    assert run_id == tracked["first_ids"]["mlflow"]["run_id"]
    experiment = client.get_experiment_by_name("tests")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]  # one run, resumed
    for tag, points in sent(tracked).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))
        assert got == points, tag
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED"
    assert found.info.run_name == "run"  # the --out folder's name
    assert found.data.params == {k: str(v) for k, v in tracked["first_config"].items()}  # params never change
    assert found.data.metrics["summary/last_loss"] == tracked["summary"]["last_loss"]
    assert found.data.metrics["summary/steps"] == 6


class Recording:
    """A tracker that keeps what it is sent."""

    def __init__(self, name, continues):
        self.name, self.continues, self.sent, self.summary = name, continues, [], None

    def log(self, values, step):
        self.sent.append((step, values))

    def finish(self, summary):
        self.summary = summary


def test_a_tracker_that_fails_mid_run_is_one_warning_and_the_rows_go_on(tmp_path, monkeypatch):
    class Failing:
        name, continues, calls = "wandb", False, 0

        def log(self, values, step):
            Failing.calls += 1
            raise ConnectionError("the server went away")

    said = []
    m = report.Metrics(tmp_path, [Failing()], log=said.append)
    for step in (1, 2, 3):
        m.write({"step": step, "split": "train", "loss": 1.0 / step})
    m.close({"steps": 3})
    assert Failing.calls == 1  # dropped after its first failure
    assert len(said) == 1 and "wandb failed (ConnectionError: the server went away)" in said[0]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]


def test_only_the_main_process_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "start_tensorboard", lambda *args: pytest.fail("another process started one"))
    tracker = Recording("wandb", False)
    m = report.Metrics(tmp_path, [tracker], tensorboard=True, enabled=False)
    m.write({"step": 1, "split": "train", "loss": 1.0})
    assert tracker.sent == [] and not (tmp_path / "metrics.jsonl").exists()


def refused(tmp_path, tiny_ckpt, **settings) -> str:
    with pytest.raises(SystemExit) as e:
        train.train(train.TrainConfig(model=str(tiny_ckpt), data=str(GUANACO_SAMPLE), out=str(tmp_path / "x"),
                                      **settings))
    assert not (tmp_path / "x").exists()  # refused before the output folder was touched
    return str(e.value)


def test_a_missing_package_is_refused_before_anything_loads_naming_the_extra(tmp_path, tiny_ckpt, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    message = refused(tmp_path, tiny_ckpt, report_to="mlflow")
    assert "--report-to mlflow needs the mlflow package" in message and "pip install -e .[mlflow]" in message


def test_an_unreachable_server_is_refused_before_anything_loads(tmp_path, tiny_ckpt, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(trackers, "missing_package", lambda name: None)  # installed or not: the server is asked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    message = refused(tmp_path, tiny_ckpt, report_to="mlflow")
    assert f"the tracking server http://127.0.0.1:{port} (MLFLOW_TRACKING_URI) cannot be reached" in message
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    message = refused(tmp_path, tiny_ckpt, report_to="wandb")
    assert f"the W&B server http://127.0.0.1:{port} cannot be reached" in message and "WANDB_MODE=offline" in message


def test_an_unknown_tracker_is_refused(tmp_path, tiny_ckpt):
    message = refused(tmp_path, tiny_ckpt, report_to="wandb,comet")
    assert "comet is no tracker this project reports to; expected some of tensorboard, wandb, mlflow" in message


@pytest.mark.parametrize("continues, want", [(False, [1, 2, 3, 4]), (True, [4])])
def test_a_new_tracker_run_gets_the_earlier_rows_and_a_continued_one_only_new_steps(tmp_path, monkeypatch,
                                                                                      continues, want):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) + "\n"
                                                    for s in (1, 2, 3)))
    tracker = Recording("mlflow", continues)
    m = report.Metrics(tmp_path, [tracker], start_step=2, logged_through=3)  # resumed at 2; 3 was sent already
    m.write({"step": 4, "split": "train", "loss": 0.25, "tokens_per_s": None})
    m.close({"steps": 4, "last_loss": 0.25})
    assert [step for step, _ in tracker.sent] == want
    assert tracker.sent[-1] == (4, {"train/loss": 0.25})  # numbers only, under their tags
    assert tracker.summary == {"steps": 4, "last_loss": 0.25}


def test_report_to_names_each_tracker_once_and_tensorboard_is_its_shorthand():
    cfg = train.TrainConfig(report_to=" wandb,MLflow,wandb ", tensorboard=True)
    assert trackers.requested(cfg) == ["wandb", "mlflow", "tensorboard"]
    assert trackers.requested(train.TrainConfig(report_to="none")) == []


def test_a_tracker_that_cannot_start_stops_the_run_before_the_model_loads(tmp_path, tiny_ckpt, monkeypatch):
    def no_login(*args, **kwargs):
        raise PermissionError("api_key not configured (no-tty)\nrun wandb login")

    monkeypatch.setenv("WANDB_MODE", "offline")  # no server to check first
    monkeypatch.setattr(trackers, "missing_package", lambda name: None)  # installed or not: its start fails
    monkeypatch.setattr(trackers, "WandB", no_login)
    monkeypatch.setattr(train, "load_run", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(TrainingError, match=r"^--report-to wandb: could not start its run \(PermissionError: "
                                            r"api_key not configured \(no-tty\)\)$"):
        train.train(train.TrainConfig(model=str(tiny_ckpt), data=str(GUANACO_SAMPLE), out=str(tmp_path / "x"),
                                      max_len=128, report_to="wandb"))
    assert not (tmp_path / "x" / "config.json").exists()
