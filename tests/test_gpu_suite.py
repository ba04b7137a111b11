"""benchmarks/gpu_suite.py --smoke: every part of the GPU suite runs on tiny models on the CPU, as the GPU
machine would run it: with ml_collections and tensorflow_datasets made unimportable (the GPU image has
neither), so the suite cannot rot between GPU loans."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]

# Runs the suite with the GPU image's missing packages blocked at import.
LAUNCH = """
import importlib.machinery, runpy, sys
BLOCKED = ("ml_collections", "tensorflow_datasets")
find = importlib.machinery.PathFinder.find_spec      # as if not installed: find_spec None, import fails


def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in BLOCKED else find(name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
    del sys.modules[name]
sys.argv = ["benchmarks/gpu_suite.py"] + sys.argv[1:]
runpy.run_path("benchmarks/gpu_suite.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "--smoke", "--out", str(out), "--budget_s", "1200"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_part_done(smoke):
    out, stdout = smoke
    res = json.loads((out / "gpu_suite.json").read_text())
    assert res["smoke"]
    assert res["meta"]["xla_cache_dir"] == os.environ["JAX_COMPILATION_CACHE_DIR"]   # the tests' shared cache
    parts = res["parts"]
    assert list(parts) == ["grid_vit_bf16", "agreement", "forward", "flops", "grid_rest", "data", "host",
                           "receptive_fields", "forward_compile"]
    bad = {name: (p["status"], p.get("error"), p.get("errors")) for name, p in parts.items() if p["status"] != "done"}
    assert not bad, bad
    for name in ("grid_vit_bf16", "agreement", "forward", "grid_rest", "receptive_fields", "forward_compile"):
        assert parts[name]["records"], name
    assert {r["dtype"] for r in parts["grid_vit_bf16"]["records"] + parts["grid_rest"]["records"]} == {
        "bfloat16", "float32"}
    assert all(r["sanity"]["top_cells_agree"] == 1.0 for r in parts["grid_rest"]["records"]
               if r["dtype"] == "float32")
    for r in parts["agreement"]["records"]:
        assert 0.0 <= r["images_all_predictions_agree"] <= 1.0 and r["cells_per_image"] == 3 * 17
    assert all(r["ratio_vs_eager"] > 0 for r in parts["forward"]["records"])
    assert "torch_compile" in parts["forward_compile"]["records"][0]["images_per_s"]
    assert set(parts["flops"]["peak_flops_per_s"]) == {"float32", "bfloat16"}
    assert parts["data"]["measured"]["batches"]
    assert [r["case"] for r in parts["host"]["records"]] == ["vit_b16_sparsity", "swin_t_sparsity",
                                                             "resnet50_sparsity", "vit_b16_rf"]
    assert all(r["images_per_cpu_s"] > 0 for r in parts["host"]["records"])
    assert parts["receptive_fields"]["records"][0]["layers"] == 1 + 4 * 3   # embed + 4 per block, depth 3
    # each part's markdown printed as it finished, and the whole table written
    md = (out / "gpu_suite.md").read_text()
    for title in ("(b) Ablation grid", "(c) bf16 vs fp32", "(a) Forward", "(e) Achieved", "(f) Host decode",
                  "Host ceiling", "(d) Receptive fields"):
        assert title in md and title in stdout, title
    assert "extrapolated" in md and "% of peak" in md and "bottleneck" in md


def test_budget_stops_cleanly(tmp_path):
    """A budget far shorter than the parts: the watchdog ends the run at the budget, even inside a part or a
    compilation, with exit code 0 and the JSON + markdown of what was done."""
    budget = 5
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "--smoke", "--out", str(tmp_path), "--budget_s", str(budget),
                           "--parts", "forward,grid_rest,agreement"], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall < budget + 30, wall     # + the interpreter's start before the script's clock starts
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert res["stopped_at_budget"] and "budget" in proc.stdout
    assert all(p["status"] != "running" for p in res["parts"].values())
    assert (tmp_path / "gpu_suite.md").read_text().startswith("## GPU suite")
