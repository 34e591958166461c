"""The result-cache key covers the whole recsqueeze code, not only a task's own source."""

from __future__ import annotations

from pathlib import Path

from tasks.cache import NodeKey, cache_key, installed_digest, source_digest


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


def test_the_key_includes_the_installed_code_digest() -> None:
    real_root = Path(__file__).resolve().parents[2]
    assert installed_digest() == source_digest(real_root) and len(installed_digest()) == 64
    assert NodeKey(node="n").compute_key(None, {}, {}) == cache_key("n", {})


def test_the_key_is_content_not_where_or_how_fast_it_ran() -> None:
    """A model rebuilt on another node in another time has the same key; another model (other
    bytes) or another plan node does not (the issue-13 canary relies on it: a retried stage
    reads the same record)."""
    from tasks.runtime import Built
    from tasks.types import ArtifactRef

    def built(sha: str, node: str, wall: float) -> Built:
        ref = ArtifactRef(uri=f"s3://b/objects/{sha}", sha256=sha, size_bytes=10, kind="model")
        return Built(model=ref, node_ip=node, wall_s=wall, chain=("baseline",), cpu_s=wall)

    a = cache_key("node-1", {"parent": built("a" * 64, "127.0.0.2", 1.5), "seed": 0})
    assert a == cache_key("node-1", {"parent": built("a" * 64, "127.0.0.3", 9.0), "seed": 0})
    assert a == cache_key("node-1", {"seed": 0, "parent": built("a" * 64, "127.0.0.3", 9.0)})
    assert a != cache_key("node-1", {"parent": built("b" * 64, "127.0.0.2", 1.5), "seed": 0})
    assert a != cache_key("node-2", {"parent": built("a" * 64, "127.0.0.2", 1.5), "seed": 0})
