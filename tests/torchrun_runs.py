"""Several `train.py` runs, one after another, in one torchrun launch: `torchrun --nproc_per_node 2
tests/torchrun_runs.py RUNS.json`, RUNS.json a list of {"argv": [...train.py flags], "log": PATH, "port": a free port,
and optionally "record_wandb": true, "stop_rank_1": true}.

Each process writes what a run prints to `PATH.<rank>` (stdout and stderr together) and its exit status to
`PATH.<rank>.status`. A torchrun launch costs about 10 s of CPU before training starts (the launcher, and torch
and torch._dynamo imported in every worker); the tests' two-process runs each train for well under a second, so
they share one launch. Each run makes and tears down its own process group (`training.parallel`), as it does
when launched alone, on a store of its own (rank 0 serves it on the run's port): in torchrun's one store, a second
run's groups would meet the keys the first run's device mesh left there and wait for peers that never come.

- `record_wandb`: W&B's tracker (`training.trackers.WandB`) is replaced by one that writes each call it gets to
  `PATH.<rank>.wandb`, one JSON line a call: what each process would have reported, offline (no server to ask),
  without W&B's own service and whether or not the wandb package is installed.
- `stop_rank_1`: once the run's first checkpoint is written, rank 1 stops itself (SIGSTOP: stopped, not dead, its
  sockets stay open) after writing the time to `PATH.stopped`; rank 0, once its run has ended, wakes it (SIGCONT)
  so that it can fail in turn and the launch go on.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402  (the project root, put on the path above)
from training import report, trackers  # noqa: E402

# As in the test processes (tests/conftest.py): each run would measure the machine's matmul peak (for MFU), about
# 0.4 s of one CPU thread, more than a run here trains; measured once per process instead. And no run here draws
# loss.png (matplotlib's import and a plot, on the main process, while the other waits for it).
train.measure_matmul_peak = functools.cache(train.measure_matmul_peak)
report.plot_losses = lambda out, log=print: None
gc.set_threshold(10_000, 50, 100)  # the garbage collector's passes, rarer (tests/conftest.py says why)


def recording_wandb(path: Path):
    class Recorded:
        name, continues = "wandb", False

        def __init__(self, settings: dict, run_name: str, saved: dict):
            self.ids = {"id": "recorded", "project": "tests", "entity": None}
            self._write("init", run_name=run_name, config=settings)

        def _write(self, call: str, **values):
            with open(path, "a") as f:
                f.write(json.dumps({"call": call, **values}) + "\n")

        def log(self, values: dict, step: int) -> None:
            self._write("log", values=values, step=step)

        def finish(self, summary: dict) -> None:
            self._write("finish", summary=summary)

        def close(self, failed: bool = False) -> None:
            self._write("close", failed=failed)

    return Recorded


def stop_after_first_checkpoint(out: Path, stopped: Path) -> None:
    def watch():
        while not (out / "latest").is_file():
            time.sleep(0.02)
        Path(f"{stopped}.pid").write_text(str(os.getpid()))
        stopped.write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGSTOP)

    threading.Thread(target=watch, daemon=True).start()


def main(spec_file: str) -> None:
    rank = os.environ.get("RANK", "0")
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 serves each run's store on MASTER_PORT
    real_wandb, real_missing = trackers.WandB, trackers.missing_package
    for spec in json.loads(Path(spec_file).read_text()):
        os.environ["MASTER_PORT"] = str(spec["port"])
        log = Path(f"{spec['log']}.{rank}")
        trackers.WandB, trackers.missing_package = real_wandb, real_missing
        if spec.get("record_wandb"):
            trackers.WandB = recording_wandb(Path(f"{log}.wandb"))
            trackers.missing_package = lambda name: None if name == "wandb" else real_missing(name)
            os.environ["WANDB_MODE"] = "offline"  # what `trackers.unreachable` reads: no W&B server is asked
        stopped = Path(f"{spec['log']}.stopped")
        if spec.get("stop_rank_1") and rank == "1":
            stop_after_first_checkpoint(Path(spec["argv"][spec["argv"].index("--out") + 1]), stopped)
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                train.main(spec["argv"])
                status = 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=out)
            finally:  # a run that failed left its group behind; the next run makes its own
                if torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
        Path(f"{log}.status").write_text(str(status))
        if spec.get("stop_rank_1") and rank == "0" and Path(f"{stopped}.pid").is_file():
            os.kill(int(Path(f"{stopped}.pid").read_text()), signal.SIGCONT)


if __name__ == "__main__":
    main(sys.argv[1])
