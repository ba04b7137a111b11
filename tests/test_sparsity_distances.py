"""The sparsity run's attention distances (docs/science.md#attention-distance): per block and head in
distances.csv, results.json and report.md, equal to the measures of the captured maps, per image on request,
and the same at another batch size and device count."""
from __future__ import annotations

import csv

import jax
import numpy as np
import pytest

from configs import sparsity as sparsity_config
from vitsparse_jax import data, science
from vitsparse_jax.experiments import driver
from vitsparse_jax.measures import attention_distance as ad
from vitsparse_jax.runtime import parallel
from vitsparse_jax.runtime.workdir import Workdir
from vitsparse_jax.weights import loading

IMAGES = 6


def config_for(workdir, **overrides):
    config = sparsity_config.get_config()
    config.update({"workdir": str(workdir), "progress": False, "weights": "untrained"})
    config.data.num_images = IMAGES
    config.data.batch_size = 8                 # 4 fake devices, 2 rows each; the last 2 rows padding
    config.sparsity.update({"per_image": True, "explore_images": 0, **overrides})
    return config


@pytest.fixture(scope="module")
def vit():
    return loading.load_model(sparsity_config.get_config().model, "untrained", seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, vit):
    workdir = tmp_path_factory.mktemp("sparsity_distances")
    return workdir, driver.execute(config_for(workdir), Workdir(workdir), loaded=[vit])


def direct_measures(loaded, renormalize=False) -> list[dict[str, np.ndarray]]:
    """Each block's per-image measures (images, heads) of the maps captured on the same images."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    source = data.subset(data.DigitsSource("test"), num_images=IMAGES)
    batch = parallel.to_host(next(iter(data.batches(source, loaded.pretrained_cfg, IMAGES, mesh))))
    blocks = [s.removesuffix(".attn") for s in loaded.info.ablation_sites]
    _, aux = loaded.module.apply(loaded.variables, data.normalize(batch["image"], loaded.pretrained_cfg),
                                 capture=tuple(f"{b}.attn.probs" for b in blocks))
    geom = ad.vit_geometry(loaded.info)
    return [jax.tree.map(lambda v: np.asarray(v, np.float64),
                         ad.attention_measures(aux[f"{b}.attn.probs"], geom, renormalize)) for b in blocks]


def test_distances_per_block_and_head_equal_the_measures_of_the_captured_maps(run, vit):
    workdir, summary = run
    att = summary["statistics"]["attention_distance"]
    direct = direct_measures(vit)
    assert att["blocks"] == [f"blocks.{l}" for l in range(6)] and att["heads"] == [4] * 6
    for key in ("distance", "distance_central", "prefix_mass", "prefix_mass_central", "entropy", "entropy_norm"):
        want = np.stack([m[key].mean(0) for m in direct])          # (blocks, heads): mean over images
        got = att[f"{key}_px"] if key.startswith("distance") else att[key]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
    with open(workdir / "distances.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["block"], int(r["head"])) for r in rows] == [(f"blocks.{l}", h) for l in range(6) for h in range(4)]
    assert float(rows[5]["distance_central_rel"]) == pytest.approx(direct[1]["distance_central"][:, 1].mean() / 32,
                                                                   rel=1e-5)
    report = (workdir / "report.md").read_text()
    assert "## Attention distance" in report and "| blocks.5 |" in report
    assert "\n".join(science.report_block(["attention_distance", "attention_entropy"])[4:]) in report
    per_image = np.load(workdir / "per_image.npz")
    np.testing.assert_allclose(per_image["attention_distance_central"][:, 2], direct[2]["distance_central"],
                               rtol=1e-5)


def test_distances_do_not_depend_on_batch_size_or_device_count(run, vit, tmp_path):
    """2 images per device in both runs: every image's values, and so the ordered totals, equal to the last bit."""
    _, summary = run
    config = config_for(tmp_path)
    config.data.batch_size = 2
    got = driver.execute(config, Workdir(tmp_path), loaded=[vit], mesh=parallel.make_mesh(jax.devices()[:1]),
                         write=False)
    want = summary["statistics"]["attention_distance"]
    for key in ("distance_px", "distance_central_px", "prefix_mass", "entropy", "entropy_norm", "skipped"):
        np.testing.assert_array_equal(got["statistics"]["attention_distance"][key], want[key], err_msg=key)


def test_distance_renormalize_switch(vit, tmp_path):
    config = config_for(tmp_path, distance_renormalize=True, per_image=False)
    got = driver.execute(config, Workdir(tmp_path), loaded=[vit], write=False)["statistics"]["attention_distance"]
    direct = direct_measures(vit, renormalize=True)
    assert got["renormalize"] is True
    np.testing.assert_allclose(got["distance_px"], np.stack([m["distance"].mean(0) for m in direct]), rtol=1e-5)
