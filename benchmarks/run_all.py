"""Run every ``benchmarks/bench_*.py`` and write one table (name, baseline, ours, ratio,
machine) into ``docs/benchmarks.md`` between the ``<!-- bench:start -->`` /
``<!-- bench:end -->`` markers.

    python benchmarks/run_all.py               # run all, update docs/benchmarks.md
    python benchmarks/run_all.py --no-doc      # only print the table
    python benchmarks/run_all.py --stbp-reference-dir DIR   # the full STBP step also against
                                               # the reference's own, from its STBP folder
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from docblock import replace_block  # noqa: E402

DOC = os.path.join(ROOT, "docs", "benchmarks.md")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def parse(output: str) -> tuple[str, list[list[str]]]:
    """(machine line, rows of [benchmark, baseline, ours, ratio]) from a benchmark's output."""
    machine = next((ln.split(":", 1)[1].strip() for ln in output.splitlines()
                    if ln.startswith("machine:")), "?")
    rows = []
    for ln in output.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("|") and len(cells) == 4 and not set(cells[0]) <= set("-") \
                and cells[0] != "benchmark":
            rows.append(cells)
    return machine, rows


def table(results: list[tuple[str, str, list[list[str]]]]) -> str:
    lines = ["| script | benchmark | baseline (s) | ours (s) | ratio | machine |",
             "|---|---|---|---|---|---|"]
    for script, machine, rows in results:
        for name, base, ours, ratio in rows:
            lines.append(f"| {script} | {name} | {base} | {ours} | {ratio} | {machine} |")
    return "\n".join(lines)


def update_doc(path: str, text: str) -> None:
    """Replace the table between the markers of ``path`` (added at the end if it has none)."""
    replace_block(path, START, END, text, append=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py and write their "
                                "combined table into docs/benchmarks.md.")
    p.add_argument("--no-doc", "--no-readme", dest="no_doc", action="store_true",
                   help="only print the table, write no file")
    p.add_argument("--doc", "--readme", dest="doc", default=DOC, metavar="PATH",
                   help="the markdown file whose bench block gets the table "
                        "(default: docs/benchmarks.md)")
    p.add_argument("--pattern", default=os.path.join(HERE, "bench_*.py"))
    p.add_argument("--stbp-reference-dir", default=None, metavar="DIR",
                   help="passed to bench_stbp_step.py as --reference-dir")
    args = p.parse_args(argv)
    results = []
    for script in sorted(glob.glob(args.pattern)):
        name = os.path.basename(script)
        print(f"running {name} ...", flush=True)
        extra = (["--reference-dir", args.stbp_reference_dir]
                 if args.stbp_reference_dir and name == "bench_stbp_step.py" else [])
        proc = subprocess.run([sys.executable, script, *extra], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        machine, rows = parse(proc.stdout)
        results.append((name, machine, rows))
    text = table(results)
    print(text)
    if not args.no_doc:
        update_doc(args.doc, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
