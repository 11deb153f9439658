"""Inputs with no bound or no time limit, and inputs that were taken silently (issue 32, items 17-22): each is
refused in seconds with one line naming what was wrong, or read as its writer meant."""

from __future__ import annotations

import time

import pytest

import train
from helpers import GUANACO_SAMPLE
from tinyllama.templates import RenderTimeout, Template

NEVER_ENDS = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
HI = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def fails(argv) -> str:
    """The message `python train.py ARGV` exits with (asserted one line, not a traceback)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = str(e.value.code)
    assert e.value.code not in (0, None)
    assert "\n" not in message.strip(), message
    return message


def args(model, tmp_path, data=GUANACO_SAMPLE, *extra) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--eval-data", "none", "--rank", "4", "--steps", "1",
            "--batch-size", "2", "--max-len", "128", "--no-samples", "--out", str(tmp_path / "run"), *extra]


# ---- 17: a render that never ends ----------------------------------------------------------------------------

@pytest.mark.parametrize("source", [NEVER_ENDS, NEVER_ENDS.replace("x", ""),  # a loop that writes nothing
                                    "{% macro f(n) %}{% for i in range(100000) %}{{ f(n + 1) if n < 2 else '' }}"
                                    "{% endfor %}{% endmacro %}{{ f(0) }}"],
                         ids=["nested loops", "silent loops", "macro"])
def test_a_render_that_takes_too_long_is_stopped_naming_the_template(source):
    template = Template("loops.jinja", source, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RenderTimeout, match=r"^chat template 'loops.jinja' took longer than 0.3 s to render one "
                                            r"conversation .*--template-timeout$"):
        template.render(HI)
    assert time.monotonic() - start < 1.5
    assert Template("ok", "{% for m in messages %}{{ m['content'] }}{% endfor %}", timeout=0.3).render(HI) \
        == "hihello"  # the deadline is per render: the next one starts afresh


def test_train_stops_on_a_template_that_never_ends(tmp_path, tiny_ckpt):
    jinja = tmp_path / "loops.jinja"
    jinja.write_text(NEVER_ENDS)
    message = fails(args(tiny_ckpt, tmp_path, GUANACO_SAMPLE, "--chat-template", str(jinja),
                         "--template-timeout", "0.3"))
    assert message == (f"train.py: error: chat template {str(jinja)!r} took longer than 0.3 s to render one "
                       "conversation (a loop that never ends?): fix the template, or allow more time with "
                       "--template-timeout")
    assert "--template-timeout must be a finite number of seconds > 0, got 0.0" in fails(
        args(tiny_ckpt, tmp_path, GUANACO_SAMPLE, "--template-timeout", "0"))
