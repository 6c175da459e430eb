"""Run every ``benchmarks/bench_*.py`` and write one table (name, baseline, ours, ratio,
machine) into the README between the ``<!-- bench:start -->`` / ``<!-- bench:end -->`` markers.

    python benchmarks/run_all.py               # run all, update README.md
    python benchmarks/run_all.py --no-readme   # only print the table
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "..", "README.md")
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


def update_readme(path: str, text: str) -> None:
    with open(path) as f:
        s = f.read()
    block = f"{START}\n{text}\n{END}"
    if START in s and END in s:
        s = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, s, flags=re.S)
    else:
        s = s.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--readme", default=README)
    p.add_argument("--pattern", default=os.path.join(HERE, "bench_*.py"))
    args = p.parse_args(argv)
    results = []
    for script in sorted(glob.glob(args.pattern)):
        name = os.path.basename(script)
        print(f"running {name} ...", flush=True)
        proc = subprocess.run([sys.executable, script], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        machine, rows = parse(proc.stdout)
        results.append((name, machine, rows))
    text = table(results)
    print(text)
    if not args.no_readme:
        update_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
