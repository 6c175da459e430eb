"""Command-line test helpers shared by every pipeline's tests: run a script in a subprocess or
in this process, under torchrun, and check its outcome (exit status, one ``error:`` line)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import runpy
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pipelines import pipeline_path

from cbp import files
from cbp.runtime import run_main


def env(**extra: str) -> dict:
    """The environment of a test run: no progress bars, one thread per process."""
    return dict(os.environ, CBP_NO_PROGRESS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                **extra)


def run(script: Path, args: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    """``python script args`` in ``cwd`` (a subprocess), ``extra`` added to the environment."""
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, args: list[str], cwd: Path, nproc: int = 2,
             **extra: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc script args`` in ``cwd``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *args]
    return subprocess.run(cmd, cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=300)


def inproc(script: Path, args: list[str], cwd: Path, monkeypatch,
           **extra: str) -> tuple[int, str, str]:
    """The script as ``__main__`` in this process (exit code, stdout, stderr); the failpoint
    counters start at zero, the torch RNG and thread count are restored afterwards."""
    for k, v in env(**extra).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(files, "_writes", 0)
    monkeypatch.setattr(files, "_losses", 0)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pipeline_path(script.parent), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def run_here(script: Path, args: list[str], cwd: Path,
             **extra: str) -> subprocess.CompletedProcess:
    """:func:`run` in this process (no interpreter start-up): the same outcome object."""
    with pytest.MonkeyPatch.context() as mp:
        code, out, err = inproc(script, args, cwd, mp, **extra)
    return subprocess.CompletedProcess([str(script), *args], code, out, err)


def call_main(main: Callable[[list[str]], object], argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` through ``run_main`` like the command line (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(lambda: main(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        torch.set_num_threads(before)
    return code, out.getvalue(), err.getvalue()


def ok(proc: subprocess.CompletedProcess) -> str:
    """The stdout of a run that succeeded without a traceback."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def one_error(code: int, err: str, *needles: str) -> str:
    """Exit status 1 and stderr exactly one ``error:`` line holding every needle."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def failed(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """:func:`one_error` of a finished subprocess."""
    return one_error(proc.returncode, proc.stderr, *needles)


def error_line(err: str, *needles: str) -> str:
    """The one ``error:`` line among other stderr lines (e.g. argparse's usage), no traceback."""
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or ": error:" in ln]
    assert len(errors) == 1, err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative path) except the append-only logs
    (tensorboard event files, text logs)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and "tfevents" not in p.name and p.suffix != ".log"}
