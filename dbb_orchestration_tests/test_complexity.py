"""Every function of the package (the loopback fakes in ``testing/`` aside) keeps a cyclomatic complexity
of at most 10, as radon computes it: long functions are split into small load / decide / write steps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from radon.complexity import cc_visit
from radon.visitors import Function

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dbb_orchestration"
MAX_COMPLEXITY = 10


def _functions(path: Path) -> Iterator[tuple[str, int]]:
    # radon lists every function and method (as ``Class.method``) once, plus one entry per class
    for block in cc_visit(path.read_text(encoding="utf-8")):
        if isinstance(block, Function):
            yield block.fullname, block.complexity


def _measured() -> dict[str, int]:
    found: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("testing/"):
            continue
        for name, complexity in _functions(path):
            found[f"{relative}::{name}"] = complexity
    return found


def test_every_function_outside_the_fakes_has_complexity_at_most_10() -> None:
    measured = _measured()
    too_complex = {name: complexity for name, complexity in measured.items() if complexity > MAX_COMPLEXITY}
    assert too_complex == {}, f"split these functions (radon cyclomatic complexity > {MAX_COMPLEXITY})"


def test_the_measurement_sees_methods_and_plain_functions() -> None:
    measured = _measured()
    # a plain function and a method, both known to exist: the walk must reach both kinds
    assert "content.py::normalize_markdown" in measured
    assert any("." in name.split("::")[1] for name in measured)
    assert len(measured) > 300
