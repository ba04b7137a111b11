"""The short definitions of every quantity the experiments report, each tied to its docs/science.md section.

One source for two readers: docs/science.md holds each definition in a marked block that this module writes
(`python -m vitsparse_jax.science --write docs/science.md`; `--check` fails when the page and the module
differ), and every report.md / report.html lists the ones it shows (`report_block(keys)`), with the package
version, so a report read on its own is understood. Longer explanations and the choices behind each
definition are hand-written prose in docs/science.md, next to its block.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Sequence

DOC = "docs/science.md"


@dataclasses.dataclass(frozen=True)
class Definition:
    anchor: str    # the docs/science.md section (its `<a id="...">`)
    title: str     # the quantities it defines, as reports name them
    text: str      # a few sentences of markdown; formulas in code spans


DEFINITIONS: dict[str, Definition] = {
    "preprocessing": Definition(
        "preprocessing", "images",
        "timm's eval transform from the checkpoint's `pretrained_cfg`: shorter side resized to "
        "`floor(img_size / crop_pct)` with its interpolation (PIL, antialiased), centre crop of `img_size`, "
        "scaled to [0, 1], normalised with its mean and std. ImageNet label = position of the wnid in sorted "
        "order."),
    "mu": Definition(
        "attention-maps", "A, mu, nu, mu_h",
        "`A[l,h]` = block l's post-softmax attention of head h (N x N, rows = queries i, columns = keys j), "
        "float32, from the clean forward pass of each image. `mu[l,j] = (1/(H N)) sum_h sum_i A[l,h,i,j]`: "
        "the mean of column j over all heads and ALL query rows (prefix rows included), so `sum_j mu[l,j] = 1`. "
        "`nu = -log10(mu)`; `mu_h` = the same mean for one head."),
    "prefix_mass": Definition(
        "prefix-tokens", "prefix tokens, prefix mass",
        "Prefix tokens = class, distillation and register tokens (timm's `num_prefix_tokens`). They are never "
        "ranked, dropped or drawn and are left out of every patch statistic; `mu` still sums to 1 over all N "
        "columns, and the mu mass on them is reported per block and per kind (`cls`, `dist`, `reg`), mean over "
        "images."),
    "nu_density": Definition(
        "sparsity-statistics", "nu density, mean nu",
        "Density of `nu` over every (image, patch column) of a block: fixed bins on [`nu_min`, `nu_max`), "
        "normalised over all values, so values outside the range lower its area. Dashed line: "
        "`-log10(mean mu)`, mean over patch columns and images. `mean_nu`, `std_nu`: over the positive mu."),
    "correlations": Definition(
        "sparsity-statistics", "head-by-head and layer-by-layer r (Fig. 2)",
        "Fig. 2a: ONE Pearson r between two heads' `mu_h` of the last block, pooled over all (image, patch "
        "column) pairs (as the published code), not a mean of per-image r; Fig. 2b: the same between two "
        "blocks' `mu`. Accumulated image by image in float64."),
    "top_patches": Definition(
        "sparsity-statistics", "top-k patches (Fig. 3b)",
        "Per image, the `k = round(top_fraction * patches)` patch columns of the last block with the largest "
        "`mu` (`top_by='head_index'`: `mu_h` of head `top_head`, as the published code); counted over images "
        "and normalised to sum to 1 on the patch grid. Ties go to the lower patch index."),
    "top_share": Definition(
        "sparsity-statistics", "top-p share",
        "Per image, the share of a block's patch-column mass (CNN: of a layer's total l1) held by its "
        "`round(p * units)` largest columns (channels), mean over images; uniform attention gives "
        "`k / units`."),
    "block_depth": Definition(
        "sparsity-statistics", "relative depth (blocks)",
        "Block l of a model with L blocks is drawn at `(l + 1) / L`: the last block of every model at 1."),
    "swin_units": Definition(
        "swin-units", "Swin units and mu",
        "Our decision: a unit is a token of the block's input map. `mu_j` = mean over heads and over the query "
        "rows of the window that holds token j (windows mapped back through the cyclic shift), so a block's "
        "mu sums to its number of windows. Each block is ranked by its own mu; dropping a token zeroes its "
        "column in its window, every head."),
    "cnn_units": Definition(
        "cnn-units", "CNN units and l1 scores",
        "Our decision: a unit is a channel of a post-ReLU map (`cnn_unit='spatial'`: a position, across all "
        "channels). Score = l1 = `sum |a|` over the other axes, per image, clean pass; each layer is ranked by "
        "its own scores; dropping = zeroing the unit right after the ReLU. Layers: VGG's ReLUs after the 3x3 "
        "convs of `features`; ResNet's bottleneck `act2`, basic-block `act1` and `act2`."),
    "channel_share": Definition(
        "cnn-units", "channel share, active fraction",
        "A channel's share = its l1 score / the layer's total, per image (shares sum to 1 like mu); densities "
        "of `-log10(share)` with a line at `log10(C)` (a uniform share). `active_fraction` = share of positive "
        "activations; `zero_channels` = channels with share 0, left out of `mean_nu`."),
    "convnext_units": Definition(
        "convnext-units", "ConvNeXt units",
        "Our decision: a unit is a channel (or position) of the GELU output inside each block's MLP "
        "(`...mlp.act`, the activation after the spatial conv); score = l1 over positions; the ablation layers "
        "are every block's `mlp.act`, in forward order."),
    "vit_units": Definition(
        "ablation-units", "ViT / DeiT units, top and random sets",
        "Units = patch-token columns of the post-softmax map, `U` = patches; `k = round(p * U)` (Python's "
        "round). Top set: per image, the k patch columns with the largest clean-pass `mu` of the LAST block, "
        "dropped in each of the last n blocks (`rank_by='each_layer'`: each block's own mu). Dropping = "
        "multiplying those columns by 0 in every head and query row after softmax, no renormalisation. Random "
        "sets: uniform without replacement, per image and draw, the same set in every layer with the same U."),
    "accuracies": Definition(
        "ablation-metrics", "A0, A_t, A_r",
        "On the same images: `A0` = clean top-1; `A_t(p, n)` = top-1 with the top sets of the last n layers "
        "dropped; `A_r(p, n)` = mean top-1 over the random draws. The ranking comes from the clean pass and is "
        "never recomputed on the ablated network."),
    "psi": Definition(
        "ablation-metrics", "psi",
        "`psi(p, n) = (A0 - A_t) / (A0 - A_r)`: above 1 when the top units matter more than random ones. Its "
        "interval is a percentile bootstrap over images; a cell is flagged 'n.s.' (no psi given) when the "
        "interval of `A0 - A_r` reaches 0."),
    "whole_layer": Definition(
        "ablation-metrics", "whole-layer reference",
        "Top-1 with every candidate unit of the last n layers dropped (the dotted curve of Fig. 4b)."),
    "receptive_field": Definition(
        "receptive-fields", "receptive field M",
        "For a layer output Y: `M = |d sum(Y_central) / dx|`, x = the normalised input image, per image, "
        "summed over colour channels, averaged over images. `Y_central` = the central block of the layer's "
        "grid with side `round(f * side)` (halves up, at least 1; default f = 1/7: 14x14 -> 2x2); transformer "
        "tokens without prefix tokens, on the patch grid. Untrained = timm's initialisation."),
    "locality": Definition(
        "locality-summary", "E_r, S, mean radius",
        "Around the centre of the central region, in input pixels: `E_r[M]` = mean of M over the pixels at "
        "distance [r, r+1); `S = (1 / max M) sum_{r=0..R} r E_r[M]`, R = the farthest pixel; mean radius = "
        "`sum_r r E_r / sum_r E_r` (does not depend on the map's scale). Larger = less local."),
    "sub_stages": Definition(
        "sub-stages", "layers, sub-stages, relative depth",
        "Per ViT / Swin block: `attn` = attention branch before the residual add (slow pathway; after layer "
        "scale), `attn_res` = after the add (fast pathway), `mlp` = MLP branch before its add, `mlp_res` = the "
        "block output. VGG: each ReLU after a conv; ResNet, ConvNeXt: the stem and each block output. Relative "
        "depth = the layer's stage index among the spatial stages / (their number - 1)."),
    "high_norm_tokens": Definition(
        "high-norm-tokens", "high-norm tokens, overlap, Spearman r",
        "Ours: token norms `||z[j]||_2` of the embedding and every block output. High-norm = a patch token "
        "whose norm exceeds `norm_factor` (2) x the image's median patch norm; `high_norm_share_input` / "
        "`_output` = their share in block l's input / output. Per block l: `top5_overlap_high_norm_input` = "
        "share of its top-5% mu patch columns that are high-norm in its input (chance: "
        "`high_norm_share_input`); Spearman r between `mu_l[j]` and the input norm over patch tokens, mean over "
        "the images where both vary."),
    "resolution": Definition(
        "resolution", "image size",
        "A ViT runs at any `img_size` that is a whole number of patches; its absolute position embedding is "
        "resampled once, at load time, exactly as timm does for a model created at that size (bicubic, "
        "antialiased, prefix entries kept)."),
    "attention_distance": Definition(
        "attention-distance", "mean attention distance, prefix mass",
        "Per image, head h and block l: `sum_j A[h,i,j] ||pos_i - pos_j||` over the patch keys j (positions = "
        "token centres in input pixels; Swin: the stage's grid, true positions in shifted windows), averaged over "
        "the patch queries i (all of them, or the central region's: `_central`), then over images; also divided "
        "by the image side (`_rel`). Default (published code): prefix keys add no distance, rows are not "
        "renormalised; `renormalize=True`: each row divided by its patch-key mass (rows below 1e-6 skipped and "
        "counted). Prefix mass = the attention on prefix keys, same averages. Uniform reference: the same for "
        "rows uniform over their patch keys."),
    "attention_entropy": Definition(
        "attention-distance", "attention entropy",
        "`-sum_j A[h,i,j] log A[h,i,j]` (0 log 0 = 0) over every key of a row (ViT: prefix keys included; Swin: "
        "the window's keys), in nats, averaged over the patch queries and images; `entropy_norm` = divided by "
        "`log N` (N = keys per row)."),
    "rf_distance": Definition(
        "attention-distance", "receptive-field distances, uniform references",
        "From a receptive field M (mean over images) around the centre c of its central region: mass-weighted "
        "distance `sum_x M(x) ||x - c|| / sum_x M(x)` over the pixel centres x (comparable to an attention "
        "distance), next to the ring-mean radius and S. Per block: at its attention sub-stage `attn` (before the "
        "residual add) and at its output. Uniform reference: the same measure of M = 1."),
}

_BLOCK = re.compile(r"<!-- science:(?P<key>[a-z_]+)\b[^\n]*-->\n.*?<!-- /science:(?P=key) -->", re.S)
_ANCHOR = re.compile(r'<a id="(?P<id>[a-z0-9-]+)"></a>')


def definition(key: str) -> Definition:
    if key not in DEFINITIONS:
        raise KeyError(f"no definition {key!r}; known: {', '.join(DEFINITIONS)}")
    return DEFINITIONS[key]


def version() -> str:
    from vitsparse_jax import __version__
    return __version__


def report_block(keys: Sequence[str]) -> list[str]:
    """Markdown lines of a report's "Definitions" section: each quantity it shows, with its section."""
    lines = ["## Definitions", "",
             f"Computed by vitsparse_jax {version()}. Each entry is the short form of the section of `{DOC}` "
             "(in the vitsparse_jax repository) named beside it, which gives the details and the choices behind "
             "it.", ""]
    for key in dict.fromkeys(keys):
        d = definition(key)
        lines.append(f"- **{d.title}** (`{DOC}#{d.anchor}`): {d.text}")
    return lines + [""]


def doc_block(key: str) -> str:
    """The marked block of one definition in docs/science.md."""
    d = definition(key)
    body = f"**{d.title}.** {d.text}"   # one line: a wrapped formula could start a markdown list
    return (f"<!-- science:{key} (written by `python -m vitsparse_jax.science --write {DOC}` from "
            f"vitsparse_jax/science.py: edit it there) -->\n{body}\n<!-- /science:{key} -->")


def update_doc(text: str) -> str:
    """`text` (docs/science.md) with every marked block rewritten from DEFINITIONS.

    Every definition must have exactly one block, inside the section of its anchor; anything else is a
    ValueError that says what to add or move."""
    seen: list[str] = []

    def fill(m: re.Match) -> str:
        key = m["key"]
        d = definition(key)
        anchors = _ANCHOR.findall(text, 0, m.start())
        if not anchors or anchors[-1] != d.anchor:
            raise ValueError(f"{DOC}: the block of {key!r} lies in section "
                             f"#{anchors[-1] if anchors else '(none)'}; move it into #{d.anchor}")
        seen.append(key)
        return doc_block(key)

    out = _BLOCK.sub(fill, text)
    twice = sorted({k for k in seen if seen.count(k) > 1})
    missing = [k for k in DEFINITIONS if k not in seen]
    if twice or missing:
        raise ValueError(f"{DOC}: " + "; ".join(
            ([f"blocks repeated: {', '.join(twice)}"] if twice else [])
            + ([f"no block for {', '.join(missing)}: add '<!-- science:KEY -->' and '<!-- /science:KEY -->' "
                f"lines in the section of its anchor"] if missing else [])))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitsparse_jax.science", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="PATH", help=f"rewrite the definition blocks of PATH (e.g. {DOC})")
    mode.add_argument("--check", metavar="PATH", help="exit 1 when PATH's blocks differ from this module")
    args = parser.parse_args(argv)
    path = Path(args.write or args.check)
    try:
        text = path.read_text(encoding="utf-8")
        new = update_doc(text)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{path} differs from vitsparse_jax/science.py: run python -m vitsparse_jax.science --write {path}",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
