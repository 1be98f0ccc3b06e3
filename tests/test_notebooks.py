"""The notebooks' code cells run top to bottom (so the worked examples do not rot)."""

import json
import pathlib

import matplotlib
import pytest

matplotlib.use("Agg")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = json.loads(path.read_text())
    code = [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
            for c in nb["cells"] if c["cell_type"] == "code"]
    ns: dict = {}
    for src in code:
        exec(compile(src, f"{path.name}", "exec"), ns)
    if path.name.startswith("01_"):
        assert float(ns["g_rot"] @ ns["g_rot"]) > 0 and ns["g_vol"].shape == (64, 64, 64)
