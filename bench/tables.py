"""The training benchmark's results, rendered for people: the rank table, every run side by side, the targets with
their verdicts, the setup, and the .md/.json pair `bench.bench` writes after every run.

Everything here reads the results dict alone (what the .json file holds), never a live run, so a results file
written by any earlier run, or merged from several (`python -m bench.bench --combine`), renders the same way.
What the columns mean, and how each number is measured, is in `bench.bench`'s docstring.

Deliberately left out: measuring anything, and plots.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bench.decode_bench import format_table

# What this project aims for. GPU targets hold for one H100/H200 at the full shape: W1 tokens/s at rank 64, W2
# useful tokens/s packed in rows of 1024, W1 peak memory at rank 64, and the seconds a compiled run takes to its
# first step. Anywhere: W2 useful tokens/s over the best transformers + peft configuration's, how far any rank's
# time may be above rank 4's, and (on a CPU) the step time over transformers + peft eager's.
TARGETS = {"w1_tokens_per_s": 120_000, "w2_packed_tokens_per_s": 110_000, "w2_packed_max_len": 1024,
           "w2_vs_best_hf": 1.5, "w1_peak_gib": 8.0, "compile_warmup_s": 60.0, "rank_spread": 0.15,
           "cpu_step_vs_hf_eager": 1.0}
HF_W2 = ("W2-padded", "W2-packed")  # the transformers + peft runs a W2 row is compared with


def fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def find(rows, system, workload, rank) -> dict | None:
    for r in reversed(rows):
        if (r["system"], r["workload"], r["rank"]) == (system, workload, rank):
            return r
    return None


def best_hf(rows, workload: str, rank: int) -> dict | None:
    """The fastest transformers + peft run at this rank on the workload's family: W1, or W2 (useful tokens/s of
    its W2-padded and W2-packed runs: padded or padding-free, whichever a user would pick)."""
    family = ("W1",) if workload == "W1" else HF_W2 if workload.startswith("W2") else (workload,)
    hf = [r for r in rows if r["system"].startswith("hf") and r["workload"] in family and r["rank"] == rank
          and r.get("tokens_per_s")]
    return max(hf, key=lambda r: r["tokens_per_s"], default=None)


def vs_best_hf(row, rows) -> float | None:
    """This row's tokens/s over the best transformers + peft run's on the same workload family and rank."""
    best = best_hf(rows, row["workload"], row["rank"])
    return row["tokens_per_s"] / best["tokens_per_s"] if best and row.get("tokens_per_s") else None


def first_step(row) -> tuple[float | None, bool]:
    """(seconds from the start of the run to the end of its first step, measured?). Rows written before it was
    recorded: wall time minus the other steps' times, an upper bound (it also holds what ran after the steps)."""
    if row.get("first_step_s") is not None:
        return row["first_step_s"], True
    if row.get("wall_s") is not None and row.get("step_s"):
        return row["wall_s"] - sum(row["step_s"][1:]), False
    return None, False


def fmt_first_step(row) -> str:
    seconds, measured = first_step(row)
    return "n/a" if seconds is None else f"{'' if measured else '~'}{seconds:.1f}"


def describe(row, useful: bool = False) -> str:
    return (f"{row['system']} {row['workload']} {row['tokens_per_s']:,.0f} {'useful ' if useful else ''}"
            "tokens/s")


def title(res) -> str:
    shape = res["shape"]
    c = res["model_config"]
    what = ("TinyLlama-1.1B shape, random weights" if shape == "full" else
            f"SCALED-DOWN {shape.upper()} CONFIGURATION, not the real model: {c['num_hidden_layers']} layers, "
            f"width {c['hidden_size']}, {c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, "
            f"MLP {c['intermediate_size']}, vocabulary {c['vocab_size']}")
    return (f"LoRA rank table: {res['steps']} optimizer steps per rank of train.py on {res['device']} "
            f"({res['dtype']}), torch {res['torch']}; {what}")


def rank_table(res) -> list[str]:
    """The reference table's columns, from this project's W1 runs, one line per rank."""
    rows = [r for r in res["rows"] if r["system"] == "this" and r["workload"] == "W1"]
    if not rows:
        return []
    w = res["workloads"].get("W1", {}).get("description", "W1")
    lines = [f"W1 ({w}), alpha = rank, LoRA on {','.join(res['lora_targets'])}:", "",
             "| Rank | Training Time (s) | Trainable Params | Total Params | Trainable % | tokens/s | MFU | "
             "peak memory (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["rank"]):
        lines.append(f"| {r['rank']} | {r['seconds']:.2f} | {r['trainable_params']:,} | {r['total_params']:,} | "
                     f"{r['trainable_percent']:.2f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                     f"{fmt(r['peak_gib'], '.2f')} |")
    return lines


def comparison_table(res) -> list[str]:
    rows = res["rows"]
    has_hf = any(r["system"].startswith("hf") for r in rows)
    head = ("| system | workload | rank | steps | time (s) | median step (ms) | tokens/s | padding | MFU | peak GiB | "
            "first step (s) |" + (" vs best HF |" if has_hf else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['system']} | {r['workload']} | {r['rank']} | {r['steps']} | {r['seconds']:.2f} | "
                f"{r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['padding_fraction']:.1f}% | "
                f"{100 * r['mfu']:.1f}% | {fmt(r['peak_gib'], '.2f')} | {fmt_first_step(r)} |")
        if has_hf:
            line += f" {fmt(vs_best_hf(r, rows), '.2f', '')}{'x' if vs_best_hf(r, rows) else ''} |"
        lines.append(line)
    return lines


def best_hf_lines(res) -> list[str]:
    """Which transformers + peft run each ratio divides by."""
    rows = res["rows"]
    keys = sorted({("W1" if r["workload"] == "W1" else "W2", r["rank"]) for r in rows
                   if r["system"].startswith("hf") and (r["workload"] == "W1" or r["workload"] in HF_W2)})
    return [f"- {family} rank {rank}: {describe(b, useful=family == 'W2')}"
            for family, rank in keys if (b := best_hf(rows, "W1" if family == "W1" else "W2-padded", rank))]


@dataclass
class _Measured:
    """What every target check reads from a results dict."""
    rows: list[dict]
    t: dict  # the targets: TARGETS, with the values stored in the results where they name the same target
    focus: int  # the rank of the comparisons: the transformers + peft runs', else 64
    shape: str
    cuda: bool
    on_gpu: bool  # on CUDA at the full shape, where the GPU targets hold
    elsewhere: str  # why a GPU target is not measured here

    @classmethod
    def of(cls, res) -> _Measured:
        rows, cuda, full = res["rows"], res["device_type"] == "cuda", res["shape"] == "full"
        return cls(rows=rows, t={**TARGETS, **{k: v for k, v in res.get("targets", {}).items() if k in TARGETS}},
                   focus=sorted({r["rank"] for r in rows if r["system"].startswith("hf")} or {64})[0],
                   shape=res["shape"], cuda=cuda, on_gpu=cuda and full,
                   elsewhere=f"a GPU target at the full shape; this run: {res['device_type']}, {res['shape']} shape")

    def check(self, label, ok, detail, gpu_target=False) -> str:
        away = gpu_target and not self.on_gpu
        verdict = f"not measured ({self.elsewhere})" if away else "MET" if ok else "NOT MET"
        return f"- {verdict}: {label}: {detail}" + (" here, for reference" if away else "")

    def ours_best(self, workloads) -> dict | None:
        """This project's fastest run at the focus rank on one of `workloads`, with or without --compile."""
        return max((r for r in self.rows if r["system"].startswith("this") and r["workload"] in workloads
                    and r["rank"] == self.focus), key=lambda r: r["tokens_per_s"], default=None)


def _missing(label, why) -> str:
    return f"- not measured ({why}): {label}"


def _w1_tokens(m: _Measured) -> str:
    ours = m.ours_best(("W1",))  # the line says which run, compiled or not
    label = f"W1 rank {m.focus} >= {m.t['w1_tokens_per_s']:,} tokens/s"
    if not ours:
        return _missing(label, f"no W1 run of this project at rank {m.focus}")
    return m.check(label, ours["tokens_per_s"] >= m.t["w1_tokens_per_s"], f"{ours['tokens_per_s']:,.0f} tokens/s, "
                   f"MFU {100 * ours['mfu']:.1f}% (the `{ours['system']}` run)", gpu_target=True)


def _w2_packed_tokens(m: _Measured) -> str:
    t = m.t
    packed = [r for r in m.rows if r["system"].startswith("this") and r["workload"] == "W2-packed"
              and r["rank"] == m.focus and (r["max_len"] == t["w2_packed_max_len"] or not m.on_gpu)]
    label = f"W2 packed >= {t['w2_packed_tokens_per_s']:,} useful tokens/s at max_len {t['w2_packed_max_len']}"
    if not packed:
        return _missing(label, f"no W2-packed run of this project at max_len {t['w2_packed_max_len']}, rank {m.focus}")
    best = max(packed, key=lambda r: r["tokens_per_s"])
    return m.check(label, best["tokens_per_s"] >= t["w2_packed_tokens_per_s"], f"{best['tokens_per_s']:,.0f} useful "
                   f"tokens/s (the `{best['system']}` run, max_len {best['max_len']})", gpu_target=True)


def _w2_vs_best_hf(m: _Measured) -> str:
    ours, hf = m.ours_best(HF_W2), best_hf(m.rows, "W2-padded", m.focus)
    label = f"W2 useful tokens/s >= {m.t['w2_vs_best_hf']}x the best transformers + peft configuration"
    if not (ours and hf):
        return _missing(label, "no W2-padded/W2-packed run of " + ("this project" if not ours else
                                                                  "transformers + peft") + f" at rank {m.focus}")
    x = ours["tokens_per_s"] / hf["tokens_per_s"]
    return m.check(label, x >= m.t["w2_vs_best_hf"], f"{x:.2f}x ({describe(ours, True)} vs the best, "
                   f"{describe(hf, True)}" + ("" if m.shape == "full" else f"; {m.shape} shape, not the real one")
                   + ")")


def _w1_memory(m: _Measured) -> str:
    ours = m.ours_best(("W1",))
    label = f"W1 rank {m.focus} peak memory <= {m.t['w1_peak_gib']:g} GiB"
    if not ours or ours.get("peak_gib") is None:
        return _missing(label, f"no W1 run of this project at rank {m.focus}" if not ours else
                        f"{m.elsewhere}: no device memory to measure")
    return m.check(label, ours["peak_gib"] <= m.t["w1_peak_gib"], f"{ours['peak_gib']:.2f} GiB (the "
                   f"`{ours['system']}` run)", gpu_target=True)


def _compile_warmup(m: _Measured) -> str:
    compiled = [r for r in m.rows if r["system"].startswith("this") and r.get("compile")]
    label = f"compile warm-up <= {m.t['compile_warmup_s']:g} s (start of the run to the end of its first step)"
    if not compiled:
        return _missing(label, "no compiled run of this project")
    timed = [x for x in [(r, *first_step(r)) for r in compiled] if x[1] is not None]
    if not timed:
        return _missing(label, "the compiled runs recorded no wall time")
    worst = max(timed, key=lambda x: x[1])
    each = ", ".join(f"{r['system']} {r['workload']} {'' if measured else '~'}{s:.1f} s" for r, s, measured in timed)
    derived = ("" if all(measured for _, _, measured in timed) else
               "; ~: wall time minus the other steps, an upper bound")
    return m.check(label, worst[1] <= m.t["compile_warmup_s"], f"slowest {worst[1]:.1f} s ({each}{derived})",
                   gpu_target=True)


def _rank_spread(m: _Measured) -> str:
    w1 = {r["rank"]: r for r in m.rows if r["system"] == "this" and r["workload"] == "W1"}
    label = f"every rank within {100 * m.t['rank_spread']:.0f}% of rank 4's time"
    if 4 not in w1 or len(w1) < 2:
        return _missing(label, "no W1 rank table with rank 4 and another rank")
    worst = max(w1.values(), key=lambda r: r["seconds"])
    spread = worst["seconds"] / w1[4]["seconds"] - 1
    each = ", ".join(f"{r} {100 * (w1[r]['seconds'] / w1[4]['seconds'] - 1):+.0f}%" for r in sorted(w1))
    return m.check(label, spread <= m.t["rank_spread"], f"slowest is rank {worst['rank']} at {100 * spread:+.1f}% of "
                   f"rank 4 (each rank: {each})")


def _cpu_step_vs_hf_eager(m: _Measured) -> str:
    ours, eager = m.ours_best(("W1",)), find(m.rows, "hf-eager", "W1", m.focus)
    label = "CPU: step time no higher than transformers + peft eager's"
    if m.cuda:
        return _missing(label, "a CPU target; this run is on CUDA")
    if not (ours and eager):
        return _missing(label, f"no W1 run at rank {m.focus} of " + ("this project" if not ours else "hf-eager"))
    a, b = ours["step_ms_median"], eager["step_ms_median"]
    return m.check(label, a <= b * m.t["cpu_step_vs_hf_eager"], f"median step {a:.1f} vs {b:.1f} ms ({a / b:.2f}x; "
                   f"the `{ours['system']}` run, W1 rank {m.focus})")


TARGET_CHECKS = (_w1_tokens, _w2_packed_tokens, _w2_vs_best_hf, _w1_memory, _compile_warmup, _rank_spread,
                 _cpu_step_vs_hf_eager)


def target_checks(res) -> list[str]:
    """The targets (TARGETS; the values stored in the results where they name the same target) against what
    was measured. Each line says MET, NOT MET, or not measured and why: a run that was not made, or a GPU target
    on another device or shape (its value then shown for reference)."""
    measured = _Measured.of(res)
    return [check(measured) for check in TARGET_CHECKS]


def setup_lines(res) -> list[str]:
    """The Setup section: what ran, where, on what data, and what the machine was doing meanwhile."""
    setup = {
        "date": res["date"], "device": res["device"], "torch": res["torch"],
        "transformers / peft": f"{res['transformers']} / {res['peft']}" if "transformers" in res else "not run",
        "command": f"`{res['command']}`", "shape": json.dumps(res["model_config"]),
        "steps": f"{res['steps']} per run, the first {res['warmup_steps']} left out of tokens/s",
        "matmul peak": f"{res['peak_flops'] / 1e12:.2f} TFLOP/s ({res['peak_flops_note']})",
    }
    if "liger_kernel" in res:
        setup["Liger-Kernel"] = res["liger_kernel"]
    if res.get("run_steps"):
        setup["other step counts"] = f"--run-steps {res['run_steps']}"
    if res.get("note"):
        setup["note"] = res["note"]
    for n, w in res["workloads"].items():
        setup[f"workload {n}"] = w["description"]
    if res.get("w2_source"):
        setup["W2 data"] = res["w2_source"]
    if res.get("w2_padding_fraction"):
        setup["W2 padding (one epoch)"] = ", ".join(f"{k} {100 * v:.1f}%" for k, v in
                                                    res["w2_padding_fraction"].items())
    loads = [r["load_avg"] for r in res["rows"] if r.get("load_avg") is not None]
    if loads and res["device_type"] == "cpu":
        setup["machine load"] = (f"1-minute load average {min(loads):.1f} to {max(loads):.1f} at the end of the runs "
                                 f"({res['cpu_threads']} torch threads): above that, other work shared the cores")
    fpt = {(r["workload"], r["rank"]): r["flops_per_token"] for r in res["rows"]}
    if fpt:
        setup["FLOPs per token"] = ", ".join(f"{w} r{r}: {v / 1e9:.3f} G" for (w, r), v in sorted(fpt.items()))
    return [f"- {k}: {v}" for k, v in setup.items()]


def render(res) -> str:
    """The results file's markdown: title, rank table, all runs, targets, setup, decoding, failed runs."""
    lines = [f"# {title(res)}", ""]
    lines += rank_table(res)
    if res["rows"]:
        lines += ["", "All runs (tokens/s: steady state, real non-pad tokens; time: all steps; first step: from "
                      "the start of the run to the end of its first step, the compile warm-up of a compiled run, "
                      "~ where derived from wall time; vs best HF: tokens/s over the best transformers + peft "
                      "run's at the same rank, on W1 for W1, on W2-padded or W2-packed for any W2 row, useful "
                      "tokens/s):", ""]
        lines += comparison_table(res)
        if any(r["system"].startswith("hf") for r in res["rows"]):
            lines += ["", "Best transformers + peft run (what vs best HF divides by):", ""] + best_hf_lines(res)
        lines += ["", "Targets:", ""] + target_checks(res)
    lines += ["", "## Setup", ""] + setup_lines(res)
    if res.get("decode_rows"):
        lines += ["", f"## Decoding ({res.get('decode_note', '')})", "", "```", format_table(res["decode_rows"]),
                  "```"]
    elif res.get("decode_note"):
        lines += ["", f"Decoding: {res['decode_note']}"]
    if res.get("errors"):
        lines += ["", "## Runs that failed or were skipped", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def write_results(res, out_dir: Path, name: str) -> Path:
    """`<name>.json` (replaced whole, so a crash mid-write leaves the previous one) and `<name>.md`; the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    os.replace(tmp, out_dir / f"{name}.json")
    md.write_text(render(res))
    return md
