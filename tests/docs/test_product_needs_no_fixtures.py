"""What users install and run never reads the reference fixtures beside a developer's checkout
(`../shared/fixtures`): users do not have them, so a tool that took them when present measured
or did something else on a developer's machine than on a user's (tools/bench_preprocess.py
benchmarked the fixture's lines and tokenizer there, synthetic ones elsewhere)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ["megatron_lst", "kernels", "tools", "examples", "pretrain_lst.py", "setup.py", "Makefile"]
# `../shared` written out, or built from parts: `... / "shared" / ...`, `"shared/fixtures"`.
SIBLING_FIXTURES = re.compile(r"""\.\./shared\b|["']shared["']\s*/|["']shared/fixtures""")


def _product_files():
    for name in PRODUCT:
        path = REPO / name
        yield from ([path] if path.is_file() else
                    (p for p in sorted(path.rglob("*")) if p.is_file() and "__pycache__" not in p.parts))


def test_no_product_file_names_the_sibling_fixtures():
    hits = []
    for path in _product_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                 for m in SIBLING_FIXTURES.finditer(text)]
    assert not hits, "product files that name ../shared/fixtures:\n" + "\n".join(hits)
