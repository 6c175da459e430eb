"""The miniature replication: job ordering, result reuse, the table, the figure, the block in
docs/mini_replication.md, and one real (tiny) pipeline run end to end."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docblock  # noqa: E402
import mini_replication as mr  # noqa: E402

FAKE = """
import sys, time, pathlib
args = sys.argv[1:]
mode = args[args.index('--quant') + 1] if '--quant' in args else 'fp32'
method = args[args.index('--method') + 1] if '--method' in args else 'cbp'
if 'eval' in args:
    with open('order.txt', 'a') as f:
        f.write('eval ' + mode + ('' if method == 'cbp' else '_' + method) + chr(10))
    print('Test Accuracy:', {'bin': 90.0, 'ter': 91.5, '1bit': 92.0, '2bit': 93.0}[mode]
          - {'cbp': 0.0, 'ste': 1.0, 'ptq': 10.0}[method])
    print('CFS: %g  weight memory: 0.5000 Mbit' % {'cbp': 0.0123, 'ste': 0.05, 'ptq': 0.09}[method])
    print('SynOps/sample: %d  MACs/sample: 10  energy/sample: %g uJ  (3 samples)'
          % ({'bin': 2e6, 'ter': 3e6, '1bit': 4e6, '2bit': 5e6}[mode],
             {'bin': 1.5, 'ter': 2.5, '1bit': 3.5, '2bit': 4.5}[mode]))
elif mode == 'fp32':
    time.sleep(0.3)
    with open('order.txt', 'a') as f:
        f.write('fp32' + chr(10))
    print('Best Test Accuracy : 95.5; pretrained weights in x')
else:
    if not pathlib.Path('order.txt').read_text().startswith('fp32'):
        sys.exit('fp32 did not run first')
    busy = pathlib.Path('busy')
    if '--serial' in args:
        if busy.exists():
            sys.exit('two CBP runs at once')
        busy.write_text(mode)
        time.sleep(0.3)
    if mode == '2bit' and '--fail' in args:
        print('error: boom', file=sys.stderr)
        sys.exit(1)
    busy.unlink(missing_ok=True)
    print('trained', mode)
"""


def fake_pipeline(tmp_path: Path, fail: bool = False, serial: bool = False) -> mr.Pipeline:
    script_dir = tmp_path / "scripts"
    script_dir.mkdir(exist_ok=True)
    (script_dir / "fake.py").write_text(FAKE)
    extra = (["--fail"] if fail else []) + (["--serial"] if serial else [])
    return mr.Pipeline(
        "STBP", str(script_dir), "fake net", 4, "1 / 1", ["fake.py", "--mode", "train"],
        re.compile(r"Best Test Accuracy : ([0-9.]+)"),
        lambda m, s: ["fake.py", "--mode", "train", "--quant", m, *extra],
        lambda m, s, cwd, *_: ["fake.py", "--mode", "eval", "--quant", m],
        mr._seed_flag("--seed"), seeds=(0, 1), serial_cbp=serial)


def test_serial_pipelines_run_one_cbp_job_at_a_time(tmp_path, monkeypatch):
    """Calibration's CBP runs share the calibrated-SNN file, which the run lock lets only one
    run write: they must not overlap (the fake exits 1 if they do)."""
    monkeypatch.setattr(mr, "pipelines", lambda: {"STBP": fake_pipeline(tmp_path, serial=True)})
    res = mr.replicate(["STBP"], (0,), str(tmp_path / "out"), jobs=2, force=False)
    assert all(res["STBP"][0][m] is not None for m in mr.MODES)


def test_calibration_is_serial():
    import importlib

    table = importlib.reload(mr).pipelines()
    assert table["SNN-Calibration"].serial_cbp
    assert [p.method_flag for p in table.values()] == ["--method", "-method", "--method",
                                                       "--method"]
    assert not any(p.serial_cbp for name, p in table.items() if name != "SNN-Calibration")


def test_runner_orders_jobs_reuses_results_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mr, "pipelines", lambda: {"STBP": fake_pipeline(tmp_path)})
    res = mr.replicate(["STBP"], None, str(tmp_path / "out"), jobs=2, force=False)
    assert set(res["STBP"]) == {0, 1}
    for seed in (0, 1):
        runs = res["STBP"][seed]
        assert runs["fp32"]["acc"] == 95.5
        assert runs["ter"]["acc"] == 91.5 and runs["ter"]["cfs"] == 0.0123
        assert runs["bin"]["mbit"] == 0.5
        order = (tmp_path / "out" / "STBP" / f"seed{seed}" / "order.txt").read_text().split()
        assert order[0] == "fp32" and order.count("eval") == 4
        saved = json.loads((tmp_path / "out" / "STBP" / f"seed{seed}" / "1bit.json").read_text())
        assert saved["acc"] == 92.0
    # a second call reuses every result without running anything
    (tmp_path / "scripts" / "fake.py").write_text("import sys; sys.exit(3)")
    again = mr.replicate(["STBP"], None, str(tmp_path / "out"), jobs=1, force=False)
    assert again["STBP"][1]["2bit"]["acc"] == 93.0
    text = mr.markdown(again, 61.0, 2)
    row = [ln for ln in text.splitlines() if ln.startswith("| STBP")][0].split(" | ")
    assert row[4:10] == ["2", "95.50 ± 0.00", "90.00 ± 0.00", "91.50 ± 0.00", "92.00 ± 0.00",
                         "93.00 ± 0.00"]
    assert "0.5000 / 0.5000 / 0.5000 / 0.5000" in text and "1.0 min" in text
    assert row[11:13] == ["2 / 3 / 4 / 5", "1.5 / 2.5 / 3.5 / 4.5 |"]  # SynOps (M), energy


def test_baselines_run_with_the_method_flag_and_get_their_table(tmp_path, monkeypatch):
    monkeypatch.setattr(mr, "pipelines", lambda: {"STBP": fake_pipeline(tmp_path)})
    res = mr.replicate(["STBP"], None, str(tmp_path / "out"), jobs=2, force=False,
                       modes=("bin", "ter"), methods=("cbp", "ste", "ptq"))
    runs = res["STBP"][0]
    assert set(runs) == {"fp32", "bin", "bin_ste", "bin_ptq", "ter", "ter_ste", "ter_ptq"}
    assert (runs["ter_ptq"]["acc"], runs["ter_ste"]["acc"], runs["ter"]["acc"]) == (81.5, 90.5, 91.5)
    assert runs["bin_ste"]["cfs"] == 0.05
    seed0 = tmp_path / "out" / "STBP" / "seed0"
    assert json.loads((seed0 / "bin_ptq.json").read_text())["acc"] == 80.0
    assert "--method ste" in (seed0 / "bin_ste.log").read_text()
    assert "--method" not in (seed0 / "bin.log").read_text()
    assert "PTQ" not in mr.markdown(res, 60.0, 2)  # the first table is CBP's
    rows = [ln for ln in mr.baselines(res).splitlines() if ln.startswith("| STBP | 2 |")]
    assert rows == ["| STBP | 2 | bin | 80.00 ± 0.00 | 89.00 ± 0.00 | 90.00 ± 0.00 | "
                    "0.0900 ± 0.0000 / 0.0500 ± 0.0000 / 0.0123 ± 0.0000 |",
                    "| STBP | 2 | ter | 81.50 ± 0.00 | 90.50 ± 0.00 | 91.50 ± 0.00 | "
                    "0.0900 ± 0.0000 / 0.0500 ± 0.0000 / 0.0123 ± 0.0000 |"]
    assert mr.baselines({"STBP": {0: {"bin": {"acc": 1.0}}}}) == ""  # CBP alone: no table


def test_failed_job_is_reported_not_fatal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mr, "pipelines", lambda: {"STBP": fake_pipeline(tmp_path, fail=True)})
    res = mr.replicate(["STBP"], (0,), str(tmp_path / "out"), jobs=2, force=False)
    assert res["STBP"][0]["2bit"] is None and res["STBP"][0]["1bit"]["acc"] == 92.0
    assert "error: boom" in capsys.readouterr().err
    assert "| — |" in mr.markdown(res, 1.0, 2)  # the 2bit cell


def test_cells_figure_and_doc_block(tmp_path):
    assert mr._cell([]) == "—" and mr._cell([93.25]) == "93.25"
    assert mr._cell([90.0, 92.0, 94.0]) == "92.00 ± 2.00"  # sample standard deviation
    # the calibration pipeline's fp32 column comes from the CBP runs' converted SNN
    per_seed = {0: {"fp32": {"acc": None}, "bin": {"acc": 60.0, "fp32_acc": 62.5}}}
    assert mr._accs(per_seed, "fp32") == [62.5]
    results = {"STBP": {0: {"fp32": {"acc": 95.0}, "bin": {"acc": 94.0}},
                        1: {"fp32": {"acc": 93.0}, "bin": {"acc": 92.0}}},
               "SNN-Calibration": per_seed}
    png = tmp_path / "fig.png"
    assert mr.figure(results, str(png)) and png.read_bytes()[:4] == b"\x89PNG"
    doc = tmp_path / "page.md"
    doc.write_text(f"# x\n{mr.START}\nold\n{mr.END}\ntail\n")
    docblock.replace_block(str(doc), mr.START, mr.END, "| new |\n")
    assert doc.read_text() == f"# x\n{mr.START}\n| new |\n{mr.END}\ntail\n"
    doc.write_text("# no block\n")
    with pytest.raises(SystemExit, match="no <!-- mini:start -->"):
        docblock.replace_block(str(doc), mr.START, mr.END, "| new |\n")
    assert doc.read_text() == "# no block\n"  # left as it was


def test_doc_has_the_block_and_the_figure():
    """--readme writes into docs/mini_replication.md and the figure beside it; the README
    links the page."""
    assert Path(mr.DOC).resolve() == ROOT / "docs" / "mini_replication.md"
    text = (ROOT / "docs" / "mini_replication.md").read_text()
    assert text.count(mr.START) == 1 and text.count(mr.END) == 1
    assert text.count(mr.BASE_START) == 1 and text.count(mr.BASE_END) == 1
    block = text.split(mr.START, 1)[1].split(mr.END, 1)[0]
    assert "](mini_replication.png)" in block
    assert (ROOT / "docs" / "mini_replication.png").is_file()
    assert mr.START not in (ROOT / "README.md").read_text()
    assert "docs/mini_replication.md" in (ROOT / "README.md").read_text()


def test_readme_flag_writes_the_doc_page_and_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(mr, "pipelines", lambda: {"STBP": fake_pipeline(tmp_path)})
    doc = tmp_path / "docs" / "mini_replication.md"
    doc.parent.mkdir()
    doc.write_text(f"# Mini\n\n{mr.START}\nold\n{mr.END}\n\nafter\n"
                   f"{mr.BASE_START}\nold\n{mr.BASE_END}\n")
    monkeypatch.setattr(mr, "DOC", str(doc))
    assert mr.main(["--pipelines", "STBP", "--seeds", "0", "--jobs", "2",
                    "--out", str(tmp_path / "out"), "--readme"]) == 0
    text = doc.read_text()
    assert text.startswith(f"# Mini\n\n{mr.START}\n| pipeline |")
    assert f"![accuracy vs bits per weight](mini_replication.png)\n{mr.END}\n\nafter\n" \
        f"{mr.BASE_START}\n| pipeline | seeds | mode | PTQ | STE | CBP |" in text
    assert "| STBP | fake net |" in text and "old" not in text
    assert (doc.parent / "mini_replication.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_tiny_sew_pipeline_end_to_end(tmp_path, monkeypatch):
    """The real SEW-ResNet scripts on DIGITS events at minimal size: fp32 -> bin -> eval."""
    real = mr.pipelines()["SEW-ResNet"]
    net = ["--dataset", "DIGITS", "--model", "SEWResNet", "--connect_f", "ADD", "--T", "2",
           "--width", "0.125", "-b", "128", "-j", "0"]
    tiny = mr.Pipeline(
        real.name, real.folder, real.network, 2, "1 / 1",
        ["main_train_fp32.py", *net, "--epochs", "1", "--lr", "0.1"], real.fp32_acc,
        lambda m, s: ["main_quantize_cbp.py", *net, "--epochs", "1", "--lr", "0.01",
                      "--quant", m, "--period", "1"],
        lambda m, s, cwd, *_: ["main_quantize_cbp.py", *net, "--test-only", "--quant", m],
        real.seeded)
    monkeypatch.setattr(mr, "pipelines", lambda: {"SEW-ResNet": tiny})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = mr.replicate(["SEW-ResNet"], (0,), str(tmp_path), jobs=1, force=False,
                       modes=("bin",))
    runs = res["SEW-ResNet"][0]
    assert 0 < runs["fp32"]["acc"] <= 100 and 0 < runs["bin"]["acc"] <= 100
    assert runs["bin"]["cfs"] > 0
    # 1 bit per quantized weight plus the fp32 first conv and output layer
    assert 0 < runs["bin"]["mbit"] < 0.01
    assert runs["bin"]["synops"] > 0 and runs["bin"]["energy"] > 0
    assert os.path.isfile(tmp_path / "SEW-ResNet" / "seed0" / "trained_params"
                          / "SEW_ResNet_DIGITS_bin_cbp_prequantized.pth")


def test_readme_keeps_the_rows_an_earlier_call_left_in_out(tmp_path, monkeypatch):
    """Calls for different pipelines add up: the doc's tables show every pipeline with results
    in --out, the ones this call did not name read from their stored results."""
    fake = fake_pipeline(tmp_path)
    other = mr.Pipeline(**{**fake.__dict__, "name": "TSSL-BP", "network": "other net"})
    monkeypatch.setattr(mr, "pipelines", lambda: {"STBP": fake, "TSSL-BP": other})
    doc = tmp_path / "mini_replication.md"
    doc.write_text(f"{mr.START}\n{mr.END}\n{mr.BASE_START}\n{mr.BASE_END}\n")
    monkeypatch.setattr(mr, "DOC", str(doc))
    out = str(tmp_path / "out")
    common = ["--seeds", "0", "--modes", "bin", "--out", out, "--readme"]
    assert mr.main(["--pipelines", "STBP", *common]) == 0
    (tmp_path / "scripts" / "fake.py").write_text("import sys; sys.exit(3)")  # STBP can't rerun
    (tmp_path / "out" / "TSSL-BP" / "seed0").mkdir(parents=True)
    for label, acc in (("fp32", 50.0), ("bin", 40.0), ("bin_ste", 39.0), ("bin_ptq", 30.0)):
        (tmp_path / "out" / "TSSL-BP" / "seed0" / f"{label}.json").write_text(
            json.dumps({"acc": acc, "cfs": 0.5, "seconds": 60.0}))
    assert mr.main(["--pipelines", "TSSL-BP", *common]) == 0
    text = doc.read_text()
    first, second = (text.split(a, 1)[1].split(b, 1)[0]
                     for a, b in ((mr.START, mr.END), (mr.BASE_START, mr.BASE_END)))
    assert [ln.split(" | ")[0] for ln in first.splitlines() if ln.startswith("| S")
            or ln.startswith("| T")] == ["| STBP", "| TSSL-BP"]
    assert "| TSSL-BP | other net |" in first and "| 50.00 | 40.00 |" in first
    assert "| STBP | 1 | bin | 80.00 | 89.00 | 90.00 |" in second
    assert "| TSSL-BP | 1 | bin | 30.00 | 39.00 | 40.00 |" in second
    assert mr.stored(["SEW-ResNet"], out) == {}  # nothing stored: left out
