"""The package's shape: one import name, every module shipped, family names only in the registry."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tokenize
import zipfile
from pathlib import Path

import pytest

from recforge.families import FAMILIES, family, family_of_module

REPO = Path(__file__).resolve().parents[2]
LAYERS = {
    "recforge": "recforge",
    "data": "recforge/data",
    "models": "recforge/models",
    "trainer": "recforge/trainer",
    "serve": "recforge/serve",
}


def _sources() -> list[Path]:
    return sorted(
        p
        for folder in LAYERS
        for p in (REPO / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    source = out / "source"
    for folder in LAYERS:
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # No build isolation: setuptools is already in the environment and the build stays offline.
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "--disable-pip-version-check", str(source), "-w", str(out)], check=True)
    (path,) = out.glob("recforge-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_claims_only_the_recforge_import_name(wheel: zipfile.ZipFile) -> None:
    tops = {
        name.split("/")[0]
        for name in wheel.namelist()
        if not name.split("/")[0].endswith(".dist-info")
    }
    assert tops == {"recforge"}
    top_level = next(n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["recforge"]


def test_wheel_ships_every_module_of_every_layer(wheel: zipfile.ZipFile) -> None:
    # packages are listed by hand in pyproject.toml (package-dir maps folders into the namespace);
    # a new subpackage missing from that list would be left out of installs silently.
    expected = set()
    for path in _sources():
        folder = path.relative_to(REPO).parts[0]
        expected.add("/".join([LAYERS[folder], *path.relative_to(REPO / folder).parts]))
    shipped = {name for name in wheel.namelist() if name.endswith(".py")}
    assert expected - shipped == set()


def _string_literals(path: Path) -> list[tuple[int, str]]:
    found = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.STRING:
            try:
                value = eval(token.string, {})  # a literal; f-strings raise and are skipped
            except Exception:
                continue
            if isinstance(value, str):
                found.append((token.start[0], value))
    return found


def test_family_names_appear_only_in_the_registry() -> None:
    names = set(FAMILIES)
    registry = REPO / "recforge" / "families.py"
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {value!r}"
        for path in _sources()
        if path != registry
        for line, value in _string_literals(path)
        if value in names
    ]
    assert offenders == []


def test_registry_resolves_every_family_and_legacy_class_paths() -> None:
    for fam in FAMILIES.values():
        for attribute in ("model", "module", "user_encoder"):
            cls = fam.load(attribute)
            assert f"{cls.__module__}.{cls.__qualname__}" == getattr(fam, attribute)
        assert family_of_module(fam.module) is fam
        for legacy in fam.legacy_modules:
            assert family_of_module(legacy) is fam
    with pytest.raises(ValueError, match="not registered"):
        family("gru4rec")
    with pytest.raises(ValueError, match="no registered family"):
        family_of_module("my.module.Thing")
