"""benchmarks/host_ceiling.py runs (tiny sizes) and its new and old host paths agree: a change of the host
step's interfaces breaks this test, not the next benchmark session."""
import re
from pathlib import Path


def test_the_host_ceiling_benchmark_runs_and_both_paths_agree(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import host_ceiling

    host_ceiling.main(["--cases", "vit_b16_sparsity,swin_t_sparsity,resnet50_sparsity,ablation_rows,resume_state",
                       "--batch_size", "4", "--steps", "2", "--runs", "1", "--state_images", "100"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    for case in ("vit_b16_sparsity", "swin_t_sparsity", "resnet50_sparsity"):
        diff = float(rows[case].split("|")[8])
        assert diff < 1e-12, (case, rows[case])                  # the new totals equal the per-image path's
    assert "ablation_rows" in rows
    assert re.search(r"resume state at 100 images .* saved in [0-9.]+ s", out)
