"""The docs' Python snippets import only what the project installs, and the id mapping of
docs/byo-data.md does what it says on a small raw file."""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def test_every_python_snippet_imports_installed_modules_only():
    missing = []
    for path in sorted(DOCS.glob("*.md")):
        for block in _blocks(path):
            for top in re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", block, re.M):
                if importlib.util.find_spec(top) is None:
                    missing.append(f"{path.name}: {top}")
    assert not missing, missing


def test_the_id_mapping_snippet_maps_raw_ids_to_rows(tmp_path):
    block = next(b for b in _blocks(DOCS / "byo-data.md") if "raw_clicks.csv" in b)
    (tmp_path / "raw_clicks.csv").write_text(
        "user_id,category_id,brand_id,device,item_id,history,click\n"
        "u1,c1,Nike,ios,sku-1,sku-9 sku-2,1\n"
        "u2,c2,,web,sku-9,,0\n"
        "u1,c1,Puma,ios,sku-3,sku-1,1\n")
    out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader((tmp_path / "clicks.csv").open()))
    items = [r["raw"] for r in csv.DictReader((tmp_path / "item_id.ids.csv").open())]
    brands = [r["raw"] for r in csv.DictReader((tmp_path / "brand_id.ids.csv").open())]
    assert brands == ["Nike", "", "Puma"]  # a missing brand is a value of its own
    assert items == ["sku-1", "sku-9", "sku-3", "sku-2"]  # no "" item for an empty history
    assert [r["brand_id"] for r in rows] == ["0", "1", "2"]
    assert [r["item_id"] for r in rows] == ["0", "1", "2"]
    assert [r["history"] for r in rows] == ["1 3", "", "0"]
    assert [r["user_id"] for r in rows] == ["0", "1", "0"]
