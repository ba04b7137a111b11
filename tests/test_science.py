"""The science lives in the repository: docs/science.md holds the definitions that vitsparse_jax/science.py
writes into it, every citation of a section resolves, nothing points outside the repository, and each
report's "Definitions" block comes from the same module, with the package version."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import vitsparse_jax
from vitsparse_jax import science

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "science.md"
SECTIONS = ("models", "preprocessing", "attention-maps", "ablation-units", "swin-units", "cnn-units",
            "convnext-units", "ablation-metrics", "sparsity-statistics", "receptive-fields", "locality-summary",
            "sub-stages", "prefix-tokens", "resolution", "high-norm-tokens", "attention-distance")
TEXT_SUFFIXES = {".py", ".md", ".js", ".css", ".html", ".json", ".toml", ".txt", ".cfg", ".yaml", ".yml"}


def text_files(*roots: str) -> list[Path]:
    out = []
    for root in roots:
        path = REPO / root
        out += [path] if path.is_file() else [p for p in sorted(path.rglob("*"))
                                             if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return out


def anchors(text: str) -> set[str]:
    return set(re.findall(r'<a id="([a-z0-9-]+)"></a>', text))


# --- nothing outside the repository -----------------------------------------------------------------------

def test_no_file_cites_the_spec_or_the_shared_folder():
    """Catches a 'SPEC section N' or '../shared' reference that a clone of the repository cannot resolve."""
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
            for p in text_files("vitsparse_jax", "configs", "docs", "README.md")
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if "SPEC" in line or "../shared" in line or "/work/shared" in line]
    assert not hits, "\n".join(hits)


def test_every_cited_science_section_exists():
    """Catches a citation `docs/science.md#<section>` (code, configs, docs, tests, benchmarks) or an in-page link
    `#<section>` of docs/science.md whose section was renamed or never written."""
    doc = DOC.read_text()
    have = anchors(doc)
    assert set(SECTIONS) <= have, sorted(set(SECTIONS) - have)
    cited = {(p.relative_to(REPO), a) for p in text_files("vitsparse_jax", "configs", "docs", "README.md",
                                                          "benchmarks", "BENCHMARKS.md", "tests")
             for a in re.findall(r"science\.md#([a-z0-9-]+)", p.read_text(encoding="utf-8", errors="replace"))}
    cited |= {(Path("docs/science.md"), a) for a in re.findall(r"\]\(#([a-z0-9-]+)\)", doc)}
    missing = sorted(f"{p}: #{a}" for p, a in cited if a not in have)
    assert not missing, missing
    assert len(cited) > 40   # the citations were found at all


# --- docs/science.md and the module ------------------------------------------------------------------------

def test_science_md_blocks_equal_the_module():
    """Fails when a definition was edited in one place only: run python -m vitsparse_jax.science --write."""
    text = DOC.read_text()
    assert science.update_doc(text) == text
    for key, d in science.DEFINITIONS.items():
        assert d.anchor in anchors(text), key
        assert science.doc_block(key) in text


def test_check_command_fails_on_a_stale_page_and_write_repairs_it(tmp_path, capsys):
    stale = tmp_path / "science.md"
    text = DOC.read_text()
    d = science.DEFINITIONS["psi"]
    stale.write_text(text.replace(d.text, "psi is whatever the reader thinks."))
    assert science.main(["--check", str(stale)]) == 1
    assert "--write" in capsys.readouterr().err
    assert science.main(["--write", str(stale)]) == 0
    assert stale.read_text() == text and science.main(["--check", str(stale)]) == 0
    assert science.main(["--check", str(DOC)]) == 0   # the command docs/science.md gives, on the page itself


def test_a_missing_or_misplaced_block_is_refused(tmp_path, capsys):
    text = DOC.read_text()
    block = science.doc_block("locality")
    with pytest.raises(ValueError, match="no block for locality"):
        science.update_doc(text.replace(block, ""))
    moved = text.replace(block, "").replace('<a id="models"></a>', '<a id="models"></a>\n' + block)
    with pytest.raises(ValueError, match="move it into #locality-summary"):
        science.update_doc(moved)
    page = tmp_path / "science.md"
    page.write_text(text + "\n" + block + "\n")
    assert science.main(["--check", str(page)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and page.read_text() == text + "\n" + block + "\n"


# --- reports ---------------------------------------------------------------------------------------------

def test_report_block_carries_version_text_and_section_of_each_key():
    lines = science.report_block(["mu", "psi", "mu"])
    text = "\n".join(lines)
    assert lines[0] == "## Definitions" and f"vitsparse_jax {vitsparse_jax.__version__}" in text
    for key in ("mu", "psi"):
        d = science.DEFINITIONS[key]
        assert text.count(f"(`docs/science.md#{d.anchor}`): {d.text}") == 1
    with pytest.raises(KeyError, match="no definition 'nu'"):
        science.report_block(["nu"])


def test_package_version_is_the_project_version():
    """Reports name `vitsparse_jax.__version__`; it must be the version pyproject.toml installs."""
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert vitsparse_jax.__version__ == declared


def report_has(text: str, keys: list[str]) -> bool:
    return "\n".join(science.report_block(keys)) in text


def test_ablation_report_defines_the_units_of_each_family_it_shows():
    from vitsparse_jax.experiments.ablation import report

    def model(family: str, whole: bool) -> dict:
        r = {"name": family, "family": family, "A0": 0.5, "images_used": 4, "images_skipped": 0, "cells": [],
             "grid": {"rank_by": "last_layer", "renormalize": False, "cnn_unit": "channel", "draws": 3,
                      "p": [0.1], "n": [1]},
             "sites": [],
             "provenance": {"kind": "untrained", "detail": "seed 0"}}
        return {**r, "whole_layer": []} if whole else r

    out = {"data": {"name": "digits"}, "decisions": ["d"], "models": [model("vit", True), model("resnet", False)]}
    text = report.report_text(out, 2, "vit")
    assert report_has(text, ["preprocessing", "vit_units", "prefix_mass", "cnn_units", "accuracies", "psi",
                             "whole_layer"])
    out["models"] = [model("swin", False), model("convnext", False)]
    text = report.report_text(out, 2, "swin")
    assert report_has(text, ["preprocessing", "swin_units", "convnext_units", "accuracies", "psi"])


def test_sparsity_report_keys_follow_the_kind_family_and_token_norms():
    from vitsparse_jax.experiments.sparsity.report import definition_keys

    def summary(kind: str, family: str, norms: bool) -> dict:
        return {"kind": kind, "model": {"family": family}, "statistics": {"norms": {} if norms else None}}

    vit = definition_keys(summary("attention", "vit", True))
    assert {"mu", "prefix_mass", "correlations", "top_patches", "high_norm_tokens"} <= set(vit)
    swin = definition_keys(summary("attention", "swin", False))
    assert "swin_units" in swin and "prefix_mass" not in swin and "high_norm_tokens" not in swin
    assert definition_keys(summary("cnn", "vgg", False))[:3] == ["preprocessing", "cnn_units", "channel_share"]
    assert "convnext_units" in definition_keys(summary("cnn", "convnext", False))


def test_receptive_field_report_defines_its_quantities():
    import numpy as np

    from vitsparse_jax.experiments.receptive_field import report
    from vitsparse_jax.measures.gradient_fields import Layer
    from vitsparse_jax.measures import locality

    layer = Layer("blocks.0.attn", "attn", 0.0, "tokens", locality.central_region((4, 4)))
    measured = report.Measured(model={"name": "m", "tag": "", "trained": False, "weights": "untrained"},
                               label="m (untrained)", layers=[layer], maps=np.ones((1, 16, 16)), num_images=2,
                               image_hw=(16, 16))
    text = report._report([measured], [], 1 / 7, ["report.md"])
    assert report_has(text, ["preprocessing", "receptive_field", "locality", "sub_stages"])
