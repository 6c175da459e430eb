"""Generated blocks in the documentation: the text between a start and an end marker (HTML
comments such as ``<!-- demo:start -->`` / ``<!-- demo:end -->``) is replaced by a script's
latest result, the rest of the file is left as it is.

Used by ``demo.py --readme``, ``mini_replication.py --readme`` and ``benchmarks/run_all.py``.
"""

from __future__ import annotations


def replace_block(path: str, start: str, end: str, text: str, append: bool = False) -> None:
    """Put ``text`` between the markers ``start`` and ``end`` of the file ``path`` (the first
    such block; the markers stay on lines of their own).  Without the block: with ``append``
    the block is added at the end of the file, otherwise it is one error line naming the file
    and the markers, and the file is not changed."""
    with open(path, encoding="utf-8") as f:
        body = f.read()
    if not text.endswith("\n"):
        text += "\n"
    block = f"{start}\n{text}{end}"
    i = body.find(start)
    j = body.find(end, i + len(start)) if i >= 0 else -1
    if j < 0:
        if not append:
            raise SystemExit(f"error: {path} has no {start} ... {end} block")
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    else:
        body = body[:i] + block + body[j + len(end):]
    with open(path, "w", encoding="utf-8") as f:
        f.write(body)
