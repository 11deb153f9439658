"""The output folder: no run destroys another's work, `latest` always names a checkpoint that loads, resumed
runs keep one history, and a crash or a full disk leaves every folder whole."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import lora
import train
from helpers import GUANACO_SAMPLE, adapter_weights, metrics, run, snapshot, train_losses
from tinyllama import files
from training import TrainingError, run_folder

pytest.importorskip("transformers")


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
            run_folder.load_optimizer_state(checkpoint)
            lora.read_adapter_config(checkpoint)
            adapter_weights(checkpoint)
            named.append(text)

    monkeypatch.setattr(run_folder, "write_text", checked)
    return named


def assert_latest_loads(out):
    found = run_folder.find_checkpoint(out)
    assert found is not None and found.name == (out / "latest").read_text()
    assert run_folder.read_state(found)["step"] == int(found.name.split("-")[1])
    run_folder.load_optimizer_state(found)
    adapter_weights(found)


# ---- a fresh run never destroys another run -----------------------------------------------------------------

def test_a_fresh_run_into_a_folder_holding_another_run_is_refused_and_touches_nothing(tmp_path, tiny_ckpt):
    run(tmp_path, tiny_ckpt, "out", steps=6, save_every=2)
    before = snapshot(tmp_path / "out")
    with pytest.raises(TrainingError, match=r"already holds a run .*--overwrite"):
        run(tmp_path, tiny_ckpt, "out", steps=3, save_every=1)
    assert snapshot(tmp_path / "out") == before


def test_overwrite_replaces_the_earlier_run_and_latest_always_loads(tmp_path, tiny_ckpt, latest_always_loads):
    # The older run is longer: pruning by the highest step numbers in the folder used to delete every new
    # checkpoint right after it was written.
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


def test_pruning_in_a_resumed_branch_keeps_its_own_newest_checkpoints(tmp_path, tiny_ckpt, latest_always_loads):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=8, save_every=2, keep_checkpoints=2)  # leaves 6 and 8
    run(tmp_path, tiny_ckpt, "out", steps=9, save_every=1, keep_checkpoints=2, resume=str(out / "checkpoint-6"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8", "checkpoint-9"]
    assert run_folder.read_state(out / "checkpoint-8")["step"] == 8
    assert_latest_loads(out)
    (aside,) = out.glob("superseded-*")
    assert run_folder.is_checkpoint(aside / "checkpoint-8")  # the old branch's step 8, not the new one


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

def test_a_crash_while_saving_the_final_adapter_leaves_the_previous_one_whole(tmp_path, tiny_ckpt, monkeypatch):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=2, save_every=2)
    before = snapshot(out / "adapter")
    real = lora.adapter._atomic_write

    def dies_on_the_config(path, write):
        if path.name == lora.adapter.CONFIG_NAME:
            raise KeyboardInterrupt("killed between the weights and the config")
        real(path, write)

    monkeypatch.setattr(lora.adapter, "_atomic_write", dies_on_the_config)
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

def test_a_full_disk_inside_torch_save_ends_with_a_message_and_keeps_the_last_checkpoint(tmp_path, tiny_ckpt,
                                                                                           monkeypatch):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=2, save_every=2)

    def full(obj, f, *a, **k):  # what PyTorch raises when the disk fills during torch.save
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TrainingError, match=r"could not write .*checkpoint-3 .*unexpected pos.*disk full"):
        run(tmp_path, tiny_ckpt, "out", steps=4, save_every=1, resume=str(out))
    assert not list(out.glob(".checkpoint-*"))  # no half-written folder left behind
    assert (out / "latest").read_text() == "checkpoint-2"
    assert_latest_loads(out)


def test_a_full_disk_while_saving_the_adapter_ends_with_a_message(tmp_path, tiny_ckpt, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lora.adapter, "save_file", full)
    with pytest.raises(TrainingError, match=r"could not write .*adapter .*No space left on device"):
        run(tmp_path, tiny_ckpt, "out", steps=1)
    assert not (tmp_path / "out" / "adapter").exists() and not (tmp_path / "out" / ".adapter.tmp").exists()


# ---- one writer per folder ------------------------------------------------------------------------------------

def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(TrainingError, match=rf"in use by another run \(process {holder.pid}"):
            run(tmp_path, tiny_ckpt, "out", steps=1)
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_message_and_released_at_the_end(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / ".lock").write_text(f"{gone.pid} {socket.gethostname()}\n")
    run(tmp_path, tiny_ckpt, "out", steps=1)
    assert "taking over the lock" in capsys.readouterr().out
    assert not (out / ".lock").exists()
    with pytest.raises(TrainingError, match="already holds a run"):  # a failed run releases it too
        run(tmp_path, tiny_ckpt, "out", steps=1)
    assert not (out / ".lock").exists()


def test_lock_refuses_an_unwritable_folder_before_anything_loads(tmp_path, tiny_ckpt, monkeypatch):
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("loaded a model into an unwritable out"))
    monkeypatch.setattr(run_folder.os, "open", read_only)
    with pytest.raises(TrainingError, match=r"cannot write to --out .*Read-only file system"):
        run(tmp_path, tiny_ckpt, "out", steps=1)


# ---- resume -------------------------------------------------------------------------------------------------

def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=3, save_every=3)
    before = snapshot(out)
    for steps in (3, 2):
        with pytest.raises(TrainingError, match=r"at step 3 .* already complete.*--steps N \(N > 3\)"):
            run(tmp_path, tiny_ckpt, "out", steps=steps, save_every=3, resume=str(out))
        assert snapshot(out) == before


def test_a_resumed_run_keeps_one_row_per_step_and_sums_up_the_whole_run(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    common = dict(steps=6, save_every=3, keep_checkpoints=0, dropout=0.1, eval_data=str(GUANACO_SAMPLE),
                  eval_every=2)
    full, full_rows = run(tmp_path, tiny_ckpt, "full", **common)
    run(tmp_path, tiny_ckpt, "out", **common)
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


def test_a_resume_with_changed_settings_says_what_changed(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=2, save_every=2)
    capsys.readouterr()
    run(tmp_path, tiny_ckpt, "out", steps=4, save_every=2, lr=2e-2, schedule="linear", resume=str(out))
    said = capsys.readouterr().out
    assert "differ from the checkpoint's" in said
    for change in ("lr 0.01 -> 0.02", "steps 2 -> 4", "schedule 'cosine' -> 'linear'"):
        assert change in said


def test_a_checkpoint_whose_state_would_run_code_is_refused(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    run(tmp_path, tiny_ckpt, "out", steps=2, save_every=2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(out / "checkpoint-2" / run_folder.OPTIMIZER, weights_only=True)
    state["extra"] = Payload()
    torch.save(state, out / "checkpoint-2" / run_folder.OPTIMIZER)
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

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    run_folder.save_checkpoint(tmp_path, 100, adapter, optimizer, {}, keep=1)
    for step in (1, 2, 3):
        run_folder.save_checkpoint(tmp_path, step, adapter, optimizer, {}, keep=1)
        assert run_folder.find_checkpoint(tmp_path).name == f"checkpoint-{step}"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-100", "checkpoint-3"]
