"""The package layers and the absence of import cycles, as ``lint-imports`` checks them in CI.

The contracts are in pyproject.toml (``[tool.importlinter]``); running them here shows a broken
layer to whoever runs pytest, with import-linter's own report of the offending imports.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_keep_the_layers_and_have_no_cycles():
    # The script of this interpreter's environment: another one on PATH may see another robench.
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]'); the layers are not checked")
    # --no-cache: nothing is written into the working tree.
    done = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
