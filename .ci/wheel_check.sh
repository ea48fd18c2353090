#!/usr/bin/env bash
# Install check: build the wheel, install it (not editable) with its core dependencies into a
# fresh virtual environment, and from outside the repository import every package in it and
# value one training step. Catches what an editable install hides: a subpackage or file left
# out of the wheel, a core dependency missing from pyproject.toml. Exits non-zero on any failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

# Build from a copy of the files a clone would hold (tracked plus new, not ignored): a stale
# build/ in the checkout would otherwise leak into the wheel, and the checkout stays clean.
mkdir "$tmp/src" "$tmp/wheel"
"$python" - "$root" "$tmp/src" <<'EOF'
import shutil, subprocess, sys
from pathlib import Path

root, dest = Path(sys.argv[1]), Path(sys.argv[2])
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, check=True, capture_output=True).stdout
for name in filter(None, listed.decode().split("\0")):
    if (root / name).is_file():  # a tracked file deleted in the checkout is not copied
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
EOF
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$tmp/wheel" "$tmp/src"
wheel="$(ls "$tmp"/wheel/*.whl)"
echo "wheel_check: built $(basename "$wheel") ($((SECONDS - start)) s)"

"$python" -m venv "$tmp/venv"
venv_python="$tmp/venv/bin/python"
# CPU torch first: the wheel's bare torch requirement would otherwise pull the CUDA build.
"$venv_python" -m pip install --quiet torch==2.13.0
"$venv_python" -m pip install --quiet "$wheel"
echo "wheel_check: installed into a fresh venv ($((SECONDS - start)) s)"

# Outside the repository and without PYTHONPATH, so only the installed wheel can be imported.
cd "$tmp"
env -u PYTHONPATH "$venv_python" - "$wheel" <<'EOF'
import importlib
import sys
import sysconfig
import zipfile
from pathlib import Path

wheel, site = sys.argv[1], Path(sysconfig.get_paths()["purelib"]).resolve()
packages = sorted(n[: -len("/__init__.py")].replace("/", ".") for n in zipfile.ZipFile(wheel).namelist() if n.endswith("/__init__.py"))
for top in ("optimizers", "estimators", "attribution", "validation", "persample", "attribution.experiments", "estimators._rules"):
    if top not in packages:
        sys.exit(f"wheel_check: package {top!r} is not in the wheel; it has {packages}")
for name in packages:
    module = importlib.import_module(name)
    if site not in Path(module.__file__).resolve().parents:
        sys.exit(f"wheel_check: {name} was imported from {module.__file__}, not from the venv's {site}")
print(f"wheel_check: imported {len(packages)} packages from the wheel: {', '.join(packages)}")

import torch
from torch import nn
from attribution import InRunShapley

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
loss_fn = nn.functional.cross_entropy
x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
tracker = InRunShapley(model, opt, loss_fn, val_batch=(x[:4], y[:4]))
ids = [10, 11, 12, 13, 14, 15]
opt.zero_grad()
with tracker.batch(ids):
    loss_fn(model(x[4:10]), y[4:10]).backward()
opt.step()
values = tracker.values()
tracker.close()
if values.shape[0] != len(ids) or list(values.index) != ids or not torch.isfinite(torch.tensor(values["value"].to_numpy())).all():
    sys.exit(f"wheel_check: one tracked step gave values of shape {values.shape} for {len(ids)} ids:\n{values}")
print(f"wheel_check: one tracked step valued {values.shape[0]} samples; columns {list(values.columns)}")
EOF
env -u PYTHONPATH "$venv_python" -m attribution --help > /dev/null
echo "wheel_check: passed in $((SECONDS - start)) s"
