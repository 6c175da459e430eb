"""benchmarks/run_all.py: parsing of benchmark tables and the block in docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

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


def test_doc_block_is_replaced_not_duplicated(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# T\n\ntext\n")
    machine, rows = run_all.parse(SAMPLE)
    run_all.update_doc(str(doc), run_all.table([("bench_x.py", machine, rows)]))
    run_all.update_doc(str(doc), run_all.table([("bench_y.py", machine, rows[:1])]))
    s = doc.read_text()
    assert s.count(run_all.START) == 1 and s.count(run_all.END) == 1
    assert "bench_y.py" in s and "bench_x.py" not in s
    assert s.startswith("# T\n\ntext\n")


def test_default_target_is_the_benchmarks_page():
    """The table goes to docs/benchmarks.md, which holds the block; the README links it."""
    assert Path(run_all.DOC).resolve() == ROOT / "docs" / "benchmarks.md"
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert text.count(run_all.START) == 1 and text.count(run_all.END) == 1
    assert text.index(run_all.START) < text.index(run_all.END)
    readme = (ROOT / "README.md").read_text()
    assert run_all.START not in readme and "docs/benchmarks.md" in readme


def test_runs_scripts_matching_pattern(tmp_path):
    bench = tmp_path / "bench_fake.py"
    bench.write_text("print('''" + SAMPLE + "''')\n")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"x\n{run_all.START}\nold\n{run_all.END}\ny\n")
    assert run_all.main(["--pattern", str(tmp_path / "bench_*.py"), "--doc", str(doc)]) == 0
    s = doc.read_text()
    assert "| bench_fake.py | constraint, bin | 3.115 | 0.295 | 10.6x faster |" in s
    assert s.startswith(f"x\n{run_all.START}\n| script |") and s.endswith(f"{run_all.END}\ny\n")
    assert "old" not in s
    # --no-doc only prints
    doc.write_text("unchanged\n")
    assert run_all.main(["--pattern", str(tmp_path / "bench_*.py"), "--doc", str(doc),
                         "--no-doc"]) == 0
    assert doc.read_text() == "unchanged\n"


def test_stbp_reference_dir_reaches_the_step_benchmark_only(tmp_path, capsys):
    echo = "import sys\nprint('| ' + ' '.join(sys.argv[1:]) + ' args | 1 | 1 | 1.0x faster |')\n"
    for name in ("bench_stbp_step.py", "bench_other.py"):
        (tmp_path / name).write_text(echo)
    assert run_all.main(["--pattern", str(tmp_path / "bench_*.py"), "--no-doc",
                         "--stbp-reference-dir", "/r/STBP"]) == 0
    out = capsys.readouterr().out
    assert "| bench_stbp_step.py | --reference-dir /r/STBP args |" in out
    assert "| bench_other.py | args |" in out
