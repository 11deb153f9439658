"""--tensorboard: the event files hold exactly the scalars metrics.jsonl holds; without the package, one clear line."""

from __future__ import annotations

import builtins

import pytest

import train
from helpers import GUANACO_SAMPLE, metrics, run


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def from_jsonl(rows) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should hold: every number of every metrics.jsonl row, under `split/name`."""
    out = {}
    for row in rows:
        for name, value in row.items():
            if name not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(f"{row['split']}/{name}", []).append((row["step"], value))
    return out


def assert_same(got, want):
    assert got.keys() == want.keys()
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # stored as float32


@pytest.mark.slow
def test_event_files_hold_every_logged_step_and_scalar(tmp_path, tiny_ckpt):
    _, rows = run(tmp_path, tiny_ckpt, steps=4, log_every=2, eval_every=2, eval_data=str(GUANACO_SAMPLE),
                  tensorboard=True)
    want = from_jsonl(rows)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "train/mfu", "eval/loss",
            "eval/ppl"} <= want.keys()
    assert [s for s, _ in want["eval/loss"]] == [2, 4]
    assert_same(scalars(tmp_path / "run" / "tensorboard"), want)


@pytest.mark.slow
def test_resuming_from_an_earlier_checkpoint_shows_each_step_once(tmp_path, tiny_ckpt):
    run(tmp_path, tiny_ckpt, steps=4, save_every=2, keep_checkpoints=3, tensorboard=True)
    run(tmp_path, tiny_ckpt, steps=4, resume=str(tmp_path / "run" / "checkpoint-2"), tensorboard=True)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the first leg's steps 3 and 4 were set aside
    assert_same(scalars(tmp_path / "run" / "tensorboard"), from_jsonl(rows))


def test_without_the_package_the_run_is_refused_naming_the_extra(monkeypatch, tmp_path, tiny_ckpt):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("tensorboard", "torch.utils.tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.delitem(__import__("sys").modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(SystemExit, match=r"pip install -e \.\[tensorboard\]"):
        train.train(train.TrainConfig(model=str(tiny_ckpt), data=str(GUANACO_SAMPLE), out=str(tmp_path / "x"),
                                     tensorboard=True))
    assert not (tmp_path / "x").exists()  # refused before the output folder was touched
