"""Several `train.py` runs, one after another, in one torchrun launch: `torchrun --nproc_per_node 2
tests/torchrun_runs.py RUNS.json`, RUNS.json a list of {"argv": [...train.py flags], "log": PATH, "port": a free port}.

Each process writes what a run prints to `PATH.<rank>` (stdout and stderr together) and its exit status to
`PATH.<rank>.status`. A torchrun launch costs about 10 s of CPU before training starts (the launcher, and torch
and torch._dynamo imported in every worker); the tests' two-process runs each train for well under a second, so
they share one launch. Each run makes and tears down its own process group (`training.parallel`), as it does
when launched alone, on a store of its own (rank 0 serves it on the run's port): in torchrun's one store, a second
run's groups would meet the keys the first run's device mesh left there and wait for peers that never come."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402  (the project root, put on the path above)


def main(spec_file: str) -> None:
    rank = os.environ.get("RANK", "0")
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 serves each run's store on MASTER_PORT
    for spec in json.loads(Path(spec_file).read_text()):
        os.environ["MASTER_PORT"] = str(spec["port"])
        log = Path(f"{spec['log']}.{rank}")
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


if __name__ == "__main__":
    main(sys.argv[1])
