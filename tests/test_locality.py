"""The locality experiment (attention distance against gradient receptive fields) end to end: the shipped
command on the built-in models through `main.cli`, its table against a direct computation from captured maps,
identical numbers at another batch size and device count, the renormalisation switch, --dry_run and errors."""
from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import locality as locality_config
from vitsparse_jax import data, main
from vitsparse_jax.experiments import driver
from vitsparse_jax.measures import attention_distance as ad
from vitsparse_jax.measures import gradient_fields, locality
from vitsparse_jax.runtime import parallel
from vitsparse_jax.runtime.workdir import Workdir
from vitsparse_jax.weights import loading

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "locality.py")
IMAGES = 6          # one batch of 8 on 4 devices (2 per device), the last 2 rows padding
VIT, CNN = "vit_pico_patch4_32", "vgg_pico"


def argv(workdir: Path, *extra: str) -> list[str]:
    return ["vitsparse_jax.main", f"--config={CONFIG}", f"--config.workdir={workdir}", "--config.progress=False",
            f"--config.data.num_images={IMAGES}", "--config.data.batch_size=8", *extra]


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    """The default command (built-in ViT and VGG, trained and untrained) on 6 digits."""
    workdir = tmp_path_factory.mktemp("locality")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main.cli(argv(workdir))
    assert status == 0
    return workdir, out.getvalue()


def table(workdir: Path) -> list[dict[str, str]]:
    with open(workdir / "locality.csv", newline="") as f:
        return list(csv.DictReader(f))


def vit_config(workdir: Path, **locality_overrides):
    config = locality_config.get_config()
    config.update({"workdir": str(workdir), "progress": False})
    config.data.num_images = IMAGES
    config.data.batch_size = 8
    config.locality.update({"models": VIT, "variants": "trained", **locality_overrides})
    return config


def test_shipped_command_writes_table_figure_and_reports(shipped_run):
    workdir, stdout = shipped_run
    assert stdout.strip().endswith(f"report: {workdir / 'report.html'}, report.md; results: "
                                   f"{workdir / 'results.json'}, locality.csv")
    rows = table(workdir)
    models = [(r["model"], r["trained"]) for r in rows]
    assert list(dict.fromkeys(models)) == [(f"{VIT}.digits", "True"), (VIT, "False"), (f"{CNN}.digits", "True"),
                                           (CNN, "False")]
    vit = [r for r in rows if r["model"] == f"{VIT}.digits"]
    assert [r["block"] for r in vit] == [f"blocks.{l}" for l in range(6)]
    assert [float(r["relative_depth"]) for r in vit] == pytest.approx([(l + 1) / 6 for l in range(6)])
    for r in vit:   # every column of an attention block is filled, bands enclose their means
        assert all(v != "" for v in r.values()), r
        assert float(r["attn_distance_central_px_min"]) <= float(r["attn_distance_central_px"]) \
            <= float(r["attn_distance_central_px_max"])
    cnn = [r for r in rows if r["model"] == f"{CNN}.digits"]
    assert [r["block"] for r in cnn] == ["features.1", "features.4", "features.7", "features.9"]
    assert all(r["attn_distance_central_px"] == "" and r["rf_attn_mass_distance_px"] == "" and
               float(r["rf_out_mass_distance_px"]) > 0 for r in cnn)   # CNNs: receptive fields only
    assert (workdir / "locality_vs_depth.png").stat().st_size > 5000 and (workdir / "report.html").exists()
    report = (workdir / "report.md").read_text()
    assert "## Caveats" in report and "cumulative over blocks 0..l" in report and "renormalize" in report
    from vitsparse_jax import science
    keys = ["preprocessing", "attention_distance", "attention_entropy", "prefix_mass", "receptive_field", "locality",
            "rf_distance", "sub_stages"]
    assert "\n".join(science.report_block(keys)) in report
    results = Workdir(workdir).read_json("results.json")
    assert [m["num_images"] for m in results["models"]] == [IMAGES] * 4 and results["renormalize"] is False
    assert (workdir / "COMPLETE.json").exists()


def test_table_equals_a_direct_computation_from_captured_maps(shipped_run):
    """The trained ViT's rows against its maps captured on the same images, measured with the measures module:
    per-image head values averaged over images, then mean / min / max over heads; receptive fields from the
    plain gradient program and the locality module."""
    workdir, _ = shipped_run
    loaded = loading.load_model(VIT, "auto")
    mesh = parallel.make_mesh(jax.devices()[:1])
    source = data.subset(data.DigitsSource("test"), num_images=IMAGES)
    batch = parallel.to_host(next(iter(data.batches(source, loaded.pretrained_cfg, IMAGES, mesh))))
    x = data.normalize(batch["image"], loaded.pretrained_cfg)
    blocks = [f"blocks.{l}" for l in range(6)]
    _, aux = loaded.module.apply(loaded.variables, x, capture=tuple(f"{b}.attn.probs" for b in blocks))
    geom = ad.vit_geometry(loaded.info)
    names = [n for b in blocks for n in (f"{b}.attn", b)]
    layers = gradient_fields.layer_specs(loaded.module, loaded.variables, loaded.info, names, 1 / 7, (32, 32))
    maps = gradient_fields.receptive_field_maps(loaded.module, loaded.variables, x, layers, 1)
    rows = [r for r in table(workdir) if r["model"] == f"{VIT}.digits"]
    centre = locality.central_region((8, 8)).centre_px((32, 32))
    for l, row in enumerate(rows):
        m = {k: np.asarray(v, np.float64).mean(0)
             for k, v in ad.attention_measures(aux[f"{blocks[l]}.attn.probs"], geom).items()}   # (heads,)
        got = {k: float(row[k]) for k in row if k not in ("model", "tag", "trained", "family", "weights_source",
                                                            "block", "grid")}
        assert got["attn_distance_central_px"] == pytest.approx(m["distance_central"].mean(), rel=1e-5)
        assert got["attn_distance_central_px_min"] == pytest.approx(m["distance_central"].min(), rel=1e-5)
        assert got["attn_distance_central_px_max"] == pytest.approx(m["distance_central"].max(), rel=1e-5)
        assert got["attn_distance_px"] == pytest.approx(m["distance"].mean(), rel=1e-5)
        assert got["attn_distance_rel"] == pytest.approx(m["distance"].mean() / 32, rel=1e-5)
        assert got["prefix_mass"] == pytest.approx(m["prefix_mass"].mean(), rel=1e-4)
        assert got["entropy_norm"] == pytest.approx(m["entropy_norm"].mean(), rel=1e-5)
        assert got["uniform_attn_distance_central_px"] == pytest.approx(ad.uniform_reference(geom).distance_central)
        for prefix, k in (("rf_attn", 2 * l), ("rf_out", 2 * l + 1)):
            loc = locality.locality(maps[k], centre)
            assert got[f"{prefix}_mass_distance_px"] == pytest.approx(loc.mass_distance, rel=1e-4)
            assert got[f"{prefix}_ring_radius_px"] == pytest.approx(loc.mean_radius, rel=1e-4)
            assert got[f"{prefix}_S"] == pytest.approx(loc.s, rel=1e-4)
        assert got["uniform_rf_mass_distance_px"] == pytest.approx(
            locality.uniform_reference((32, 32), centre).mass_weighted_distance)


def test_numbers_do_not_depend_on_batch_size_or_device_count(shipped_run, tmp_path):
    """Batch 8 on 4 devices (the shipped run) and batch 2 on one device, 2 images per device in both: the
    attention measures of every image are the same, so their ordered totals are equal to the last bit; the
    partitioned gradient program may round an image's map differently in its last float32 bit (3e-9 relative
    seen), which the exact ordered sums keep at that size."""
    workdir, _ = shipped_run
    config = vit_config(tmp_path)
    config.data.batch_size = 2
    got = driver.execute(config, Workdir(tmp_path), mesh=parallel.make_mesh(jax.devices()[:1]), write=False)
    want = Workdir(workdir).read_json("results.json")["models"][0]
    assert got["models"][0]["name"] == want["name"] == f"{VIT}.digits"
    for mine, theirs in zip(got["models"][0]["blocks"], want["blocks"], strict=True):
        for key, value in theirs.items():
            if key.startswith("rf_"):
                assert mine[key] == pytest.approx(value, rel=1e-6), (mine["block"], key)
            else:
                assert mine[key] == value, (mine["block"], key)


def test_renormalize_changes_the_distances_only(shipped_run, tmp_path):
    """Each row divided by its patch mass: every distance grows (the built-in ViT puts some attention on its
    class token), by the direct computation's amount; prefix mass, entropy and receptive fields stay."""
    workdir, _ = shipped_run
    config = vit_config(tmp_path, renormalize=True, blocks="blocks.0,blocks.1")
    got = driver.execute(config, Workdir(tmp_path), write=False)["models"][0]
    assert got["attention"]["renormalize"] is True and got["attention"]["skipped"].sum() == 0
    want = Workdir(workdir).read_json("results.json")["models"][0]["blocks"][:2]
    loaded = loading.load_model(VIT, "auto")
    mesh = parallel.make_mesh(jax.devices()[:1])
    batch = parallel.to_host(next(iter(data.batches(data.subset(data.DigitsSource("test"), num_images=IMAGES),
                                                    loaded.pretrained_cfg, IMAGES, mesh))))
    _, aux = loaded.module.apply(loaded.variables, data.normalize(batch["image"], loaded.pretrained_cfg),
                                 capture=("blocks.0.attn.probs", "blocks.1.attn.probs"))
    for l, (mine, theirs) in enumerate(zip(got["blocks"], want, strict=True)):
        direct = ad.attention_measures(aux[f"blocks.{l}.attn.probs"], ad.vit_geometry(loaded.info), True)
        for key, measure in (("attn_distance_px", "distance"), ("attn_distance_central_px", "distance_central")):
            assert mine[key] > theirs[key]
            assert mine[key] == pytest.approx(float(np.asarray(direct[measure], np.float64).mean()), rel=1e-5)
        for key in ("prefix_mass", "prefix_mass_central", "entropy", "rf_attn_mass_distance_px", "rf_out_S"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key


def test_dry_run_describes_the_passes(tmp_path, capsys):
    assert main.cli(argv(tmp_path, "--dry_run")) == 0
    out = capsys.readouterr().out
    assert "dry run of experiment 'locality'" in out
    assert f"{VIT} (untrained, vit)" in out
    assert "6 attention blocks (distances per head) + receptive fields of 12 layers" in out
    assert f"{CNN} (trained, vgg)" in out and "receptive fields of 4 stage outputs (a CNN)" in out
    assert "total: 24 forward and 192 backward passes over 6 images" in out
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("extra,message", [
    (["--config.locality.variants=trained,random"], "locality.variants"),
    (["--config.locality.blocks=blocks.9"], r"'blocks.9' matches no block of vit_pico_patch4_32; its blocks: "
                                            "blocks.0"),
    (["--config.model=deit_tiny_patch16_224"], "is not among locality.models"),
    (["--config.locality.fraction=0"], "no central position"),
])
def test_clear_errors(tmp_path, capsys, extra, message):
    assert main.cli(argv(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_paper_preset_names_the_models_at_one_size():
    config = locality_config.get_config("paper")
    models = config.locality.models.split(",")
    assert len(models) == 7 and config.img_size == 224 and config.locality.variants == "trained,untrained"
    assert any("dinov2" in m for m in models) and any(m.startswith("swin") for m in models)
    with pytest.raises(ValueError, match="unknown preset"):
        locality_config.get_config("nope")
