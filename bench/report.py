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
from pathlib import Path

from bench.decode_bench import format_table

# What this project aims for: W1 tokens/s at the focus rank (full shape, CUDA), its speed over transformers + peft
# (eager and compiled, W1 and useful tokens/s on W2), and how far any rank's time may be above rank 4's.
TARGETS = {"w1_tokens_per_s": 120_000, "w1_vs_hf_compile": 1.5, "w1_vs_hf_eager": 3.0, "w2_vs_hf_eager": 2.5,
           "rank_spread": 0.15}


def fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def find(rows, system, workload, rank) -> dict | None:
    for r in reversed(rows):
        if (r["system"], r["workload"], r["rank"]) == (system, workload, rank):
            return r
    return None


def ratio(row, rows, system) -> float | None:
    """This row's tokens/s over the baseline's on the same workload family (W2: its pad-to-longest run)."""
    base_workload = "W1" if row["workload"] == "W1" else "W2-padded"
    base = find(rows, system, base_workload, row["rank"])
    if base is None or row["system"].startswith("hf") or not base["tokens_per_s"]:
        return None
    return row["tokens_per_s"] / base["tokens_per_s"]


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
    head = ("| system | workload | rank | steps | time (s) | median step (ms) | tokens/s | padding | MFU | peak GiB |"
            + (" vs hf-eager | vs hf-compile |" if has_hf else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['system']} | {r['workload']} | {r['rank']} | {r['steps']} | {r['seconds']:.2f} | "
                f"{r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['padding_fraction']:.1f}% | "
                f"{100 * r['mfu']:.1f}% | {fmt(r['peak_gib'], '.2f')} |")
        if has_hf:
            line += "".join(f" {fmt(ratio(r, rows, s), '.2f', '')}{'x' if ratio(r, rows, s) else ''} |"
                            for s in ("hf-eager", "hf-compile"))
        lines.append(line)
    return lines


def target_checks(res) -> list[str]:
    """The targets stored in the results (TARGETS when they were written) against what was measured; a target
    that needs a run not made says so, and a GPU target measured on a CPU is shown for reference only."""
    rows, t, cuda = res["rows"], res["targets"], res["device_type"] == "cuda"
    focus = sorted({r["rank"] for r in rows if r["system"].startswith("hf")} or {64})[0]
    out = []

    def check(label, ok, detail, gpu_target=False):
        verdict = ("for reference (a GPU target)" if gpu_target and not cuda else
                   "MET" if ok else "NOT MET" if ok is not None else "n/a")
        out.append(f"- {verdict}: {label}: {detail}")

    w1 = {r["rank"]: r for r in rows if r["system"] == "this" and r["workload"] == "W1"}
    if 4 in w1 and len(w1) > 1:
        worst = max(w1.values(), key=lambda r: r["seconds"])
        spread = worst["seconds"] / w1[4]["seconds"] - 1
        check(f"every rank within {100 * t['rank_spread']:.0f}% of rank 4's time", spread <= t["rank_spread"],
              f"slowest is rank {worst['rank']} at {100 * spread:+.1f}% of rank 4 (each rank: "
              + ", ".join(f"{r} {100 * (w1[r]['seconds'] / w1[4]['seconds'] - 1):+.0f}%" for r in sorted(w1)) + ")")
    eager, comp = (find(rows, s, "W1", focus) for s in ("hf-eager", "hf-compile"))
    # This project's best W1 run at the focus rank, with or without --compile (the label says which).
    ours = max((r for r in rows if r["system"].startswith("this") and r["workload"] == "W1" and r["rank"] == focus),
               key=lambda r: r["tokens_per_s"], default=None)
    if ours:
        out.append(f"- (this project's W1 rank {focus} below: the `{ours['system']}` run)")
    if ours and cuda and res["shape"] == "full":
        check(f"W1 rank {focus} >= {t['w1_tokens_per_s']:,} tokens/s", ours["tokens_per_s"] >= t["w1_tokens_per_s"],
              f"{ours['tokens_per_s']:,.0f} tokens/s, MFU {100 * ours['mfu']:.1f}%")
    if ours and comp:
        x = ours["tokens_per_s"] / comp["tokens_per_s"]
        check(f"W1 >= {t['w1_vs_hf_compile']}x transformers + peft under torch.compile", x >= t["w1_vs_hf_compile"],
              f"{x:.2f}x", gpu_target=True)
    if ours and eager:
        x = ours["tokens_per_s"] / eager["tokens_per_s"]
        check(f"W1 about {t['w1_vs_hf_eager']}x transformers + peft eager", x >= t["w1_vs_hf_eager"], f"{x:.2f}x",
              gpu_target=True)
        if cuda:
            check("W1 peak memory no higher than transformers + peft eager", ours["peak_gib"] <= eager["peak_gib"],
                  f"{ours['peak_gib']:.2f} vs {eager['peak_gib']:.2f} GiB")
        else:
            a, b = ours["step_ms_median"], eager["step_ms_median"]
            check("CPU: step time no higher than transformers + peft eager's", a <= b,
                  f"median step {a:.1f} vs {b:.1f} ms ({a / b:.2f}x)")
    w2_base = find(rows, "hf-eager", "W2-padded", focus)
    w2_ours = [r for r in rows if r["system"].startswith("this") and r["workload"].startswith("W2")]
    if w2_base and w2_ours:
        best = max(w2_ours, key=lambda r: r["tokens_per_s"])
        x = best["tokens_per_s"] / w2_base["tokens_per_s"]
        check(f"W2 useful tokens/s >= {t['w2_vs_hf_eager']}x transformers + peft eager (pad-to-longest)",
              x >= t["w2_vs_hf_eager"], f"{x:.2f}x ({best['system']} {best['workload']} "
              f"{best['tokens_per_s']:,.0f} vs {w2_base['tokens_per_s']:,.0f} tokens/s"
              + (f"; {res['shape']} shape, not the real one" if res["shape"] != "full" else "") + ")",
              gpu_target=True)
    return out


def setup_lines(res) -> list[str]:
    """The Setup section: what ran, where, on what data, and what the machine was doing meanwhile."""
    setup = {
        "date": res["date"], "device": res["device"], "torch": res["torch"],
        "transformers / peft": f"{res['transformers']} / {res['peft']}" if "transformers" in res else "not run",
        "command": f"`{res['command']}`", "shape": json.dumps(res["model_config"]),
        "steps": f"{res['steps']} per run, the first {res['warmup_steps']} left out of tokens/s",
        "matmul peak": f"{res['peak_flops'] / 1e12:.2f} TFLOP/s ({res['peak_flops_note']})",
    }
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
        lines += ["", "All runs (tokens/s: steady state, real non-pad tokens; time: all steps; ratios: this "
                      "project's tokens/s over the baseline's on the same workload, W2 against the baseline's "
                      "pad-to-longest W2-padded):", ""]
        lines += comparison_table(res)
        lines += ["", "Targets:", ""] + target_checks(res)
    lines += ["", "## Setup", ""] + setup_lines(res)
    if res.get("decode_rows"):
        lines += ["", f"## Decoding ({res.get('decode_note', '')})", "", "```", format_table(res["decode_rows"]),
                  "```"]
    elif res.get("decode_note"):
        lines += ["", f"Decoding: {res['decode_note']}"]
    if res.get("errors"):
        lines += ["", "## Runs that failed", ""] + [f"- {e}" for e in res["errors"]]
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
