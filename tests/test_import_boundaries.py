"""Importing the server and client packages, with every submodule, loads no torch or open_clip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("torch", "open_clip", "torchvision")

# Runs in a fresh interpreter, so modules that the test process already imported do not count.
# It imports the package and every submodule that pkgutil finds, and prints one JSON object:
# the modules imported, the first module after whose import a forbidden top-level module
# appeared, and the forbidden modules loaded in the end.
_PROBE = """
import ast, importlib, importlib.util, json, pkgutil, sys

package_name, forbidden = sys.argv[1], tuple(sys.argv[2:])

def loaded():
    return sorted({name.split(".")[0] for name in sys.modules} & set(forbidden))

def import_main_dependencies(name):
    # Importing a __main__ module would run its command line, so import what it imports.
    source = importlib.util.find_spec(name).loader.get_source(name)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            importlib.import_module(node.module)

def raise_error(name):
    raise ImportError(f"cannot import {name}")

package = importlib.import_module(package_name)
imported = [package_name]
culprit = package_name if loaded() else None
for info in pkgutil.walk_packages(package.__path__, package_name + ".", onerror=raise_error):
    if info.name.rsplit(".", 1)[-1] == "__main__":
        import_main_dependencies(info.name)
    else:
        importlib.import_module(info.name)
    imported.append(info.name)
    if culprit is None and loaded():
        culprit = info.name
print(json.dumps({"imported": imported, "culprit": culprit, "forbidden": loaded()}))
"""


@pytest.mark.parametrize("package", ["cdul_server", "cdul_client"])
def test_package_imports_no_torch(package: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, package, *FORBIDDEN],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"importing {package} failed:\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["imported"][0] == package
    assert report["forbidden"] == [], (
        f"{report['culprit']} loads {report['forbidden']}; keep torch and open_clip out of "
        f"{package}, which imported {report['imported']}"
    )


def test_probe_finds_forbidden_submodule(tmp_path: Path) -> None:
    # A package whose second submodule imports a stand-in for torch: the probe must name it.
    package = tmp_path / "probe_package"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "light.py").write_text("import math\n")
    (package / "inner" / "__init__.py").write_text("")
    (package / "inner" / "heavy.py").write_text("import fake_torch\n")
    (package / "__main__.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "fake_torch.py").write_text("")
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, "probe_package", "fake_torch"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["forbidden"] == ["fake_torch"]
    assert report["culprit"] == "probe_package.inner.heavy"
    assert "probe_package.__main__" in report["imported"]
