"""The training step of this tree against an older tree's, `make bench`'s runs alternated on one machine.

    git archive 7f7c155 | (mkdir -p ab-base && tar -x -C ab-base)   # the tree to compare with
    python -m bench.step_ab --base ab-base --out runs/step_ab -- --device cuda --shape full --ranks 64 \\
        --workloads W1,W2-packed --systems this --steps 64 --no-decode

Everything after `--` is `python -m bench.bench`'s arguments, run from each tree's root (so each tree's own
code trains, with each tree's own benchmark). The runs alternate base, this, this, base (ABBA) for `--rounds`
rounds, so a drift in the machine's speed falls on both sides. Reported per (workload, rank): the median over
runs of each run's median step time, the range of the runs, and this / base. Written to `--out`: step_ab.md and
step_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def order(rounds: int) -> list[str]:
    """The trees in the order they run: ABBA per round."""
    return ["base", "this", "this", "base"] * rounds


def run_bench(root: Path, bench_args: list[str], out_dir: Path, name: str) -> dict:
    """One `bench.bench` run from `root`, its results JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "bench.bench", *bench_args, "--out-dir", str(out_dir), "--name", name],
                   cwd=root, env=env, check=True)
    return json.loads((out_dir / f"{name}.json").read_text())


def summarize(runs: list[tuple[str, dict]]) -> list[dict]:
    """Per (system, workload, rank): each tree's run medians (ms a step), their median, and this / base."""
    steps: dict[tuple, dict[str, list[float]]] = {}
    for tree, result in runs:
        for row in result["rows"]:
            key = (row["system"], row["workload"], row["rank"])
            steps.setdefault(key, {"base": [], "this": []})[tree].append(row["step_ms_median"])
    table = []
    for (system, workload, rank), by_tree in steps.items():
        medians = {tree: statistics.median(ms) if ms else None for tree, ms in by_tree.items()}
        ratio = medians["this"] / medians["base"] if medians["this"] and medians["base"] else None
        table.append({"system": system, "workload": workload, "rank": rank, **{f"{t}_ms": by_tree[t] for t in by_tree},
                      "base_median_ms": medians["base"], "this_median_ms": medians["this"], "this_over_base": ratio})
    return table


def lines(table: list[dict]) -> list[str]:
    def cell(ms, runs):
        return "n/a" if ms is None else f"{ms:.1f} ({min(runs):.1f}-{max(runs):.1f})"

    out = ["| system | workload | rank | base: ms a step (runs' range) | this | this / base |",
           "|---|---|---|---|---|---|"]
    for r in table:
        ratio = "n/a" if r["this_over_base"] is None else f"{r['this_over_base']:.3f}"
        out.append(f"| {r['system']} | {r['workload']} | {r['rank']} | {cell(r['base_median_ms'], r['base_ms'])} | "
                   f"{cell(r['this_median_ms'], r['this_ms'])} | {ratio} |")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the root of the tree to compare with (e.g. from git archive)")
    p.add_argument("--rounds", type=int, default=1, help="ABBA rounds")
    p.add_argument("--out", default="runs/step_ab")
    args = p.parse_args(ours)
    base = Path(args.base).resolve()
    if not (base / "bench" / "bench.py").is_file():
        p.error(f"--base {args.base}: expected a tree with bench/bench.py (git archive COMMIT | tar -x -C DIR), "
                "found none")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, tree in enumerate(order(args.rounds)):
            print(f"== run {i + 1}: {tree}", flush=True)
            runs.append((tree, run_bench(base if tree == "base" else HERE, bench_args, Path(tmp), f"{tree}-{i}")))
    table = summarize(runs)
    first = runs[0][1]
    text = [f"# This tree's training step against {base.name}'s ({first['device']})", "",
            f"- date {first['date']}; torch {first['torch']}; order {', '.join(order(args.rounds))}",
            f"- command: `python -m bench.step_ab {' '.join(argv)}`", "", *lines(table)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_ab.md").write_text("\n".join(text) + "\n")
    (out / "step_ab.json").write_text(json.dumps({"runs": [[t, r] for t, r in runs], "table": table}, indent=1)
                                      + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
