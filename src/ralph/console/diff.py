"""Diffs a reviewer can read: line by line, with the changed words highlighted, and long
unchanged stretches folded away."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from markupsafe import Markup, escape

CONTEXT = 2  # unchanged lines shown around a change
_WORDS = re.compile(r"\s+|\w+|[^\w\s]")


@dataclass(frozen=True, slots=True)
class DiffLine:
    kind: str  # "same" | "del" | "ins" | "fold"
    html: Markup
    folded: int = 0  # for "fold": how many unchanged lines it stands for


def _words(old: str, new: str) -> tuple[Markup, Markup]:
    """The two lines with the words only one of them has wrapped in <del> / <ins>."""
    a, b = _WORDS.findall(old), _WORDS.findall(new)
    left: list[str] = []
    right: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        before, after = escape("".join(a[i1:i2])), escape("".join(b[j1:j2]))
        if op == "equal":
            left.append(before)
            right.append(after)
            continue
        if before:
            left.append(f"<del>{before}</del>")
        if after:
            right.append(f"<ins>{after}</ins>")
    return Markup("".join(left)), Markup("".join(right))


def diff_lines(old: str, new: str) -> list[DiffLine]:
    """`old` -> `new` as lines to show: replaced lines paired with word highlights, and
    unchanged runs longer than twice the context folded into one line."""
    a, b = old.splitlines(), new.splitlines()
    out: list[DiffLine] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            same = a[i1:i2]
            if len(same) > 2 * CONTEXT + 1:
                head = same[:CONTEXT] if out else []
                tail = same[-CONTEXT:] if i2 < len(a) or j2 < len(b) else []
                out.extend(DiffLine("same", escape(line)) for line in head)
                hidden = len(same) - len(head) - len(tail)
                out.append(DiffLine("fold", Markup(""), hidden))
                out.extend(DiffLine("same", escape(line)) for line in tail)
            else:
                out.extend(DiffLine("same", escape(line)) for line in same)
            continue
        removed, added = a[i1:i2], b[j1:j2]
        for k in range(max(len(removed), len(added))):
            if k < len(removed) and k < len(added):
                left, right = _words(removed[k], added[k])
                out.append(DiffLine("del", left))
                out.append(DiffLine("ins", right))
            elif k < len(removed):
                out.append(DiffLine("del", escape(removed[k])))
            else:
                out.append(DiffLine("ins", escape(added[k])))
    return out
