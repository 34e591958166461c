"""The result-cache key covers the whole recsqueeze code, not only a task's own source."""

from __future__ import annotations

from pathlib import Path

from tasks.run import CACHE_POLICY, CodeVersion, code_version, source_digest


def _tree(root: Path, generator: str) -> Path:
    for package in ("tasks", "flows", "infra", "cluster"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    (root / "tasks" / "data.py").write_text(generator)
    (root / "tasks" / "notes.txt").write_text("not code")
    return root


def test_a_helper_module_change_changes_the_digest(tmp_path: Path) -> None:
    before = source_digest(_tree(tmp_path / "a", "ROWS = 10\n"))
    assert source_digest(_tree(tmp_path / "b", "ROWS = 10\n")) == before  # same code, same key
    assert source_digest(_tree(tmp_path / "c", "ROWS = 11\n")) != before
    # a non-Python file is not code
    changed = _tree(tmp_path / "d", "ROWS = 10\n")
    (changed / "tasks" / "notes.txt").write_text("edited")
    assert source_digest(changed) == before


def test_a_moved_module_changes_the_digest(tmp_path: Path) -> None:
    root = _tree(tmp_path / "a", "ROWS = 10\n")
    before = source_digest(root)
    (root / "tasks" / "data.py").rename(root / "flows" / "data.py")
    assert source_digest(root) != before


def test_the_policy_includes_the_installed_code_version() -> None:
    assert any(isinstance(p, CodeVersion) for p in CACHE_POLICY.policies)
    key = CodeVersion().compute_key(None, {}, {})
    assert key == code_version() and len(key) == 64
    real_root = Path(__file__).resolve().parents[2]
    assert key == source_digest(real_root)
