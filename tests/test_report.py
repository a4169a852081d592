"""The report writer draws on its own Agg canvases: importing it or plotting changes no global backend."""

from __future__ import annotations

import os
import subprocess
import sys


def test_import_and_plot_keep_matplotlib_backend(tmp_path):
    code = (
        "import matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "import hap.report\n"
        "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())\n"
        "plan = {'method': 'l1', 'allocation': 'uniform', 'target': {'params': 0.5},\n"
        "        'groups': [{'name': 'conv1', 'kept': [0], 'implanted': [], 'removed': [1]}]}\n"
        f"p = hap.report.plot_widths(plan, __import__('pathlib').Path({str(tmp_path)!r}) / 'w.png')\n"
        "assert p.stat().st_size > 0 and matplotlib.get_backend() == before\n"
        "print(before)\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "svg"
