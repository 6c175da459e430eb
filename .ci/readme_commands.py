"""Print one of the README's two quick-start commands (the first fenced bash block):
``install`` = the first line without its trailing ``&& python demo.py``, ``test`` = the second."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def commands(text: str) -> tuple[str, str]:
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    if block is None:
        raise SystemExit("error: README.md has no ```bash block")
    lines = [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]
    if len(lines) != 2 or not lines[0].endswith("&& python demo.py"):
        raise SystemExit("error: README.md's first bash block must be the install + demo line "
                         "and the test line")
    return lines[0][: -len("&& python demo.py")].strip(), lines[1]


if __name__ == "__main__":
    install, test = commands(README.read_text())
    print({"install": install, "test": test}[sys.argv[1]])
