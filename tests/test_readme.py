"""Every python code block of README.md runs as written, in order, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert blocks and all("import" in b or "openbox" in b for b in blocks)


def test_every_python_block_of_the_readme_runs_in_a_fresh_interpreter(tmp_path):
    script = "\n\n".join(python_blocks(README.read_text()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README python blocks failed:\n{proc.stderr[-4000:]}"
    assert "regions between two test images" in proc.stdout
