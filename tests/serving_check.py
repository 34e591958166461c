"""Score exported programs in a Python process that cannot import recsqueeze (what a serving
team has): `python -I -S` with only the venv's site-packages on its path - no .pth files, so
the editable install of recsqueeze is not active - reading inputs with allow_pickle=False."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np

SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path[:0] = [{site!r}]
    for name in ("tasks", "flows", "infra", "cluster"):
        assert importlib.util.find_spec(name) is None, f"recsqueeze's {{name}} is importable"
    import numpy as np, torch
    for folder in sys.argv[1:]:
        serving = json.load(open(f"{{folder}}/serving.json"))
        program = torch.export.load(f"{{folder}}/" + serving["program"]).module()
        dense = torch.from_numpy(np.load(f"{{folder}}/dense.npy", allow_pickle=False))
        sparse = torch.from_numpy(np.load(f"{{folder}}/sparse.npy", allow_pickle=False))
        with torch.no_grad():
            np.save(f"{{folder}}/out.npy", program(dense, sparse).numpy())
""")


def write_inputs(folder: Path, dense: np.ndarray, sparse: np.ndarray) -> None:
    np.save(folder / "dense.npy", dense.astype(np.float32))
    np.save(folder / "sparse.npy", sparse.astype(np.int64))


def score_without_recsqueeze(folders: list[Path]) -> dict[Path, np.ndarray]:
    """Each folder holds an export (serving.json + its program) and dense.npy / sparse.npy;
    returns each folder's scores, computed by torch alone in a fresh process."""
    site = sysconfig.get_paths()["purelib"]
    out = subprocess.run([sys.executable, "-I", "-S", "-c", SCRIPT.format(site=site),
                          *map(str, folders)], cwd=folders[0].parent, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {f: np.load(f / "out.npy", allow_pickle=False) for f in folders}
