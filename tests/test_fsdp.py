"""Two gloo processes (CPU): data parallel and --fsdp train as one process accumulating the same micro-batches
(dropout on, a clip that fires), checkpoints that resume with another number of processes and any split of the
same rows per step, HSDP on both 2-process meshes, FSDP-QLoRA, the bytes each process holds, preference
objectives (ORPO data parallel, DPO sharded), only the main process reporting to trackers, and a stopped process
ending the run within --dist-timeout. Every two-process run here shares one torchrun launch (`launched`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from test_train import assert_same_adapters

from helpers import GUANACO_SAMPLE, ROOT, free_port, hf_checkpoint, metrics, run, train_losses

CLIP, LR = 0.005, 5e-2


def _data(tmp_path):
    rows = GUANACO_SAMPLE.read_text().splitlines()
    data = tmp_path / "seventeen.jsonl"
    # One conversation held out for evaluation, 16 trained on: 4 optimizer steps of 4 rows, one epoch, cut alike by
    # every setting compared.
    data.write_text("\n".join((rows * 2)[:17]) + "\n")
    return data


def _args(tmp_path, ckpt, *extra, dropout=0.3):
    # One held-out conversation: one process evaluates it, the other an empty share (in lockstep, see
    # training.step.evaluate), and the eval loss is the single process's.
    return ["--model", str(ckpt), "--data", str(_data(tmp_path)), "--eval-data", "auto", "--eval-every", "2",
            "--rank", "4", "--alpha", "8", "--grad-accum", "1", "--grad-clip", str(CLIP), "--dropout", str(dropout),
            "--lr", str(LR), "--warmup", "0", "--max-len", "128", "--steps", "4", "--save-every", "2",
            "--keep-checkpoints", "0", "--no-group-by-length", "--log-every", "1", "--no-samples",
            "--batch-size", "2", *extra]


def _torchrun(tmp_path, runs: dict[str, list[str] | dict]) -> dict[str, str]:
    """The runs {name: train.py flags, or {"argv": flags, ...tests/torchrun_runs.py's options}} one after another
    in one 2-process torchrun launch (tests/torchrun_runs.py: a launch costs ~10 s of CPU, a run here well under
    one), each into tmp_path / name; what rank 0 printed for each. Every run must end with status 0 on both
    processes, except one with `stop_rank_1` (whose rank 0 must fail: `test_a_stopped_worker_ends_the_run...`)."""
    runs = {name: spec if isinstance(spec, dict) else {"argv": spec} for name, spec in runs.items()}
    specs = []
    for name, spec in runs.items():
        # A run failing on one process alone leaves the other waiting in a collective: --dist-timeout ends that.
        timeout = [] if "--dist-timeout" in spec["argv"] else ["--dist-timeout", "60"]
        specs.append({**spec, "argv": [*spec["argv"], *timeout, "--out", str(tmp_path / name)],
                      "log": str(tmp_path / f"{name}.log"), "port": free_port()})
    (tmp_path / "runs.json").write_text(json.dumps(specs))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "tests/torchrun_runs.py", str(tmp_path / "runs.json")],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    logs = {}
    for name, spec in runs.items():
        for rank in (0, 1):
            log = tmp_path / f"{name}.log.{rank}"
            status = (tmp_path / f"{name}.log.{rank}.status")
            assert status.is_file(), (name, rank, proc.stderr[-3000:])
            if not spec.get("stop_rank_1"):
                assert status.read_text() == "0", (name, rank, log.read_text()[-3000:] if log.is_file() else "")
        logs[name] = (tmp_path / f"{name}.log.0").read_text()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logs


def _settings(tmp_path, **overrides):
    return {**dict(data=str(_data(tmp_path)), dropout=0.3, grad_clip=CLIP, lr=LR, steps=4, save_every=2,
                   keep_checkpoints=0, eval_data="auto", eval_every=2), **overrides}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_ckpt):
    """One process accumulating the two micro-batches that two processes run side by side, drawing the same
    dropout masks (`train.dropout_seed`)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    summary, rows = run(tmp, tiny_ckpt, "single", batch_size=2, grad_accum=2, **_settings(tmp))
    return tmp / "single", summary, rows


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_ckpt, single):
    """Every two-process run of this module, in one torchrun launch: ({name: folder}, {name: rank 0's output})."""
    tmp = tmp_path_factory.mktemp("torchrun")
    runs = {
        # What `single` runs, two FSDP processes of 2 rows side by side, both asked to report to TensorBoard and
        # W&B (only the main one may: test_only_the_main_process_reports_to_trackers; W&B's calls recorded, its
        # own service would cost this launch seconds).
        "fsdp": {"argv": _args(tmp, tiny_ckpt, "--fsdp", "--report-to", "tensorboard,wandb"), "record_wandb": True},
        "hsdp21": _args(tmp, tiny_ckpt, "--fsdp", "hybrid", "--fsdp-shard-size", "1"),
        "fsdp_no_dropout": _args(tmp, tiny_ckpt, "--fsdp", dropout=0.0),
        "qlora": _args(tmp, tiny_ckpt, "--fsdp", "--quantize", "nf4"),
        # 1 plain process -> 2 processes, HSDP on a 1 x 2 mesh (both processes one shard group, one replica).
        "hsdp12": _args(tmp, tiny_ckpt, "--fsdp", "hybrid", "--resume", str(single[0] / "checkpoint-2")),
        "ddp": _ddp_args(tmp, tiny_ckpt),
        "phi3": ["--model", str(_phi3(tmp)), *_phi3_flags(), "--batch-size=2", "--grad-accum=1", "--no-samples",
                 "--fsdp"],
        "orpo": [*_pref_args(_pair_files(tmp, tiny_ckpt), tiny_ckpt, "orpo"), "--batch-size", "4"],
        "dpo_fsdp": [*_pref_args(_pair_files(tmp, tiny_ckpt), tiny_ckpt, "dpo", **DPO_FSDP), "--batch-size", "2",
                     "--fsdp"],
        # Last: its second process stops itself once the first checkpoint is written.
        "stopped": {"argv": STOPPED + ["--model", str(tiny_ckpt)], "stop_rank_1": True},
    }
    logs = _torchrun(tmp, runs)
    return {name: tmp / name for name in runs}, logs


@pytest.fixture(scope="module")
def two_processes(launched):
    """What `single` runs, on two FSDP processes of --batch-size 2 side by side."""
    folders, logs = launched
    return folders["fsdp"], logs["fsdp"]


@pytest.fixture(scope="module")
def whole_batch(tmp_path_factory, tiny_ckpt):
    """Without dropout: one process taking each step's 4 rows at once, as a resumed leg with another number of
    processes may (the data stream's position counts optimizer steps, whatever their split)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    summary, rows = run(tmp, tiny_ckpt, "whole", batch_size=4, **_settings(tmp, dropout=0.0))
    return tmp / "whole", summary, rows


# Two processes sum a step's gradients and its gradient norm (sharded: shard by shard) in another order than one
# process accumulating the same micro-batches, or 4 rows at once, so they differ in the last float32 bits. Adam
# at this lr (5e-2) moves a weight whose gradients are tiny by up to lr a step whatever their size, and turns
# those bits into up to 1e-4 absolute (4e-5 seen, on one weight of 0.11). Losses and gradient norms, checked
# first, agree to 1e-5 and 1e-4: a gradient not reduced, or reduced twice, moves them far more.
REORDERED = dict(rtol=1e-3, atol=1e-4)


def _planned(ckpt, world, **kwargs):
    import torch

    import lora
    from tinyllama.checkpoint import model_config
    from training.fsdp import planned_param_bytes

    return planned_param_bytes(model_config(str(ckpt)), lora.LoRAConfig(rank=4, alpha=8.0), world=world,
                               dtype=torch.float32, **kwargs)


def _assert_same_run(folder, reference, **tolerance):
    reference, _, rows = reference
    got = metrics(folder)
    assert train_losses(got) == pytest.approx(train_losses(rows), rel=1e-5)
    evals = [[r["loss"] for r in x if r["split"] == "eval"] for x in (got, rows)]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], rel=1e-5)
    norms = [[r["grad_norm"] for r in x if r["split"] == "train"] for x in (got, rows)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    assert min(norms[1]) > 3 * CLIP  # clipping fired at every step
    assert_same_adapters(reference, folder, **(tolerance or REORDERED))


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_hold_half_the_bytes(tiny_ckpt, single, two_processes):
    folder, log = two_processes
    assert "sharded with FSDP2 over a 2 mesh (shard)" in log
    _assert_same_run(folder, single)
    for step in (2, 4):  # checkpoints hold the whole adapter and optimizer state, as one process writes them
        assert_same_adapters(single[0] / f"checkpoint-{step}", folder / f"checkpoint-{step}", **REORDERED)
    sharded = json.loads((folder / "summary.json").read_text())["param_bytes_per_process"]
    whole = single[1]["param_bytes_per_process"]
    assert 0 < sharded <= 0.6 * whole, (sharded, whole)
    # The README's table is computed from the shapes: the same computation gives what was measured here.
    assert [_planned(tiny_ckpt, world) for world in (1, 2)] == [whole, sharded]


@pytest.mark.slow
def test_only_the_main_process_reports_to_trackers(launched):
    """Both FSDP processes were given --report-to tensorboard,wandb and the same --out: a second reporting process
    would leave a second event file beside the first (each writer names its file by host and process id), and
    would start a W&B run of its own."""
    from test_tensorboard import assert_same, from_jsonl, scalars
    from test_trackers import by_tag

    folder = launched[0]["fsdp"]
    assert len(list((folder / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_same(scalars(folder / "tensorboard"), from_jsonl(metrics(folder)))  # every step's every value, once
    assert not (folder.parent / "fsdp.log.1.wandb").exists()
    calls = [json.loads(line) for line in (folder.parent / "fsdp.log.0.wandb").read_text().splitlines()]
    assert [c["call"] for c in calls] == ["init", *["log"] * len(metrics(folder)), "finish"]
    assert calls[0]["config"] == json.loads((folder / "config.json").read_text())
    logged = {}
    for c in calls[1:-1]:
        for tag, value in c["values"].items():
            logged.setdefault(tag, []).append((c["step"], value))
    assert logged == by_tag(metrics(folder))  # every step's every value, once
    assert calls[-1]["summary"] == json.loads((folder / "summary.json").read_text())


# A 2-process FSDP job (every layer's forward and backward pass is a collective) whose second process is stopped
# (SIGSTOP: its sockets stay open) once the first checkpoint is written. The first process waits for it that long,
# and the whole launch with it.
DIST_TIMEOUT = 2
STOPPED = ["--data", str(GUANACO_SAMPLE), "--eval-data", "none", "--rank", "4", "--max-len", "128", "--steps",
           "100000", "--batch-size", "2", "--grad-accum", "1", "--log-every", "1", "--no-samples", "--dist-timeout",
           str(DIST_TIMEOUT), "--save-every", "1", "--fsdp"]


@pytest.mark.slow
def test_a_stopped_worker_ends_the_run_after_dist_timeout_not_thirty_minutes(launched):
    import lora
    from training import run_folder

    folder, log = launched[0]["stopped"], launched[1]["stopped"]
    ended = (folder.parent / "stopped.log.0.status")
    waited = ended.stat().st_mtime - float((folder.parent / "stopped.log.stopped").read_text())
    assert waited < DIST_TIMEOUT + 20, f"rank 0 was still waiting {waited:.0f} s after its peer stopped"
    assert ended.read_text() != "0"
    assert "another process stopped answering within --dist-timeout" in log, log[-3000:]
    checkpoint = run_folder.find_checkpoint(folder)  # what --resume continues from: whole, readable
    assert checkpoint is not None and run_folder.read_state(checkpoint)["step"] >= 1
    assert run_folder.resume_problems(str(folder), lora.read_adapter_config(checkpoint)) == []


@pytest.mark.slow
def test_hsdp_2x1_equals_one_process(launched, single):
    """Each process whole, gradients all-reduced across the two replicas."""
    folders, logs = launched
    assert "over a 2x1 mesh (replicate, shard)" in logs["hsdp21"]
    _assert_same_run(folders["hsdp21"], single)


@pytest.mark.slow
def test_checkpoints_resume_with_another_number_of_processes(tmp_path, tiny_ckpt, whole_batch, launched):
    # 2 FSDP processes -> 1 plain process: the uninterrupted run's adapter.
    fsdp = launched[0]["fsdp_no_dropout"]
    _assert_same_run(fsdp, whole_batch, **REORDERED)
    run(tmp_path, tiny_ckpt, "resumed", batch_size=4, resume=str(fsdp / "checkpoint-2"),
        **_settings(tmp_path, dropout=0.0))
    assert_same_adapters(whole_batch[0], tmp_path / "resumed", **REORDERED)


@pytest.mark.slow
def test_checkpoints_resume_on_another_split_of_the_same_rows_per_step(tmp_path, tiny_ckpt, single, two_processes,
                                                                      launched):
    """2 processes of --batch-size 2 -> 1 process of --batch-size 2 --grad-accum 2, and back: 4 rows a step, each
    micro-batch the same rows in the same slot of the step, so even with dropout on (the masks are keyed by slot)
    the resumed run reaches the uninterrupted one's adapter."""
    run(tmp_path, tiny_ckpt, "one", batch_size=2, grad_accum=2, resume=str(two_processes[0] / "checkpoint-2"),
        **_settings(tmp_path))
    _assert_same_run(tmp_path / "one", single)
    # 1 plain process -> 2 processes, HSDP on a 1 x 2 mesh (both processes one shard group, one replica).
    folders, logs = launched
    assert "over a 1x2 mesh (replicate, shard)" in logs["hsdp12"]
    _assert_same_run(folders["hsdp12"], single)


@pytest.mark.slow
def test_fsdp_qlora_two_processes_equal_one(tmp_path, tiny_ckpt, launched):
    """The NF4 base sharded too: its packed weights and scales are frozen parameters FSDP shards and gathers."""
    _, rows = run(tmp_path, tiny_ckpt, "single", batch_size=2, grad_accum=2, quantize="nf4", **_settings(tmp_path))
    qlora = launched[0]["qlora"]
    _assert_same_run(qlora, (tmp_path / "single", None, rows))
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (tmp_path / "single", qlora)]
    assert summaries[0]["total_params"] == summaries[1]["total_params"]  # the storage is not counted as weights
    assert summaries[1]["param_bytes_per_process"] <= 0.6 * summaries[0]["param_bytes_per_process"]
    assert [_planned(tiny_ckpt, world, quantize=True) for world in (1, 2)] == [
        s["param_bytes_per_process"] for s in summaries]


def _ddp_data(tmp_path):
    rows = GUANACO_SAMPLE.read_text().splitlines()
    data = tmp_path / "sixteen.jsonl"
    data.write_text("\n".join((rows * 2)[:16]) + "\n")
    return data


DDP = dict(dropout=0.3, grad_clip=0.005, lr=5e-2, eval_data="auto", eval_every=2)


def _ddp_args(tmp_path, ckpt):
    # One held-out conversation (2% of 16, at least 1): the second process's share of it is empty, and it still
    # joins the evaluation's sums.
    return ["--model", str(ckpt), "--data", str(_ddp_data(tmp_path)), "--eval-data", "auto", "--eval-every", "2",
            "--rank", "4", "--alpha", "8", "--grad-accum", "1", "--grad-clip", str(DDP["grad_clip"]),
            "--dropout", str(DDP["dropout"]), "--lr", str(DDP["lr"]), "--warmup", "0", "--max-len", "128",
            "--steps", "3", "--no-group-by-length", "--log-every", "1", "--no-samples", "--batch-size", "2"]


@pytest.mark.slow
def test_data_parallel_two_processes_equal_one(tmp_path, tiny_ckpt, launched):
    # Dropout on: each rank draws its own masks, those one process accumulating the same two micro-batches
    # draws (`train.dropout_seed`), so the runs agree; with one shared stream they could not. 16 rows: both
    # settings cut the epoch into the same steps. Clipping fires at every step (the norms are several
    # times the clip): it must act on the summed gradient, after the all-reduce, as in the single process. A high
    # lr, so that a different update shows in the losses (clipping each rank's part moves them by ~1e-4).
    common = dict(DDP, data=str(_ddp_data(tmp_path)))
    _, single = run(tmp_path, tiny_ckpt, "single", batch_size=2, grad_accum=2, **common)
    _, shared = run(tmp_path, tiny_ckpt, "shared", batch_size=4, **common)  # one mask stream
    assert shared[0]["grad_norm"] != pytest.approx(single[0]["grad_norm"], rel=1e-3)  # the masks matter
    ddp_folder = launched[0]["ddp"]
    ddp = metrics(ddp_folder)
    assert train_losses(ddp) == pytest.approx(train_losses(single), rel=1e-5)
    evals = [[r for r in rows if r["split"] == "eval"] for rows in (ddp, single)]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [2, 3]
    assert [r["loss"] for r in evals[0]] == pytest.approx([r["loss"] for r in evals[1]], rel=1e-5)
    norms = [[r["grad_norm"] for r in rows if r["split"] == "train"] for rows in (ddp, single)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    assert_same_adapters(tmp_path / "single", ddp_folder, atol=1e-5)
    assert min(norms[1]) > 3 * DDP["grad_clip"]  # the logged norm is the one before clipping


def _phi3(tmp_path):
    from test_model_families import FAMILY_CONFIGS

    return hf_checkpoint(tmp_path / "phi3-base", seed=1, **FAMILY_CONFIGS["phi3"])


PHI3 = dict(data="random:16", max_len=32, targets="all", rank=4, alpha=8.0, dropout=0.0, lr=5e-2, grad_clip=0.005,
            steps=2, warmup=0, log_every=1, group_by_length=False)


def _phi3_flags():
    flags = [f"--{k.replace('_', '-')}" + ("" if v is False else f"={v}") for k, v in PHI3.items()]
    return [f.replace("--group-by-length", "--no-group-by-length") for f in flags]


@pytest.mark.slow
def test_phi3_under_fsdp_trains_as_one_process(tmp_path, launched):
    """Phi-3, the family whose weights differ most from Llama's (fused qkv_proj and gate_up_proj, partial
    rotary, a window on every layer), sharded on 2 gloo processes: one process's losses, gradient norms (a clip
    that fires) and adapter."""
    run(tmp_path, _phi3(tmp_path), "single", batch_size=2, grad_accum=2, **PHI3)
    sharded_folder = launched[0]["phi3"]
    single, sharded = metrics(tmp_path / "single"), metrics(sharded_folder)
    assert len(train_losses(single)) == 2
    assert train_losses(sharded) == pytest.approx(train_losses(single), rel=1e-5)
    norms = [[r["grad_norm"] for r in x if r["split"] == "train"] for x in (sharded, single)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4) and min(norms[1]) > 3 * PHI3["grad_clip"]
    assert_same_adapters(tmp_path / "single", sharded_folder, rtol=1e-4, atol=1e-6)


def _pair_files(tmp_path, ckpt):
    """8 preference pairs, 5 held-out ones and an initial adapter (test_preference_train's `files`)."""
    from test_preference_train import pairs

    import lora
    from helpers import randomize_lora_b
    from tinyllama import load_model

    folder = tmp_path / "prefs"
    if not folder.is_dir():
        folder.mkdir()
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(8)))
        (folder / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(5)))
        config = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("gate_proj", "up_proj", "down_proj"))
        model = randomize_lora_b(load_model(ckpt, lora_config=config), std=0.2, seed=1)
        lora.save_adapter(model, folder / "init", base_model=str(ckpt))
    return folder


def _pref_args(files, ckpt, objective, grad_clip=0.0, eval_data=None):
    return ["--model", str(ckpt), "--data", str(files / "pairs.jsonl"), "--objective", objective,
            "--eval-data", str(files / eval_data) if eval_data else "none", "--eval-every", "2",
            "--init-adapter", str(files / "init"), "--grad-accum", "1", "--dropout", "0", "--lr", "1e-2",
            "--warmup", "0", "--schedule", "constant", "--grad-clip", str(grad_clip), "--max-len", "32",
            "--steps", "3", "--no-group-by-length", "--log-every", "1", "--no-samples"]


@pytest.mark.slow
def test_orpo_on_two_processes_equals_one_batch(tmp_path, tiny_ckpt, launched):
    # ORPO: the ranks hold different numbers of chosen tokens, so the NLL must be divided by the step's count over
    # both processes, and the pair losses by both processes' pairs.
    from test_preference_train import assert_same_rows, pref_run

    files = launched[0]["orpo"].parent / "prefs"
    _, one = pref_run(tmp_path, tiny_ckpt, files, "one", objective="orpo", init_adapter=str(files / "init"))
    ddp = launched[0]["orpo"]
    assert_same_rows([r for r in metrics(ddp) if r["split"] == "train"], one)
    assert_same_adapters(tmp_path / "one", ddp, rtol=1e-4, atol=1e-6)


# 5 held-out pairs: one process evaluates 2 micro-batches of 2, the other 1, and runs a stand-in pair while its
# peer evaluates the second (a sharded forward pass is a collective). The clip fires at every step.
DPO_FSDP = dict(grad_clip=0.05, eval_data="held_out.jsonl")


@pytest.mark.slow
def test_dpo_under_fsdp_equals_one_process_with_the_whole_batch(tmp_path, tiny_ckpt, launched):
    """DPO from an initial adapter, sharded over 2 processes of 2 pairs: the reference is the base and a frozen
    copy of the initial adapter, sharded as the adapter is. Every reward is 0 at step 1, and each step's loss,
    metrics, gradient norm and held-out evaluation, and the adapter, are one process's with 4 pairs a step."""
    from test_preference_train import assert_same_rows, pref_run

    files = launched[0]["dpo_fsdp"].parent / "prefs"
    _, one = pref_run(tmp_path, tiny_ckpt, files, "one", batch_size=4, init_adapter=str(files / "init"),
                      eval_every=2, grad_clip=DPO_FSDP["grad_clip"], eval_data=str(files / DPO_FSDP["eval_data"]))
    sharded = metrics(launched[0]["dpo_fsdp"])
    assert "sharded with FSDP2 over a 2 mesh (shard)" in launched[1]["dpo_fsdp"]
    train_rows = [r for r in sharded if r["split"] == "train"]
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and train_rows[0]["rewards/margins"] == 0
    assert_same_rows(train_rows, one)
    norms = [[r["grad_norm"] for r in rows] for rows in (train_rows, one)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and min(norms[1]) > 3 * DPO_FSDP["grad_clip"]
    evals = [[r for r in rows if r["split"] == "eval"] for rows in (sharded, metrics(tmp_path / "one"))]
    assert [r["step"] for r in evals[0]] == [2, 3]
    assert_same_rows(*evals)
    assert_same_adapters(tmp_path / "one", launched[0]["dpo_fsdp"], **REORDERED)
