"""benchmarks/run_all.py: parsing of benchmark tables and the README block."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run_all  # noqa: E402

SAMPLE = """machine: x86_64, 2 threads, torch 2.14.1
| benchmark | baseline (s) | ours (s) | ratio |
|---|---|---|---|
| constraint, bin | 3.115 | 0.295 | 10.6x faster |
| step | 0.539 | 0.556 | +3.1 % |
"""


def test_parse_rows_and_machine():
    machine, rows = run_all.parse(SAMPLE)
    assert machine == "x86_64, 2 threads, torch 2.14.1"
    assert rows == [["constraint, bin", "3.115", "0.295", "10.6x faster"],
                    ["step", "0.539", "0.556", "+3.1 %"]]


def test_readme_block_is_replaced_not_duplicated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\ntext\n")
    machine, rows = run_all.parse(SAMPLE)
    run_all.update_readme(str(readme), run_all.table([("bench_x.py", machine, rows)]))
    run_all.update_readme(str(readme), run_all.table([("bench_y.py", machine, rows[:1])]))
    s = readme.read_text()
    assert s.count(run_all.START) == 1 and s.count(run_all.END) == 1
    assert "bench_y.py" in s and "bench_x.py" not in s
    assert s.startswith("# T\n\ntext\n")


def test_runs_scripts_matching_pattern(tmp_path):
    bench = tmp_path / "bench_fake.py"
    bench.write_text("print('''" + SAMPLE + "''')\n")
    readme = tmp_path / "README.md"
    readme.write_text("x\n")
    assert run_all.main(["--pattern", str(tmp_path / "bench_*.py"), "--readme", str(readme)]) == 0
    assert "| bench_fake.py | constraint, bin | 3.115 | 0.295 | 10.6x faster |" in readme.read_text()
