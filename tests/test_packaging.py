"""What the project says about installing and running it is true: the README's two commands
(which CI runs in a clean virtual environment), the declared dependencies against what the
code imports, the CUDA extras, device defaults, and every flag the READMEs show against the
scripts' parsers."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import sys
from pathlib import Path

import pytest
from clitools import inproc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
import readme_commands  # noqa: E402


def _declared() -> tuple[list[str], dict[str, list[str]]]:
    """(runtime requirements, {extra: requirements}) from the installed package's metadata,
    i.e. what pip saw in pyproject.toml."""
    runtime, extras = [], {}
    for req in importlib.metadata.requires("cbp-qsnn") or []:
        spec, _, marker = req.partition(";")
        extra = re.search(r'extra\s*==\s*"([^"]+)"', marker)
        if extra:
            extras.setdefault(extra.group(1), []).append(spec.strip())
        else:
            runtime.append(spec.strip())
    return runtime, extras


RUNTIME, EXTRAS = _declared()
# import name -> distribution, for the third-party packages the code imports
DISTRIBUTIONS = {"torch": "torch", "torchvision": "torchvision", "spikingjelly": "spikingjelly",
                 "numpy": "numpy", "yaml": "pyyaml", "tensorboard": "tensorboard",
                 "tqdm": "tqdm", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
                 "cupy": "cupy", "cupy_backends": "cupy", "PIL": "pillow", "scipy": "scipy",
                 "nir": "nir", "nirtorch": "nirtorch"}
TRANSITIVE = {"pillow": "torchvision", "scipy": "scikit-learn"}  # guaranteed by another dependency


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()


def test_dev_extra_holds_the_nir_simulators():
    """The NIR consumer tests (tests/nir_consumers.py) run in CI: the dev extra installs both."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"snntorch", "norse"} <= {_name(r) for r in project["optional-dependencies"]["dev"]}
    # the library itself never imports them
    assert {"snntorch", "norse"}.isdisjoint(_name(r) for r in project["dependencies"])
    assert not {"snntorch", "norse"} & set(_third_party_imports())


def test_readme_commands_are_what_ci_runs():
    install, test = readme_commands.commands((ROOT / "README.md").read_text())
    assert install == 'pip install -e ".[dev]"'
    assert test == "python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci
    assert "readme_commands.py install" in ci and "readme_commands.py test" in ci
    assert "pip install" not in ci  # nothing the README does not do
    with pytest.raises(SystemExit, match="first bash block"):
        readme_commands.commands("```bash\npip install -e .\n```\n")


def _third_party_imports() -> dict[str, set[str]]:
    local = {p.stem for p in ROOT.rglob("*.py")} | {p.name for p in ROOT.rglob("*") if p.is_dir()}
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks", ".ci", "build") or "egg-info" in str(rel):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "cbp":
                    continue
                found.setdefault(top, set()).add(str(rel))
    return found


def test_every_imported_package_is_declared():
    runtime = {_name(r) for r in RUNTIME}
    extras = EXTRAS
    optional = {_name(r).removesuffix("-cuda12x").removesuffix("-cuda13x")
                for group in ("cuda12", "cuda13") for r in extras[group]}
    for top, files in _third_party_imports().items():
        assert top in DISTRIBUTIONS, f"{top} (imported by {sorted(files)[:3]}) is not mapped"
        dist = DISTRIBUTIONS[top]
        dist = TRANSITIVE.get(dist, dist)
        assert dist in runtime | optional, f"{dist} (for {sorted(files)[:3]}) is not declared"


def test_cpu_install_pulls_no_cupy_and_extras_match_cuda_majors():
    runtime = RUNTIME
    assert not any("cupy" in r for r in runtime)
    extras = EXTRAS
    assert extras["cuda12"] == ["cupy-cuda12x>=13"]
    assert [_name(r) for r in extras["cuda13"]] == ["cupy-cuda13x"]
    assert {"pytest", "pytest-xdist", "hypothesis"} <= {_name(r) for r in extras["dev"]}
    torch_req = next(r for r in runtime if _name(r) == "torch")
    assert torch_req == "torch>=2.6"  # spikingjelly 2.0's own minimum (safe_globals needs 2.5)
    for req in ("requirements.txt", "requirements-dev.txt"):
        lines = [ln for ln in (ROOT / req).read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")]
        assert lines == (["-e ."] if req == "requirements.txt" else ["-e .[dev]"])


# ----------------------------------------------------------------------------- README flags


def _readme_commands() -> list[tuple[str, Path, list[str]]]:
    """(README, script, flags) for every ``python <script>.py ...`` line of a code block; the
    script is looked up in the folder of the last ``cd``, of the section heading that names a
    pipeline folder, then the README's folder and the repository root."""
    out = []
    readmes = [ROOT / "README.md", *sorted(ROOT.glob("CBP-QSNN-*/README.md")),
               *sorted(ROOT.glob("docs/*.md"))]
    for readme in readmes:
        lines = readme.read_text().replace("\\\n", " ").splitlines()
        # commands in docs/ run from the repository root
        section = ROOT if readme.parent == ROOT / "docs" else readme.parent
        in_block = False
        for raw in lines:
            if raw.startswith("```"):
                in_block = not in_block
                folder = section
                continue
            if not in_block:
                head = re.match(r"#+\s+(\S+)", raw)
                if head and (ROOT / head.group(1)).is_dir():
                    section = ROOT / head.group(1)
                continue
            line = raw.split("#", 1)[0].strip()
            if line.startswith("cd "):
                folder = (folder / line[3:].strip()).resolve()
                continue
            try:
                tokens = shlex.split(line)
            except ValueError:
                continue
            script = next((t for t in tokens if t.endswith(".py")), None)
            if script is None or tokens[0] not in ("python", "torchrun"):
                continue
            if tokens[1] == "-m" and tokens[2] not in ("torch.distributed.launch",
                                                       "torch.distributed.run"):
                continue  # e.g. python -m pytest tests/...
            candidates = (folder / script, section / script, readme.parent / script, ROOT / script)
            path = next((p for p in candidates if p.is_file()), None)
            assert path is not None, f"{readme.name}: {script} does not exist ({line})"
            rest = tokens[tokens.index(script) + 1:]
            flags = [t.strip("[]").split("=")[0] for t in rest
                     if t.strip("[]").startswith("-") and not re.match(r"-\d", t)]
            out.append((str(readme.relative_to(ROOT)), path, flags))
    return out


def _help(script: Path) -> str:
    """``script --help`` run in this process (argparse prints the help and exits first)."""
    with pytest.MonkeyPatch.context() as mp:
        code, out, err = inproc(script, ["--help"], script.parent, mp)
    assert code == 0, f"{script} --help failed: {err[-500:]}"
    return out


def test_every_flag_in_the_readmes_is_accepted():
    commands = _readme_commands()
    scripts = sorted({c[1] for c in commands})
    assert len(scripts) >= 10
    helps = {s: _help(s) for s in scripts}
    missing = []
    for readme, script, flags in commands:
        options = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", helps[script]))
        for f in flags:
            # argparse also takes an unambiguous prefix (the reference's README writes --epoch)
            if f not in options and len([o for o in options if o.startswith(f)]) != 1:
                missing.append(f"{readme}: {script.relative_to(ROOT)} {f}")
    assert not missing, "flags shown in a README but not accepted:\n" + "\n".join(missing)


def test_calibration_device_defaults_to_the_best_available():
    sys.path.insert(0, str(ROOT / "CBP-QSNN-SNN-Calibration"))
    try:
        import calib_engine
    finally:
        sys.path.remove(str(ROOT / "CBP-QSNN-SNN-Calibration"))
    import argparse

    import torch

    from cbp.runtime import select_device

    p = argparse.ArgumentParser()
    calib_engine.add_common_args(p)
    args = p.parse_args(["--dpath", "."])
    assert args.device is None
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device(args.device).type == want


def test_library_has_no_import_circles_and_one_error_module():
    """``common/cbp`` imports form no circle, function-level imports included; every error type
    is defined in ``cbp.errors`` and is a ``UserError``."""
    import ast
    import inspect

    import cbp.errors

    lib = ROOT / "common" / "cbp"
    graph: dict[str, set[str]] = {}
    for path in lib.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else \
                    {a.name for a in node.names}
            if isinstance(node, ast.ClassDef) and path.stem != "errors":
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not any(b.endswith(("Error", "Exception")) for b in bases), \
                    f"{path.name} defines the error type {node.name} (belongs in errors.py)"
        graph[path.stem] = deps - {path.stem}

    def reach(start: str, node: str, seen: set[str]) -> bool:
        return any(d == start or (d not in seen and reach(start, d, seen | {d}))
                   for d in graph.get(node, ()))

    assert not [m for m in graph if reach(m, m, {m})], graph
    for _, cls in inspect.getmembers(cbp.errors, inspect.isclass):
        assert issubclass(cls, cbp.errors.UserError), cls
