"""The output folder: no run destroys another's work, `latest` always names a checkpoint that loads, resumed
runs keep one history, and a crash or a full disk leaves every folder whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import helpers
import lora
import train
from helpers import GUANACO_SAMPLE, adapter_weights, metrics, rerecord, snapshot, train_losses
from tinyllama import files
from training import TrainingError, run_folder

pytest.importorskip("transformers")

# What this file checks of a run folder does not depend on how long the rows are: 32 tokens a row train in a third
# of the time 128 take (the 32,000-way loss is most of a tiny run's time), over the ~60 runs here.
SHORT = dict(max_len=32)


def run(tmp_path, ckpt, name="run", **overrides):
    return helpers.run(tmp_path, ckpt, name, **{**SHORT, **overrides})


@pytest.fixture
def trained_run(trained_run):
    return lambda dest, **settings: trained_run(dest, **{**SHORT, **settings})


@pytest.fixture
def latest_always_loads(monkeypatch):
    """Check every checkpoint `latest` is made to name, at the moment it is named: complete, and it loads."""
    named = []
    real = run_folder.write_text

    def checked(path, text):
        real(path, text)
        if path.name == "latest":
            checkpoint = path.parent / text
            assert run_folder.is_checkpoint(checkpoint), f"latest names {checkpoint}, which is not complete"
            assert run_folder.read_state(checkpoint)["step"] == int(text.split("-")[1])
            run_folder.read_optimizer_state(checkpoint)
            lora.read_adapter_config(checkpoint)
            adapter_weights(checkpoint)
            named.append(text)

    monkeypatch.setattr(run_folder, "write_text", checked)
    return named


def assert_latest_loads(out):
    found = run_folder.find_checkpoint(out)
    assert found is not None and found.name == (out / "latest").read_text()
    assert run_folder.read_state(found)["step"] == int(found.name.split("-")[1])
    run_folder.read_optimizer_state(found)
    adapter_weights(found)


# ---- a fresh run never destroys another run -----------------------------------------------------------------

@pytest.mark.slow
def test_a_fresh_run_into_a_folder_holding_another_run_is_refused_and_touches_nothing(tmp_path, tiny_ckpt):
    run(tmp_path, tiny_ckpt, "out", steps=6, save_every=2)
    before = snapshot(tmp_path / "out")
    with pytest.raises(TrainingError, match=r"already holds a run .*--overwrite"):
        run(tmp_path, tiny_ckpt, "out", steps=3, save_every=1)
    assert snapshot(tmp_path / "out") == before


@pytest.mark.slow
def test_overwrite_replaces_the_earlier_run_and_latest_always_loads(tmp_path, tiny_ckpt, latest_always_loads):
    # The older run is longer, so its checkpoints have higher step numbers than the new run's: pruning must keep
    # the newest run's checkpoints, not the highest-numbered ones in the folder.
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=8, save_every=2)
    (out / "notes.txt").write_text("mine")
    _, rows = run(tmp_path, tiny_ckpt, "out", steps=3, save_every=1, overwrite=True)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert_latest_loads(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # the old run's rows are gone, not mixed in
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is cleared
    assert latest_always_loads[-3:] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


# ---- resuming from an earlier checkpoint starts a branch; nothing is deleted ----------------------------------

@pytest.mark.slow
def test_resuming_from_an_earlier_checkpoint_moves_the_later_ones_aside(tmp_path, tiny_ckpt, latest_always_loads):
    out = tmp_path / "out"
    common = dict(steps=8, save_every=2, keep_checkpoints=0, dropout=0.1)
    _, full = run(tmp_path, tiny_ckpt, "out", **common)
    later = {name: adapter_weights(out / name) for name in ("checkpoint-6", "checkpoint-8")}
    final = adapter_weights(out)
    _, rows = run(tmp_path, tiny_ckpt, "out", **{**common, "steps": 5}, resume=str(out / "checkpoint-4"))
    # The new branch: checkpoints 2, 4 (shared history) and 5; latest is valid; each step appears once.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert_latest_loads(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert train_losses(rows) == train_losses(full)[:5]
    # The old branch, whole: its later checkpoints, its final adapter and its metrics.
    (aside,) = out.glob("superseded-*-after-step-4")
    for name, weights in later.items():
        assert run_folder.is_checkpoint(aside / name)
        assert all(torch.equal(weights[k], v) for k, v in adapter_weights(aside / name).items())
    assert all(torch.equal(final[k], v) for k, v in adapter_weights(aside / "adapter").items())
    assert [r["step"] for r in metrics(aside)] == list(range(1, 9))
    assert json.loads((aside / "summary.json").read_text())["steps"] == 8


@pytest.mark.slow
def test_pruning_in_a_resumed_branch_keeps_its_own_newest_checkpoints(tmp_path, tiny_ckpt, latest_always_loads):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=8, save_every=2, keep_checkpoints=2)  # leaves 6 and 8
    run(tmp_path, tiny_ckpt, "out", steps=9, save_every=1, keep_checkpoints=2, resume=str(out / "checkpoint-6"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8", "checkpoint-9"]
    assert run_folder.read_state(out / "checkpoint-8")["step"] == 8
    assert_latest_loads(out)
    (aside,) = out.glob("superseded-*")
    assert run_folder.is_checkpoint(aside / "checkpoint-8")  # the old branch's step 8, not the new one


@pytest.mark.slow
def test_a_crash_while_saving_a_checkpoint_leaves_latest_valid(tmp_path, tiny_ckpt, monkeypatch):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=6, save_every=2, keep_checkpoints=0)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_ckpt, "out", steps=6, save_every=1, keep_checkpoints=1, resume=str(out / "checkpoint-2"))
    assert (out / "latest").read_text() == "checkpoint-2"
    assert_latest_loads(out)
    assert not (out / "checkpoint-3").exists()


# ---- the final adapter is written whole ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_crash_while_saving_the_final_adapter_leaves_the_previous_one_whole(tmp_path, tiny_ckpt, trained_run,
                                                                              monkeypatch):
    out = tmp_path / "out"
    trained_run(out, steps=2, save_every=2)
    before = snapshot(out / "adapter")
    real = files.write_file

    def dies_on_the_config(path, write):
        if path.name == lora.adapter.CONFIG_NAME:
            raise KeyboardInterrupt("killed between the weights and the config")
        real(path, write)

    monkeypatch.setattr(files, "write_file", dies_on_the_config)
    with pytest.raises(KeyboardInterrupt):  # the weights were written, then the process died
        run(tmp_path, tiny_ckpt, "out", steps=4, save_every=0, resume=str(out))
    assert snapshot(out / "adapter") == before


def test_replace_dir_swaps_a_whole_folder(tmp_path):
    final, new = tmp_path / "adapter", tmp_path / "new"
    final.mkdir()
    (final / "a").write_text("old")
    (final / "b").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    files.replace_dir(new, final)
    assert snapshot(final) == {"a": b"new"} and not new.exists()


# ---- a full disk ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_inside_torch_save_ends_with_a_message_and_keeps_the_last_checkpoint(tmp_path, tiny_ckpt,
                                                                                           trained_run, monkeypatch):
    out = tmp_path / "out"
    trained_run(out, steps=2, save_every=2)

    def full(obj, f, *a, **k):  # what PyTorch raises when the disk fills during torch.save
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TrainingError, match=r"could not write .*checkpoint-3 .*unexpected pos.*disk full"):
        run(tmp_path, tiny_ckpt, "out", steps=4, save_every=1, resume=str(out))
    assert not list(out.glob(".checkpoint-*"))  # no half-written folder left behind
    assert (out / "latest").read_text() == "checkpoint-2"
    assert_latest_loads(out)


@pytest.mark.slow
def test_a_full_disk_while_saving_the_adapter_ends_with_a_message(tmp_path, tiny_ckpt, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lora.adapter, "save_file", full)
    with pytest.raises(TrainingError, match=r"could not write .*adapter .*No space left on device"):
        run(tmp_path, tiny_ckpt, "out", steps=1)
    assert not (tmp_path / "out" / "adapter").exists() and not list((tmp_path / "out").glob(".adapter.*"))


# ---- one writer per folder ------------------------------------------------------------------------------------

def _hold_lock(out, ready, release):
    with run_folder.lock(out, print):
        ready.set()
        release.wait(60)


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(TrainingError, match=rf"in use by another run or export \(process {holder.pid} on "):
            run(tmp_path, tiny_ckpt, "out", steps=1)
        assert not (out / "metrics.jsonl").exists()
    finally:
        release.set()
        holder.join(30)


def _die_holding_the_lock(out):
    with run_folder.lock(out, print):
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_a_lock_whose_holder_was_killed_is_free_and_the_lock_file_stays(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    killed = multiprocessing.get_context("fork").Process(target=_die_holding_the_lock, args=(out,))
    killed.start()
    killed.join(30)
    assert killed.exitcode == -signal.SIGKILL and str(killed.pid) in (out / ".lock").read_text()
    run(tmp_path, tiny_ckpt, "out", steps=1)
    assert (out / ".lock").exists()  # never unlinked: another process may be about to lock that very file
    with pytest.raises(TrainingError, match="already holds a run"):  # a failed run releases it too
        run(tmp_path, tiny_ckpt, "out", steps=1)
    with run_folder.lock(out, print):
        pass


def _die_holding_the_locks(folders):
    with contextlib.ExitStack() as held:
        for out in folders:
            held.enter_context(run_folder.lock(out, print))
        os.kill(os.getpid(), signal.SIGKILL)


def _race_for_the_locks(trials, barrier):
    for out, journal in trials:  # every racer at the same trial: the barrier starts each one together
        barrier.wait()
        try:
            with run_folder.lock(out, print):
                with open(journal, "a") as f:  # O_APPEND: each short line lands whole
                    f.write(f"in {os.getpid()}\n")
                time.sleep(0.02)
                with open(journal, "a") as f:
                    f.write(f"out {os.getpid()}\n")
        except TrainingError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "after a killed holder"])
def test_racing_processes_never_hold_the_lock_together(tmp_path, stale):
    # 30 trials, each a folder four processes race for at once (the same four racers go through all of them: a
    # fork of the test process costs more than a trial). "After a killed holder": one process locked all 30
    # folders and was killed, so every race starts at a lock file naming a dead process.
    ctx = multiprocessing.get_context("fork")
    trials = [(tmp_path / f"out{trial}", tmp_path / f"journal{trial}") for trial in range(30)]
    if stale:
        killed = ctx.Process(target=_die_holding_the_locks, args=([out for out, _ in trials],))
        killed.start()
        killed.join(30)
        assert killed.exitcode == -signal.SIGKILL
        assert all(str(killed.pid) in (out / ".lock").read_text() for out, _ in trials)
    barrier = ctx.Barrier(4)
    racers = [ctx.Process(target=_race_for_the_locks, args=(trials, barrier)) for _ in range(4)]
    for r in racers:
        r.start()
    for r in racers:
        r.join(60)
    assert [r.exitcode for r in racers] == [0] * 4
    for trial, (_, journal) in enumerate(trials):
        holders, most = 0, 0
        for line in journal.read_text().splitlines():
            holders += 1 if line.startswith("in ") else -1
            most = max(most, holders)
        assert most == 1, f"trial {trial}: {most} processes held the lock at once"


def test_lock_refuses_an_unwritable_folder_before_anything_loads(tmp_path, tiny_ckpt, monkeypatch):
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("loaded a model into an unwritable out"))
    monkeypatch.setattr(run_folder.os, "open", read_only)
    with pytest.raises(TrainingError, match=r"cannot write to --out .*Read-only file system"):
        run(tmp_path, tiny_ckpt, "out", steps=1)


# ---- resume -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=3, save_every=3)
    before = snapshot(out)
    for steps in (3, 2):
        with pytest.raises(TrainingError, match=r"at step 3 .* already complete.*--steps N \(N > 3\)"):
            run(tmp_path, tiny_ckpt, "out", steps=steps, save_every=3, resume=str(out))
        assert snapshot(out) == before


@pytest.mark.slow
def test_a_resumed_run_keeps_one_row_per_step_and_sums_up_the_whole_run(tmp_path, tiny_ckpt, trained_run):
    out = tmp_path / "out"
    common = dict(steps=6, save_every=3, keep_checkpoints=0, dropout=0.1, eval_data=str(GUANACO_SAMPLE),
                  eval_every=2)
    full, full_rows = trained_run(tmp_path / "full", **common)
    trained_run(out, **common)  # the same run, a copy to cut short
    # Make it a run killed during step 6: rows up to step 5 written (the last one cut short), checkpoint-3 the
    # latest, no final adapter or summary.
    shutil.rmtree(out / "checkpoint-6")
    shutil.rmtree(out / "adapter")
    os.remove(out / "summary.json")
    run_folder.write_text(out / "latest", "checkpoint-3")
    kept = [json.dumps(r) for r in metrics(out) if r["step"] <= 5]
    (out / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 6, "spl')
    summary, resumed = run(tmp_path, tiny_ckpt, "out", **common, resume=str(out))
    assert [(r["step"], r["split"]) for r in resumed] == [(r["step"], r["split"]) for r in full_rows]
    assert train_losses(resumed) == train_losses(full_rows)
    assert summary["steps"] == 6 and summary["first_loss"] == full["first_loss"]
    assert summary["last_loss"] == full["last_loss"] and summary["eval_loss"] == full["eval_loss"]
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in resumed if r["split"] == "train")
    assert summary["tokens_per_s"] * summary["training_time_s"] == pytest.approx(tokens, rel=1e-6)


@pytest.mark.slow
def test_a_resume_with_changed_settings_says_what_changed(tmp_path, tiny_ckpt, trained_run, capsys):
    out = tmp_path / "out"
    trained_run(out, steps=2, save_every=2)
    capsys.readouterr()
    run(tmp_path, tiny_ckpt, "out", steps=4, save_every=2, lr=2e-2, schedule="linear", resume=str(out))
    said = capsys.readouterr().out
    assert "differ from the checkpoint's" in said
    for change in ("lr 0.01 -> 0.02", "steps 2 -> 4", "schedule 'cosine' -> 'linear'"):
        assert change in said


@pytest.mark.slow
def test_a_checkpoint_whose_state_would_run_code_is_refused(tmp_path, tiny_ckpt, trained_run):
    out = tmp_path / "out"
    trained_run(out, steps=2, save_every=2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(out / "checkpoint-2" / run_folder.OPTIMIZER, weights_only=True)
    state["extra"] = Payload()
    torch.save(state, out / "checkpoint-2" / run_folder.OPTIMIZER)
    rerecord(out / "checkpoint-2")
    with pytest.raises(TrainingError, match="not loaded .*could run code"):
        run(tmp_path, tiny_ckpt, "out", steps=4, resume=str(out))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the refusal is torch's weights-only unpickler
        torch.load(out / "checkpoint-2" / run_folder.OPTIMIZER, weights_only=True)


def test_pruning_never_removes_a_checkpoint_newer_than_the_one_written(tmp_path):
    # A checkpoint-100 copied in by hand: keeping "the N highest step numbers" would delete each new checkpoint
    # right after writing it, and leave `latest` naming a deleted folder.
    def adapter(folder):
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"")

    optimizer_state = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).state_dict()
    run_folder.save_checkpoint(tmp_path, 100, adapter, optimizer_state, {}, keep=1, adapter={})
    for step in (1, 2, 3):
        run_folder.save_checkpoint(tmp_path, step, adapter, optimizer_state, {}, keep=1, adapter={})
        assert run_folder.find_checkpoint(tmp_path).name == f"checkpoint-{step}"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-100", "checkpoint-3"]


# ---- --overwrite deletes only what a run of this project wrote (its manifest) ------------------------------------

def plant_others(out):
    """What no run of this project wrote, under names a run writes: another tool's checkpoint, a user's
    TensorBoard logs and a config.json, plus a file of the user's own."""
    hf = out / "checkpoint-500"  # an HF Trainer + PEFT checkpoint holds the very files ours do
    hf.mkdir(parents=True)
    for name in run_folder.CHECKPOINT_FILES:
        (hf / name).write_text(f"HF Trainer's {name}")
    (hf / run_folder.STATE).write_text(json.dumps({"global_step": 500, "log_history": []}))
    (out / "tensorboard" / "myexp").mkdir(parents=True)
    (out / "tensorboard" / "myexp" / "events.out").write_bytes(b"\x00user events")
    (out / "thesis.tex").write_text("\\chapter{mine}")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_holding_names_no_run_wrote_is_refused_even_with_overwrite(tmp_path, tiny_ckpt, overwrite):
    out = tmp_path / "out"
    plant_others(out)
    before = snapshot(out)
    with pytest.raises(TrainingError, match=r"holds checkpoint-500, tensorboard, which a run would write but no "
                                            r"run of this project wrote there"):
        run(tmp_path, tiny_ckpt, "out", steps=2, save_every=1, overwrite=overwrite)
    assert snapshot(out) == {**before, ".lock": (out / ".lock").read_bytes()}  # the lock it took to look, only


@pytest.mark.slow
@pytest.mark.plots
def test_overwrite_deletes_exactly_what_the_manifest_lists(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=4, save_every=2, keep_checkpoints=0, tensorboard=False)
    written = run_folder.listed(out)
    assert written == {p.name for p in out.iterdir() if not p.name.startswith(".")}  # every name, and no more
    (out / "thesis.tex").write_text("mine")
    (out / "adapter" / "my_notes.md").write_text("inside a folder the run wrote: not the run's any more")
    before = snapshot(out)
    with pytest.raises(TrainingError, match=r"^--overwrite: adapter in \S+ is listed in .run-manifest.json but is "
                                            r"not what the run recorded there .*nothing was removed"):
        run(tmp_path, tiny_ckpt, "out", steps=1, overwrite=True)
    assert snapshot(out) == before
    (out / "adapter" / "my_notes.md").unlink()
    run(tmp_path, tiny_ckpt, "out", steps=1, overwrite=True)
    assert (out / "thesis.tex").read_text() == "mine"
    assert not (out / "checkpoint-4").exists()
    assert run_folder.listed(out) == {p.name for p in out.iterdir() if not p.name.startswith(".")} - {"thesis.tex"}
    assert run_folder.listed(out) >= {"adapter", "config.json", "loss.png", "metrics.jsonl", "summary.json"}


def test_the_model_folder_or_one_holding_weights_is_never_an_output_folder(tmp_path, tiny_ckpt):
    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt, model)
    before = snapshot(model)
    for out in (model, tmp_path / "weights"):
        (tmp_path / "weights").mkdir(exist_ok=True)
        (tmp_path / "weights" / "model.safetensors").write_bytes(b"weights")
        with pytest.raises(TrainingError, match=r"(is the model folder|holds model weights)"):
            run(tmp_path, model, out.name, steps=1, overwrite=True)
    assert snapshot(model) == before and (tmp_path / "weights" / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.slow
def test_overwrite_refuses_a_symlink_where_the_run_wrote_a_folder_and_removes_nothing(tmp_path, tiny_ckpt, trained_run):
    out = tmp_path / "out"
    trained_run(out, steps=2, save_every=2)
    elsewhere = tmp_path / "kept"
    shutil.move(out / "adapter", elsewhere)
    (out / "adapter").symlink_to(elsewhere, target_is_directory=True)
    before, kept = snapshot(out), snapshot(elsewhere)
    with pytest.raises(TrainingError, match=r"adapter in .* is now a symbolic link.*nothing was removed"):
        run(tmp_path, tiny_ckpt, "out", steps=1, overwrite=True)
    assert snapshot(out) == before and snapshot(elsewhere) == kept


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_refused_with_advice_that_works(tmp_path, tiny_ckpt,
                                                                                    monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(train, "finish_step", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, tiny_ckpt, "out", steps=3)
    with pytest.raises(TrainingError, match="no checkpoint to resume") as refused:
        run(tmp_path, tiny_ckpt, "out", steps=3)
    assert "--resume" not in str(refused.value) and "--overwrite" in str(refused.value)
    summary, _ = run(tmp_path, tiny_ckpt, "out", steps=3, overwrite=True)  # what it advises works
    assert summary["steps"] == 3


# ---- a kill while the final adapter is written: --resume finishes the run ---------------------------------------

@pytest.mark.slow
def test_a_kill_while_writing_the_final_adapter_is_finished_by_resume(tmp_path, tiny_ckpt, monkeypatch):
    out = tmp_path / "out"
    full, _ = run(tmp_path, tiny_ckpt, "full", steps=4, save_every=2)
    real = lora.save_adapter

    def killed_in_the_final_adapter(model, folder, **kw):
        real(model, folder, **kw)
        if folder.name.startswith(".adapter.") and folder.name.endswith(".tmp"):
            raise KeyboardInterrupt("killed while writing the final adapter")

    with monkeypatch.context() as m:
        m.setattr(lora, "save_adapter", killed_in_the_final_adapter)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, tiny_ckpt, "out", steps=4, save_every=2)
    stale = list(out.glob(".adapter.*.tmp"))
    assert len(stale) == 1 and stale[0].is_dir()
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    summary, rows = run(tmp_path, tiny_ckpt, "out", steps=4, save_every=2, resume=str(out))
    assert not list(out.glob(".adapter.*"))
    assert adapter_weights(out).keys() == adapter_weights(out / "checkpoint-4").keys()
    assert all(torch.equal(v, adapter_weights(out / "checkpoint-4")[k]) for k, v in adapter_weights(out).items())
    assert all(torch.equal(v, adapter_weights(tmp_path / "full")[k]) for k, v in adapter_weights(out).items())
    assert summary["steps"] == 4 and summary["last_loss"] == full["last_loss"]
    assert json.loads((out / "summary.json").read_text())["first_loss"] == full["first_loss"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    with pytest.raises(TrainingError, match="already complete"):  # now it is
        run(tmp_path, tiny_ckpt, "out", steps=4, save_every=2, resume=str(out))


# ---- latest names a complete checkpoint at every point of a resume ------------------------------------------------

@pytest.mark.slow
def test_latest_names_a_complete_checkpoint_at_every_point_of_a_resume(tmp_path, tiny_ckpt, monkeypatch):
    base = tmp_path / "base"
    run(tmp_path, tiny_ckpt, "base", steps=8, save_every=2, keep_checkpoints=0)
    names = sorted(p.name for p in base.glob("checkpoint-*"))
    real_replace, real_copy = os.replace, shutil.copy2
    kill_at = 0
    while True:  # kill at the first, second, ... rename or copy, until one resume runs to its end
        out = tmp_path / f"out{kill_at}"
        shutil.copytree(base, out)
        calls = []

        def counted(real, calls=calls, kill_at=kill_at):
            def call(*a, **k):
                calls.append(a)
                if len(calls) == kill_at + 1:
                    raise KeyboardInterrupt(f"killed at operation {kill_at}")
                return real(*a, **k)
            return call

        with monkeypatch.context() as m:
            m.setattr(os, "replace", counted(real_replace))
            m.setattr(shutil, "copy2", counted(real_copy))
            try:
                run_folder.begin(out, out / "checkpoint-2", False, print)
                finished = True
            except KeyboardInterrupt:
                finished = False
        assert_latest_loads(out)
        run_folder.begin(out, out / "checkpoint-2", False, print)  # the same command again
        assert (out / "latest").read_text() == "checkpoint-2"
        kept = {p.name for p in out.glob("checkpoint-*")} | {p.name for p in out.glob("superseded-*/checkpoint-*")}
        assert kept == set(names)  # nothing lost, wherever it was killed
        if finished:
            break
        kill_at += 1
    assert kill_at >= 4  # the latest file, three checkpoints, the final adapter, the summary and metrics moved


# ---- trusting what a checkpoint says --------------------------------------------------------------------------

@pytest.mark.slow
def test_latest_naming_a_folder_elsewhere_is_refused_and_touches_nothing(tmp_path, tiny_ckpt, trained_run):
    trained_run(tmp_path / "victim", steps=4, save_every=2, keep_checkpoints=0)
    trained_run(tmp_path / "shared", steps=2, save_every=2)
    run_folder.write_text(tmp_path / "shared" / "latest", "../victim/checkpoint-2")
    victim, shared = snapshot(tmp_path / "victim"), snapshot(tmp_path / "shared")
    with pytest.raises(SystemExit, match=r"latest does not hold the name of a checkpoint-N folder inside "):
        train.main(["--model", str(tiny_ckpt), "--data", str(GUANACO_SAMPLE), "--eval-data", "none", "--rank", "4",
                   "--steps", "4", "--max-len", "128", "--no-samples", "--resume", str(tmp_path / "shared")])
    assert snapshot(tmp_path / "victim") == victim and snapshot(tmp_path / "shared") == shared


@pytest.mark.parametrize("change,problem", [
    (lambda s: {**s, "step": -3}, "step -3 in checkpoint-2; expected 2"),
    (lambda s: {**s, "step": "4"}, "'step' is '4', expected a int"),
    (lambda s: {**s, "step": True}, "'step' is True, expected a int"),
    (lambda s: {k: v for k, v in s.items() if k != "stream"}, "no 'stream'"),
    (lambda s: {**s, "totals": {**s["totals"], "bogus": 1}}, "unknown totals entry 'bogus'"),
    (lambda s: {**s, "totals": {**s["totals"], "tokens": "many"}}, "totals 'tokens' is 'many'"),
    (lambda s: [s], "expected a JSON object, found list"),
])
@pytest.mark.slow
def test_a_trainer_state_that_is_not_ours_is_refused_before_the_folder_is_touched(tmp_path, tiny_ckpt, trained_run,
                                                                                  change, problem):
    out = tmp_path / "out"
    trained_run(out, steps=4, save_every=2, keep_checkpoints=0)
    state = out / "checkpoint-2" / run_folder.STATE
    state.write_text(json.dumps(change(json.loads(state.read_text()))))
    before = snapshot(out)
    with pytest.raises(SystemExit) as refused:
        train.main(["--model", str(tiny_ckpt), "--data", str(GUANACO_SAMPLE), "--eval-data", "none", "--rank", "4",
                   "--alpha", "8", "--steps", "4", "--max-len", "128", "--no-samples",
                   "--resume", str(out / "checkpoint-2")])
    assert problem in str(refused.value) and str(state) in str(refused.value) and "\n" not in str(refused.value)
    assert snapshot(out) == before


def _optimizer_state(model_params=((4, 3), (5, 4)), step=2.0):
    state = {i: {"step": torch.tensor(step), "exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape)}
             for i, shape in enumerate(model_params)}
    return {"state": state, "param_groups": [{"lr": 1e-3, "params": list(state)}]}


@pytest.mark.parametrize("damage,problem", [
    (lambda s: [s], "expected a dict with 'state' and 'param_groups', found list"),
    (lambda s: s["state"][0].update(exp_avg=torch.zeros(3)), "parameter 0: exp_avg is (3,) torch.float32, expected "
                                                            "(4, 3) torch.float32"),
    (lambda s: s["state"][1].update(exp_avg_sq=torch.zeros(5, 4, dtype=torch.float64)), "exp_avg_sq is (5, 4) "
                                                                                         "torch.float64"),
    (lambda s: s["state"][1].update(step=torch.tensor(7.0)), "step is tensor(7.), expected 2"),
    (lambda s: s["state"].pop(1) and None, "expected state for parameters [0, 1], found [0]"),
    (lambda s: s["param_groups"][0]["params"].append(2), "expected a group of 2 parameters"),
    (lambda s: s["state"][0].update(exp_avg="zeros"), "exp_avg is str"),
])
def test_an_optimizer_state_that_does_not_fit_the_parameters_is_named(damage, problem):
    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5, 4))]
    optimizer = torch.optim.AdamW(params, fused=True)
    assert run_folder.optimizer_state_problem(_optimizer_state(), optimizer, 2) is None
    state = _optimizer_state()
    state = damage(state) or state
    assert problem in run_folder.optimizer_state_problem(state, optimizer, 2)


@pytest.mark.slow
def test_a_wrong_shaped_optimizer_state_is_refused_before_anything_moves(tmp_path, tiny_ckpt, trained_run):
    # Loaded as it was, a too-short exp_avg made the fused CPU AdamW write out of bounds (a segfault).
    out = tmp_path / "out"
    trained_run(out, steps=4, save_every=2, keep_checkpoints=0)
    path = out / "checkpoint-2" / run_folder.OPTIMIZER
    state = torch.load(path, weights_only=True)
    state["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(state, path)
    rerecord(out / "checkpoint-2")
    before = snapshot(out)
    with pytest.raises(TrainingError, match=rf"{path} does not fit this run's optimizer: parameter 0: exp_avg is "
                                            r"\(3,\)"):
        run(tmp_path, tiny_ckpt, "out", steps=4, save_every=2, resume=str(out / "checkpoint-2"))
    assert snapshot(out) == before
    torch.save([state], path)
    rerecord(out / "checkpoint-2")
    with pytest.raises(TrainingError, match="expected a dict with 'state' and 'param_groups', found list"):
        run(tmp_path, tiny_ckpt, "out", steps=4, save_every=2, resume=str(out / "checkpoint-2"))


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True])
def test_resuming_with_the_other_kind_of_adapter_names_the_flag(tmp_path, tiny_ckpt, dora):
    run(tmp_path, tiny_ckpt, "out", steps=2, save_every=2, dora=dora)
    argv = ["--model", str(tiny_ckpt), "--data", str(GUANACO_SAMPLE), "--eval-data", "none", "--alpha", "8",
            "--steps", "3", "--max-len", "128", "--no-samples", "--resume", str(tmp_path / "out"), "--rank", "8",
            *([] if dora else ["--dora"])]
    with pytest.raises(SystemExit) as refused:
        train.main(argv)
    said = str(refused.value)
    assert ("its adapter is DoRA: add --dora" if dora else "its adapter is plain LoRA: leave --dora out") in said
    assert "its adapter has rank 4: pass --rank 4" in said


# ---- a full disk names the file ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_while_writing_a_text_file_or_a_metrics_row_names_the_file(tmp_path, tiny_ckpt, monkeypatch):
    import errno

    real_write_text = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".config.json.") and self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full)
        with pytest.raises(TrainingError, match=r"could not write \S*/out/config.json \(No space left on device\)"):
            run(tmp_path, tiny_ckpt, "out", steps=1)
    assert not list((tmp_path / "out").glob(".config.json.*"))

    def full_open(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder, "open", full_open, raising=False)
    with pytest.raises(TrainingError, match=r"could not write \S*/out2/metrics.jsonl \(No space left on device\)"
                       r"\. Is the disk full or the folder read-only\? No checkpoint is saved in \S*/out2 yet, so "
                       r"what this run trained \(up to step 1\) is lost \(--save-every N saves one every N steps\): "
                       "free space and run again$"):
        run(tmp_path, tiny_ckpt, "out2", steps=1)


@pytest.mark.slow
@pytest.mark.plots
def test_a_full_disk_while_writing_loss_png_is_a_warning_naming_it_after_the_adapter_is_saved(
        tmp_path, tiny_ckpt, monkeypatch, capsys):
    import errno

    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    def full(self, path, *a, **k):
        Path(path).write_bytes(b"\x89PNG cut off")
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(Figure, "savefig", full)
    summary, rows = run(tmp_path, tiny_ckpt, "out", steps=1)
    out = tmp_path / "out"
    assert summary["steps"] == 1 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "loss.png").exists()
    said = [line for line in capsys.readouterr().out.splitlines() if "loss.png" in line]
    assert said == [f"warning: could not write {out / 'loss.png'} (File too large); the adapter, summary.json and "
                    "metrics.jsonl are saved, and the plot is only drawn from metrics.jsonl"]


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_says_in_one_line_the_last_checkpoint_and_the_resume_command(tmp_path, tiny_ckpt, monkeypatch, capsys):
    run(tmp_path, tiny_ckpt, "out", steps=2, save_every=1)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_ckpt), "--data", str(GUANACO_SAMPLE), "--steps", "3", "--save-every", "1",
            "--out", str(out), "--overwrite"]

    def ctrl_c(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", ctrl_c)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    assert stopped.value.code == 130
    said = capsys.readouterr().err.splitlines()
    assert said == [f"train.py: stopped by Ctrl-C; the last checkpoint is {out / 'checkpoint-2'} (step 2), and "
                    f"nothing it holds is lost: python train.py --model {tiny_ckpt} --data {GUANACO_SAMPLE} --steps 3 "
                    f"--save-every 1 --out {out} --resume {out}"]
    with pytest.raises(SystemExit):
        train.main([*argv[:-3], "--out", str(tmp_path / "new")])
    assert capsys.readouterr().err.splitlines() == [
        f"train.py: stopped by Ctrl-C before any checkpoint was saved in {tmp_path / 'new'}, so there is nothing to "
        "resume: run the command again (--save-every N saves a checkpoint every N steps)"]


# ---- names the run did not make: never followed, never written through, never removed ----------------------------

def test_a_symlink_planted_at_the_lock_is_refused_and_its_target_untouched(tmp_path):
    secret, out = tmp_path / "secret.txt", tmp_path / "out"
    secret.write_text("mine\n")
    out.mkdir()
    (out / ".lock").symlink_to(secret)
    with pytest.raises(TrainingError, match=rf"^{out / '.lock'} is a symbolic link, which no run or export makes; "
                                            r"it is not followed\. Remove the link .* or pick another --out$"):
        with run_folder.lock(out, print):
            pytest.fail("locked through a planted link")
    assert secret.read_text() == "mine\n" and (out / ".lock").is_symlink()


def test_a_symlink_planted_at_a_temporary_name_is_not_written_through(tmp_path):
    secret, out = tmp_path / "secret2.txt", tmp_path / "out"
    secret.write_text("mine\n")
    out.mkdir()
    (out / ".config.json.tmp").symlink_to(secret)
    run_folder.write_text(out / "config.json", "{}\n")
    assert secret.read_text() == "mine\n" and (out / ".config.json.tmp").is_symlink()
    assert not (out / "config.json").is_symlink() and (out / "config.json").read_text() == "{}\n"
    assert sorted(p.name for p in out.iterdir()) == [".config.json.tmp", "config.json"]


def test_a_users_own_tmp_folders_are_never_removed(tmp_path):
    out = tmp_path / "out"
    for name in (".adapter.tmp", ".checkpoint-1.tmp"):
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text("mine\n")
    run_folder.claim(out, "adapter", "checkpoint-1")  # an earlier run of ours wrote both
    run_folder.begin(out, None, False, print)  # removes only stale temporaries a run made
    run_folder.write_dir(out / "adapter", lambda folder: (folder / "a.txt").write_text("a"))
    run_folder.write_dir(out / "checkpoint-1", lambda folder: (folder / "a.txt").write_text("a"))
    for name in (".adapter.tmp", ".checkpoint-1.tmp"):
        assert (out / name / "notes.txt").read_text() == "mine\n"
    assert (out / "adapter" / "a.txt").read_text() == "a"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [
        ".adapter.tmp", ".checkpoint-1.tmp", ".run-manifest.json"]


def test_temporaries_a_killed_run_left_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run_folder.claim(out, "adapter")
    stale = out / ".adapter.4242.ab_cd9x1.tmp"
    stale.mkdir()
    (out / "..run-manifest.json.4242.zz9_ab1c.tmp").write_text("{")
    run_folder.begin(out, None, False, print)
    assert sorted(p.name for p in out.iterdir()) == [".run-manifest.json"]


@pytest.mark.parametrize("link", [True, False], ids=["a link to another file", "a copy of it"])
def test_a_latest_holding_something_else_is_refused_without_echoing_it(tmp_path, link):
    secret, out = tmp_path / "hostname", tmp_path / "out"
    secret.write_text("secret-host\n")
    out.mkdir()
    (out / "latest").symlink_to(secret) if link else (out / "latest").write_text(secret.read_text())
    with pytest.raises(TrainingError) as e:
        run_folder.find_checkpoint(out)
    what = "is a symbolic link, which no run writes" if link else "does not hold"
    assert str(e.value) == (f"{out / 'latest'} {what} the name of a checkpoint-N folder inside {out}. It is not "
                            f"followed: write the name of one of {out}'s checkpoints into it, or pass that checkpoint "
                            "folder to --resume")
    assert "secret" not in str(e.value).replace(str(tmp_path), "")


# ---- the manifest is not proof on its own: --overwrite removes a name only while it matches its record ------------

def _ours(out, name, text):
    run_folder.claim(out, name)
    run_folder.write_text(out / name, text)


def test_overwrite_leaves_names_listed_by_hand_and_says_so(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _ours(out, "config.json", "{}\n")
    run_folder.write_dir(out / "checkpoint-2", lambda folder: (folder / "a.txt").write_text("a"))  # not listed yet
    run_folder.claim(out, "checkpoint-2")
    _ours(out, "latest", "checkpoint-2")
    run_folder.record(out, "checkpoint-2")
    (out / "notes.txt").write_text("mine\n")
    (out / "mydata").mkdir()
    (out / "mydata" / "rows.jsonl").write_text("{}\n")
    manifest = json.loads((out / ".run-manifest.json").read_text())
    manifest["written"] += ["notes.txt", "mydata"]  # anyone can edit it
    (out / ".run-manifest.json").write_text(json.dumps(manifest))
    logged = []
    run_folder.check_out(out, None, overwrite=True)
    run_folder.clear(out, logged.append)
    assert sorted(p.name for p in out.iterdir()) == [".run-manifest.json", "mydata", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "mydata" / "rows.jsonl").read_text() == "{}\n"
    assert logged == [f"--overwrite: removed the earlier run in {out} (3 files and folders it had written)",
                      f"--overwrite: left mydata, notes.txt in {out}: listed in .run-manifest.json, but not what the "
                      "run recorded there (changed since, or listed by hand)"]
    assert run_folder.listed(out) == set()


@pytest.mark.parametrize("change", ["edited", "a file added to its folder", "an old manifest, without records"])
def test_overwrite_refuses_a_name_it_would_write_over_that_no_longer_matches_and_removes_nothing(tmp_path, change):
    out = tmp_path / "out"
    out.mkdir()
    _ours(out, "config.json", "{}\n")
    run_folder.claim(out, "checkpoint-2")
    run_folder.write_dir(out / "checkpoint-2", lambda folder: (folder / "a.txt").write_text("a"))
    if change == "edited":
        (out / "config.json").write_text("{} \n")
        name = "config.json"
    elif change == "a file added to its folder":
        (out / "checkpoint-2" / "mine.txt").write_text("mine")
        name = "checkpoint-2"
    else:
        (out / ".run-manifest.json").write_text(json.dumps({"written": ["checkpoint-2", "config.json"]}))
        name = "checkpoint-2, config.json"
    before = snapshot(out)
    with pytest.raises(TrainingError) as e:
        run_folder.check_out(out, None, overwrite=True)
    assert str(e.value) == (f"--overwrite: {name} in {out} is listed in .run-manifest.json but is not what the run "
                            "recorded there (changed since, or written before records were kept), and the run would "
                            "write over it; nothing was removed. Move it yourself, or pick another --out")
    assert snapshot(out) == before


def test_the_manifest_records_each_file_it_lists(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _ours(out, "config.json", "{}\n")
    run_folder.claim(out, "metrics.jsonl")
    run_folder.append_metrics(out, {"step": 1})
    records = json.loads((out / ".run-manifest.json").read_text())["records"]
    row = b'{"step": 1}\n'
    assert records == {"config.json": {"size": 3, "sha256": hashlib.sha256(b"{}\n").hexdigest()},
                       "metrics.jsonl": {"size": len(row), "sha256": hashlib.sha256(row).hexdigest()}}
    # An appended-to file matches while what was recorded still begins it: grown since, yes; changed, no.
    run_folder.append_metrics(out, {"step": 2})
    assert run_folder._matches(out, "metrics.jsonl", records)
    (out / "metrics.jsonl").write_text('{"step": 9}\n{"step": 2}\n')
    assert not run_folder._matches(out, "metrics.jsonl", records)
