"""recforge.atomic: a directory appears complete or not at all; overwrite only when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from recforge.atomic import TargetExistsError, atomic_directory, replace_directory


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_written_then_renamed(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out"
    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.partial-")
        (tmp / "a.txt").write_text("a")
        assert not target.exists(), "nothing at the target while writing"
    assert (target / "a.txt").read_text() == "a"
    assert _leftovers(target.parent) == []


def test_failure_leaves_nothing_and_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert _leftovers(tmp_path) == []


def test_overwrite_flag(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(TargetExistsError, match="already exists"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_target_appearing_meanwhile_is_not_clobbered(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(TargetExistsError, match="appeared"):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert _leftovers(tmp_path) == []


def test_replace_directory_with_a_fixed_aside_name(tmp_path: Path) -> None:
    target, source, aside = tmp_path / "ckpt", tmp_path / ".partial", tmp_path / ".old"
    target.mkdir()
    source.mkdir()
    (source / "x").write_text("new")
    aside.mkdir()  # a stale one from an earlier crash
    replace_directory(source, target, aside=aside)
    assert (target / "x").read_text() == "new" and not aside.exists() and not source.exists()
