"""Every dotted ``detect.…`` name in a docstring, comment or string of the package, its tools
and the README exists: a module, or an attribute (function, class, constant, dataclass field)
reached from one. After a move, the old name fails here instead of misleading a reader."""

from __future__ import annotations

import dataclasses
import importlib
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOTTED = re.compile(r"(?<![\w./-])detect(?:\.[A-Za-z_]\w*)+")


def dotted_names(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return set(DOTTED.findall(text))
    names = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in (tokenize.STRING, tokenize.COMMENT):
            names.update(DOTTED.findall(token.string))
    return names


def resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
            if attr in fields:
                return attr == parts[-1]  # a field's value is not a namespace
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_dotted_detect_name_resolves():
    files = [*sorted((REPO / "detect").rglob("*.py")), *sorted((REPO / "tools").glob("*.py")), REPO / "README.md",
             REPO / "BENCHMARKS.md"]
    broken = sorted(f"{path.relative_to(REPO)}: {name}" for path in files for name in dotted_names(path)
                    if not resolves(name))
    assert broken == []


def test_the_check_catches_a_stale_name(tmp_path):
    stale = tmp_path / "stale.py"
    stale.write_text('"""See ``detect.backbones.build_backbone`` and detect.common.fileio.read_json."""\n'
                     "x = 1  # as detect.common.config.ProposalConfig.top_k says, not detect.svm\n")
    assert dotted_names(stale) == {"detect.backbones.build_backbone", "detect.common.fileio.read_json",
                                   "detect.common.config.ProposalConfig.top_k", "detect.svm"}
    assert [resolves(n) for n in sorted(dotted_names(stale))] == [False, True, True, False]
