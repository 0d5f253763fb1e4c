"""The exception tree drawn in pipeline/errors.py's docstring is the tree of its classes."""

from __future__ import annotations

import re

import pipeline.errors as errors


def _drawn() -> dict[str, str]:
    """child -> parent, read from the box drawing (indent 4 per level below StreamrecError)."""
    doc = errors.__doc__ or ""
    parents: dict[str, str] = {}
    stack = ["StreamrecError"]
    for line in doc.splitlines():
        match = re.match(r"^    ([│ ]*)[├└]── (\w+)", line)
        if match is None:
            continue
        depth = len(match.group(1)) // 4
        del stack[depth + 1 :]
        parents[match.group(2)] = stack[depth]
        stack.append(match.group(2))
    return parents


def test_the_drawn_tree_is_the_class_tree() -> None:
    classes = {name: getattr(errors, name) for name in errors.__all__}
    actual = {
        name: cls.__mro__[1].__name__ for name, cls in classes.items() if name != "StreamrecError"
    }
    assert _drawn() == actual
