"""The runtime plan: decided once, refused once, and every fast path it picks proves itself at start-up against
its plain path; a kernel that raises or returns wrong numbers is turned off (or, strict, stops the run)."""

from __future__ import annotations

import pytest
import torch

import train
from helpers import TINY, randomize_lora_b, run, train_losses
from lora import LoRAConfig
from tinyllama import Llama, LlamaConfig
from tinyllama import model as model_module
from tinyllama.runtime import RuntimePlan, plan_problems, plan_runtime
from tinyllama.startup_check import FastPathError, check_fast_paths
from training import TrainingError

FAST = RuntimePlan(varlen=True, fused_mlp=True, gqa_in_place=True)


def lora_model():
    torch.manual_seed(0)
    return randomize_lora_b(Llama(LlamaConfig(**TINY), lora_config=LoRAConfig(4, 8, dropout=0.1)), std=0.1)


def raises(*args, **kwargs):
    raise RuntimeError("no kernel image is available for execution on the device")


def off_by_a_tenth(real):
    return lambda *args, **kwargs: real(*args, **kwargs) * 1.1


def test_working_fast_paths_pass_their_check_and_leave_the_grads_alone():
    model, said = lora_model(), []
    assert check_fast_paths(model, FAST, said.append) == FAST
    assert [line.split(":")[0] for line in said] == ["fast path varlen", "fast path fused_mlp",
                                                     "fast path gqa_in_place"]
    assert all(p.grad is None for p in model.parameters())  # the first training step starts from nothing


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["raises", "wrong numbers"])
@pytest.mark.parametrize("path,function", [("varlen", "varlen_attention"), ("fused_mlp", "fused_lora_mlp")])
def test_a_broken_fast_path_is_turned_off_with_one_line_or_stops_a_strict_run(monkeypatch, path, function, broken):
    real = getattr(model_module, function)
    monkeypatch.setattr(model_module, function, raises if broken == "raises" else off_by_a_tenth(real))
    model, said = lora_model(), []
    plan = check_fast_paths(model, FAST, said.append)
    assert getattr(plan, path) is False
    assert all(getattr(plan, other) for other in ("varlen", "fused_mlp", "gqa_in_place") if other != path)
    (warning,) = [line for line in said if line.startswith("warning")]
    assert f"the fast path {path} failed its start-up check" in warning and "turned off" in warning
    assert ("RuntimeError: no kernel image" if broken == "raises" else "differs from the plain path's") in warning
    with pytest.raises(FastPathError, match=f"fast path {path} failed .*--strict-fast-paths"):
        check_fast_paths(lora_model(), FAST, said.append, strict=True)


@pytest.mark.slow
def test_train_py_runs_the_plain_path_when_a_fast_path_is_wrong_and_strict_refuses(tmp_path, tiny_ckpt, monkeypatch,
                                                                                  capsys):
    _, plain = run(tmp_path, tiny_ckpt, "plain", fused_mlp=False)
    monkeypatch.setattr(model_module, "fused_lora_mlp", off_by_a_tenth(model_module.fused_lora_mlp))
    _, fallback = run(tmp_path, tiny_ckpt, "fallback", fused_mlp=True)
    assert "warning: the fast path fused_mlp failed its start-up check" in capsys.readouterr().out
    assert train_losses(fallback) == train_losses(plain)  # the wrong kernel never ran a step
    with pytest.raises(TrainingError, match="fast path fused_mlp failed .*--strict-fast-paths"):
        run(tmp_path, tiny_ckpt, "strict", fused_mlp=True, strict_fast_paths=True)


def test_paths_that_cannot_run_are_refused_once_each_naming_the_flag():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert plan_problems(cpu, dora=True, fused_mlp=None) == []  # the default is simply not to fuse
    (dora,) = plan_problems(cpu, dora=True, fused_mlp=True)
    (nf4,) = plan_problems(cpu, quantized=True, fused_mlp=True)
    assert dora.startswith("--fused-mlp with --dora is not supported") and "--quantize nf4" in nf4
    with pytest.raises(ValueError, match="--fused-mlp with --dora"):
        plan_runtime(LlamaConfig(**TINY), cpu, torch.float32, lora_config=LoRAConfig(4, 8, use_dora=True),
                     fused_mlp=True)
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as m:
        m.setattr("tinyllama.runtime.varlen_kernel", lambda: None)
        assert plan_problems(cuda, varlen=True)[0].startswith("--varlen: torch")
        assert plan_problems(cpu, varlen=True) == []  # a CPU runs packed segments on the plain path


def test_the_plan_on_a_cpu_is_the_plain_path_with_what_was_asked():
    plan = plan_runtime(LlamaConfig(**TINY), torch.device("cpu"), torch.float32, lora_config=LoRAConfig(4, 8))
    assert (plan.packing, plan.varlen, plan.fused_mlp, plan.gqa_in_place) == (False, False, False, True)
    asked = plan_runtime(LlamaConfig(**TINY), torch.device("cpu"), torch.float32, lora_config=LoRAConfig(4, 8),
                         packing=True, fused_mlp=True, varlen=True, compile_scope="layers")
    assert (asked.packing, asked.varlen, asked.fused_mlp, asked.compile_scope) == (True, True, True, "layers")
    assert "fast paths: varlen, fused_mlp, gqa_in_place, compiled (layers, default)" in asked.describe()
    assert train.TrainConfig().strict_fast_paths is False
