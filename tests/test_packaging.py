"""The built wheel holds every package of the repository, not only the top-level ones.

An editable install (the README's command) finds subpackages through the source tree, so a
wheel that lacks ``estimators._rules`` or ``attribution.experiments`` passes every other test and
breaks only for users who ``pip install`` the wheel. The full install is checked by
``.ci/wheel_check.sh`` (fresh venv, wheel, one tracked step); this test only builds.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = {"tests"}


def _package_dirs(root: Path) -> list[Path]:
    """Directories importable as packages from ``root``: an ``__init__.py`` in them and in every parent up to ``root``."""
    found = []
    todo = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") and d.name not in NOT_SHIPPED]
    while todo:
        d = todo.pop(0)
        if (d / "__init__.py").is_file():
            found.append(d)
            todo += [c for c in sorted(d.iterdir()) if c.is_dir() and c.name != "__pycache__"]
    return found


def _build_wheel(tmp_path: Path) -> Path:
    """Build with setuptools' backend from a clean copy: no network, and no stale ``build/`` of the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ROOT.iterdir():  # pyproject.toml, README.md (the metadata's readme), ...
        if f.is_file():
            shutil.copy2(f, src / f.name)
    for d in _package_dirs(ROOT):
        if d.parent == ROOT:
            shutil.copytree(d, src / d.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "wheel"
    out.mkdir()
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"building the wheel failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return out / proc.stdout.strip().splitlines()[-1]


def test_the_wheel_contains_every_package_and_module(tmp_path):
    packages = _package_dirs(ROOT)
    # Guards the discovery itself: an empty list would make the test pass vacuously.
    assert {"attribution", "estimators/_rules", "attribution/experiments"} <= {d.relative_to(ROOT).as_posix() for d in packages}
    with zipfile.ZipFile(_build_wheel(tmp_path)) as wheel:
        names = set(wheel.namelist())
    missing_packages = [d.relative_to(ROOT).as_posix() for d in packages if f"{d.relative_to(ROOT).as_posix()}/__init__.py" not in names]
    assert not missing_packages, f"packages missing from the wheel: {missing_packages}; list them in pyproject.toml [tool.setuptools.packages.find]"
    modules = [f.relative_to(ROOT).as_posix() for d in packages for f in sorted(d.glob("*.py"))]
    missing_modules = [m for m in modules if m not in names]
    assert not missing_modules, f"modules missing from the wheel: {missing_modules}"
    assert not [n for n in names if n.startswith("tests/")], "the test suite must not be installed as a package"
