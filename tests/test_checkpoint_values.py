"""A checkpoint's values are checked before a resumed run uses them, and a checkpoint is never written with values
that are not finite: checksums of its files, the optimizer state (finite, exp_avg_sq >= 0, hyperparameters of
their type and range), the adapter tensors (their dtype, finite) and the data-stream position. Each refusal is one
line naming the file and the field, and leaves the folder as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
import train
from helpers import GUANACO_SAMPLE, rerecord, run, snapshot
from tinyllama import load_model
from training import TrainingError, run_folder

pytest.importorskip("transformers")

KEY = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_ckpt):
    """A run of 4 steps with checkpoint-2 and checkpoint-4, trained once; each test damages a copy."""
    base = tmp_path_factory.mktemp("saved")
    run(base, tiny_ckpt, "out", steps=4, save_every=2, keep_checkpoints=0)
    return base / "out"


@pytest.fixture
def out(tmp_path, saved_run):
    shutil.copytree(saved_run, tmp_path / "out")
    return tmp_path / "out"


def refused_resume(tiny_ckpt, out) -> str:
    """`train.py --resume out/checkpoint-2`: its error line, after checking that the folder did not change."""
    before = snapshot(out)
    with pytest.raises(SystemExit) as refused:  # a TypeError or any other traceback fails the test
        train.main(["--model", str(tiny_ckpt), "--data", str(GUANACO_SAMPLE), "--eval-data", "none", "--rank", "4",
                    "--alpha", "8", "--steps", "4", "--max-len", "128", "--no-samples", "--save-every", "2",
                    "--batch-size", "4", "--grad-accum", "1", "--no-group-by-length", "--dropout", "0",
                    "--resume", str(out / "checkpoint-2")])
    assert snapshot(out) == before
    said = str(refused.value)
    assert said.startswith("train.py: error: ") and "\n" not in said
    return said


def change_optimizer(checkpoint, change) -> None:
    path = checkpoint / run_folder.OPTIMIZER
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    rerecord(checkpoint)  # a checkpoint edited on purpose: the values are what must be refused


def change_adapter(checkpoint, change) -> None:
    path = checkpoint / lora.adapter.WEIGHTS_NAME
    tensors = load_file(str(path))
    tensors[KEY] = change(tensors[KEY])
    save_file(tensors, str(path), metadata={"format": "pt"})
    rerecord(checkpoint)


def nan_at_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# ---- item 5: non-finite optimizer state; item 9: hyperparameters of the wrong type ------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("change,problem", [
    (lambda s: s["state"][0].update(exp_avg=nan_at_first(s["state"][0]["exp_avg"])),
     "parameter 0: exp_avg holds 1 non-finite value(s) (NaN or infinity)"),
    (lambda s: s["state"][1]["exp_avg_sq"].view(-1).__setitem__(3, -1.0),
     "parameter 1: exp_avg_sq holds negative values"),
    (lambda s: s["param_groups"][0].update(betas="xx"), "param_groups betas is 'xx', expected two numbers in [0, 1)"),
])
def test_a_resume_refuses_optimizer_values_it_cannot_train_with(tmp_path, tiny_ckpt, out, change, problem):
    change_optimizer(out / "checkpoint-2", change)
    said = refused_resume(tiny_ckpt, out)
    assert f"{out / 'checkpoint-2' / run_folder.OPTIMIZER} does not fit this run's optimizer: {problem}" in said


def _optimizer_state(step=2.0):
    state = {i: {"step": torch.tensor(step), "exp_avg": torch.zeros(shape), "exp_avg_sq": torch.zeros(shape)}
             for i, shape in enumerate(((4, 3), (5, 4)))}
    return {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                              "maximize": False, "fused": True, "params": list(state)}]}


@pytest.mark.parametrize("change,problem", [
    (lambda s: s["state"][0]["exp_avg"].fill_(float("inf")), "parameter 0: exp_avg holds 12 non-finite value(s)"),
    (lambda s: s["state"][1]["exp_avg_sq"].fill_(float("nan")), "parameter 1: exp_avg_sq holds 20 non-finite"),
    (lambda s: s["state"][0]["exp_avg_sq"].fill_(-1e-3), "parameter 0: exp_avg_sq holds negative values"),
    (lambda s: s["state"][0].update(step=torch.tensor(2 + 0j)), "parameter 0: step is tensor(2.+0.j)"),
    (lambda s: s["param_groups"][0].update(betas=(0.9,)), "param_groups betas is (0.9,), expected two numbers"),
    (lambda s: s["param_groups"][0].update(betas=(0.9, 1.0)), "param_groups betas is (0.9, 1.0), expected two"),
    (lambda s: s["param_groups"][0].update(betas=("0.9", 0.99)), "param_groups betas is ('0.9', 0.99)"),
    (lambda s: s["param_groups"][0].update(lr=float("nan")), "param_groups lr is nan, expected a finite number >= 0"),
    (lambda s: s["param_groups"][0].update(eps=-1e-8), "param_groups eps is -1e-08, expected a finite number >= 0"),
    (lambda s: s["param_groups"][0].update(weight_decay="0"), "param_groups weight_decay is '0', expected a finite"),
    (lambda s: s["param_groups"][0].update(weight_decay=True), "param_groups weight_decay is True, expected a fin"),
    (lambda s: s["param_groups"][0].update(maximize=True), "param_groups maximize is True, expected False"),
    (lambda s: s["param_groups"][0].update(fused="yes"), "param_groups fused is 'yes', expected True"),
])
def test_each_optimizer_value_is_checked(change, problem):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5, 4))],
                                  fused=True)
    assert run_folder.optimizer_state_problem(_optimizer_state(), optimizer, 2) is None
    state = _optimizer_state()
    change(state)
    assert problem in run_folder.optimizer_state_problem(state, optimizer, 2)


# ---- item 6: a flipped byte inside a tensor's data ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", [lora.adapter.WEIGHTS_NAME, run_folder.OPTIMIZER])
def test_a_flipped_byte_in_a_tensor_is_refused_by_its_checksum(tmp_path, tiny_ckpt, out, name):
    path = out / "checkpoint-2" / name
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x40  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))
    said = refused_resume(tiny_ckpt, out)
    assert f"{path} is not the file that was saved: its sha256 differs from the one " \
           f"{out / 'checkpoint-2' / run_folder.STATE} records (files.{name})" in said


@pytest.mark.slow
def test_a_checkpoint_without_checksums_resumes_with_a_warning_and_its_values_checked(tmp_path, tiny_ckpt, out,
                                                                                      capsys):
    state_path = out / "checkpoint-2" / run_folder.STATE
    state = json.loads(state_path.read_text())
    del state["files"]  # as a checkpoint of an earlier version
    state_path.write_text(json.dumps(state))
    path = out / "checkpoint-2" / run_folder.OPTIMIZER
    optimizer = torch.load(path, weights_only=True)
    optimizer["state"][0]["exp_avg"].view(-1)[0] = float("nan")
    torch.save(optimizer, path)
    assert "parameter 0: exp_avg holds 1 non-finite value(s)" in refused_resume(tiny_ckpt, out)
    assert f"warning: {state_path} records no checksums" in capsys.readouterr().out


# ---- item 7: an adapter tensor stored in another dtype, or not finite ----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("change,problem", [
    (lambda t: t.half(), "is stored as torch.float16, expected torch.float32"),
    (lambda t: (t * 100).long(), "is stored as torch.int64, expected torch.float32"),
    (nan_at_first, "holds 1 non-finite value (NaN or infinity) of"),
])
def test_an_adapter_tensor_of_another_dtype_or_not_finite_is_refused_not_cast(tmp_path, tiny_ckpt, out, change,
                                                                             problem):
    checkpoint = out / "checkpoint-2"
    change_adapter(checkpoint, change)
    weights = checkpoint / lora.adapter.WEIGHTS_NAME
    model = load_model(tiny_ckpt, lora_config=lora.read_adapter_config(checkpoint))
    before = {k: v.clone() for k, v in lora.adapter_state_dict(model).items()}
    with pytest.raises(ValueError) as refused:
        lora.load_adapter(model, checkpoint)
    assert f"{weights}: tensor {KEY} {problem}" in str(refused.value)
    assert all(torch.equal(v, before[k]) for k, v in lora.adapter_state_dict(model).items())  # nothing loaded
    assert f"--resume {checkpoint}: {weights}: tensor {KEY} {problem}" in refused_resume(tiny_ckpt, out)


# ---- item 8: the data-stream position ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("change,problem", [
    ({"epoch": 10**12}, "stream: epoch 1000000000000 epoch_step 0 is not the position after step 2"),
    ({"epoch": -5}, "stream: cannot resume this data stream: the saved position, epoch -5 step 0"),
    ({"epoch": True}, "stream: cannot resume this data stream: the saved position, epoch True"),
    ({"epoch_step": 2.5}, "stream: cannot resume this data stream: the saved position, epoch 1 step 2.5"),
    ({"index": 2.5, "epoch_step": None, "rows_per_step": None}, "stream: cannot resume this data stream: its rows"),
])
def test_a_stream_position_out_of_range_is_refused(tmp_path, tiny_ckpt, out, change, problem):
    path = out / "checkpoint-2" / run_folder.STATE
    state = json.loads(path.read_text())
    assert {k: state["stream"][k] for k in ("epoch", "epoch_step")} == {"epoch": 1, "epoch_step": 0}
    state["stream"] = {k: v for k, v in {**state["stream"], **change}.items() if v is not None}
    path.write_text(json.dumps(state))
    assert f"{path} {problem}" in refused_resume(tiny_ckpt, out)


# ---- item 5: a checkpoint is never written with values that are not finite ----------------------------------------

@pytest.mark.slow
def test_an_update_gone_nan_is_never_saved_and_the_last_good_checkpoint_is_named(tmp_path, tiny_ckpt, monkeypatch):
    # A non-finite update with a finite loss and gradient norm (as a NaN in exp_avg gave): the loss of that step
    # is fine, so only the check before saving can keep it out of checkpoint-2 and `latest`.
    real = train.queue_step

    def poisoned(run_, cfg, proc, step, bad, params):
        queued = real(run_, cfg, proc, step, bad, params)
        if step == 1:
            with torch.no_grad():
                params[0].view(-1)[0] = float("nan")
        return queued

    monkeypatch.setattr(train, "queue_step", poisoned)
    out = tmp_path / "out"
    with pytest.raises(TrainingError) as refused:
        run(tmp_path, tiny_ckpt, "out", steps=3, save_every=1, keep_checkpoints=0)
    assert str(refused.value) == (
        f"step 2: the adapter's {KEY} holds 1 non-finite value (NaN or infinity) of {params_numel(out)}, so "
        f"checkpoint-2 was not written. Last good checkpoint: {out / 'checkpoint-1'}. Try a lower --lr (or --alpha)")
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-1"]
    assert (out / "latest").read_text() == "checkpoint-1"
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint-1" / lora.adapter.WEIGHTS_NAME))
               .values())


def params_numel(out) -> int:
    return load_file(str(out / "checkpoint-1" / lora.adapter.WEIGHTS_NAME))[KEY].numel()


@pytest.mark.slow
def test_a_final_adapter_gone_nan_is_not_written(tmp_path, tiny_ckpt, monkeypatch):
    real = train.queue_step

    def poisoned(run_, cfg, proc, step, bad, params):
        queued = real(run_, cfg, proc, step, bad, params)
        with torch.no_grad():
            params[0].view(-1)[0] = float("inf")
        return queued

    monkeypatch.setattr(train, "queue_step", poisoned)
    with pytest.raises(TrainingError, match=rf"^the final adapter: the adapter's {KEY} holds 1 non-finite value "
                                            r".*so adapter was not written. Last good checkpoint: none\."):
        run(tmp_path, tiny_ckpt, "out", steps=1)
    assert not (tmp_path / "out" / "adapter").exists()
