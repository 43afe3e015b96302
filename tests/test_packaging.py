"""`pip wheel .` gives the package `paiton` and nothing else: the flat layout maps the repo
root to `paiton/`, so a stray root module or a shipped tests/ or bench/ would show here."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"backends", "passes", "fusion", "models"}


def test_wheel_holds_the_package_and_nothing_else(tmp_path):
    # Build from a copy: building writes build/ and *.egg-info next to the sources.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".hypothesis"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("paiton-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert all(n.startswith("paiton/") and n.endswith(".py") for n in code), code
    assert {n.split("/")[1] for n in code if n.count("/") == 2} == SUBPACKAGES
    root_modules = {Path(n).name for n in code if n.count("/") == 1}
    assert root_modules == {"__init__.py", "__main__.py", "cli.py"}
    for sub in SUBPACKAGES:  # every module of the source tree is shipped
        shipped = {Path(n).name for n in code if n.startswith(f"paiton/{sub}/")}
        assert shipped == {p.name for p in (source / sub).glob("*.py")}, sub
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[torch_dynamo_backends]" in entry_points
    assert "paiton = paiton.backends.paiton_backend:paiton_backend" in entry_points
