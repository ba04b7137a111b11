"""Ablation metrics from per-image correctness rows: A0, A_t, A_r, psi with bootstrap intervals, and the
paper's tables (markdown), CSV rows, the sanity warnings and the report text (pure numpy, no devices);
`write_outputs` writes them all, with the figures, to the workdir.

Per-image rows (what the pass over the data accumulates, indexed by global image index):
  done  (T,)              the image was evaluated (False: padding never reaches here; unread images)
  clean (T,)              the clean prediction is right
  top   (T, Nn, P)        right with the top set dropped in the last n layers
  rand  (T, Nn, P, D)     right with random draw d dropped
  whole (T, Nn)           right with every candidate of the last n layers dropped (reference)
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from vitsparse_jax import science
from vitsparse_jax.experiments import sanity

log = logging.getLogger(__name__)
TRANSFORMERS = ("vit", "swin")
# docs/science.md definitions of each family's units (science.report_block)
UNIT_DEFINITIONS = {"vit": ("vit_units", "prefix_mass"), "swin": ("swin_units",), "vgg": ("cnn_units",),
                    "resnet": ("cnn_units",), "convnext": ("convnext_units",)}


def _quantiles(x: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0, without interpolating (bounds may be +-inf)."""
    alpha = (1.0 - confidence) / 2.0
    return np.quantile(x, alpha, axis=0, method="lower"), np.quantile(x, 1.0 - alpha, axis=0, method="higher")


def _psi(c0: np.ndarray, ct: np.ndarray, cr: np.ndarray, draws: int) -> np.ndarray:
    """psi = (A0 - A_t) / (A0 - A_r) from integer counts (correct images; cr summed over the draws), so that
    A0 == A_r gives exactly 0 in the denominator; +inf where the random drop costs nothing or helps."""
    num, den = draws * (c0 - ct), draws * c0 - cr
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.inf)


def _resample_counts(n: int, samples: int, seed: int, chunk: int = 64) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n images as (s, n) multiplicities (integers held in float64), in chunks."""
    rng = np.random.default_rng(seed)
    for start in range(0, samples, chunk):
        s = min(chunk, samples - start)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=s).astype(np.float64)


def summarize(rows: Mapping[str, np.ndarray], ps: Sequence[float], ns: Sequence[int], *,
              samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Accuracies, psi and bootstrap intervals over the evaluated images (see module docstring).

    Every sum is a count of correct predictions (an integer, exact in float64 whatever the order of the
    additions), so a cell where A0 == A_r has a denominator of exactly 0, never a rounding residue.
    """
    done = np.asarray(rows["done"], bool)
    used = int(done.sum())
    if used == 0:
        raise ValueError("no image was evaluated")
    rand_draws = rows["rand"][done].astype(np.float64)                             # (T, Nn, P, D)
    draws = rand_draws.shape[-1]
    clean = rows["clean"][done].astype(np.float64)                                 # (T,)
    top = rows["top"][done].astype(np.float64).reshape(used, -1)                   # (T, C), C = Nn * P
    rand = rand_draws.sum(-1).reshape(used, -1)                                    # (T, C), correct draws
    c0, ct, cr = clean.sum(), top.sum(0), rand.sum(0)

    b0, bt, br = [], [], []
    for w in _resample_counts(used, samples, seed):
        b0.append(w @ clean)
        bt.append(w @ top)
        br.append(w @ rand)
    b0, bt, br = np.concatenate(b0)[:, None], np.concatenate(bt), np.concatenate(br)
    psi_lo, psi_hi = _quantiles(_psi(b0, bt, br, draws), confidence)
    drop_lo, drop_hi = _quantiles((draws * b0 - br) / (used * draws), confidence)
    a0_lo, a0_hi = _quantiles(b0[:, 0] / used, confidence)          # each accuracy's own interval (the bands
    at_lo, at_hi = _quantiles(bt / used, confidence)                # of Figures 4a / 4b)
    ar_lo, ar_hi = _quantiles(br / (used * draws), confidence)
    psi = _psi(c0, ct, cr, draws)

    a0, at, ar = c0 / used, ct / used, cr / (used * draws)
    cells = []
    for c, (n, p) in enumerate((n, p) for n in ns for p in ps):
        i, j = divmod(c, len(ps))
        cells.append({
            "n": int(n), "p": float(p),
            "top_correct": int(ct[c]), "A_t": float(at[c]), "A_t_ci": [float(at_lo[c]), float(at_hi[c])],
            "rand_correct": [int(x) for x in rand_draws[:, i, j].sum(0)],
            "A_r_draws": [float(x) for x in rand_draws[:, i, j].mean(0)], "A_r": float(ar[c]),
            "A_r_ci": [float(ar_lo[c]), float(ar_hi[c])],
            "drop_t": float(a0 - at[c]), "drop_r": float(a0 - ar[c]),
            "drop_r_ci": [float(drop_lo[c]), float(drop_hi[c])],
            "psi": _finite(psi[c]), "psi_ci": [_finite(psi_lo[c]), _finite(psi_hi[c])],
            "unstable": bool(drop_lo[c] <= 0.0),   # A0 - A_r is not distinguishable from 0
        })
    out = {"images_used": used, "A0": float(a0), "A0_correct": int(c0), "A0_ci": [float(a0_lo), float(a0_hi)],
           "cells": cells,
           "bootstrap": {"samples": int(samples), "confidence": float(confidence), "seed": int(seed)}}
    if "whole" in rows:
        whole = rows["whole"][done]
        out["whole_layer"] = [{"n": int(n), "correct": int(whole[:, i].sum()), "acc": float(whole[:, i].mean())}
                              for i, n in enumerate(ns)]
    return out


def _finite(x: float) -> float | None:
    """JSON-safe: None for +-inf / nan (an interval that is unbounded on that side)."""
    return float(x) if math.isfinite(x) else None


# --- tables -------------------------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def psi_text(cell: Mapping[str, Any]) -> str:
    """psi for a table: the number, or 'n.s.' when A0 - A_r is within noise (flagged cell)."""
    if cell["unstable"] or cell["psi"] is None:
        return "n.s."
    return f"{cell['psi']:.2f}"


def _ci_text(ci: Sequence[float | None]) -> str:
    lo, hi = ("-∞" if ci[0] is None else f"{ci[0]:.2f}"), ("∞" if ci[1] is None else f"{ci[1]:.2f}")
    return f"[{lo}, {hi}]"


def _by_n(result: Mapping[str, Any]) -> dict[int, list[Mapping[str, Any]]]:
    out: dict[int, list] = {}
    for cell in result["cells"]:
        out.setdefault(cell["n"], []).append(cell)
    return out


def paper_table(results: Sequence[Mapping[str, Any]], title: str, confidence: float) -> str:
    """Table 1 / 2 layout: a row per (model, n); per p the cell 'A_t / A_r / psi' (accuracies in %)."""
    ps = results[0]["grid"]["p"]
    head = ["Model", "A0", "n"] + [f"p = {100 * p:g}%: A_t / A_r / ψ" for p in ps] + ["whole layer"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ci_lines = ["", f"ψ with its {100 * confidence:g}% bootstrap interval over images:", "",
                "| Model | n | " + " | ".join(f"p = {100 * p:g}%" for p in ps) + " |",
                "|---|---|" + "---|" * len(ps)]
    for r in results:
        whole = {w["n"]: w["acc"] for w in r.get("whole_layer", [])}
        for i, (n, cells) in enumerate(_by_n(r).items()):
            row = [r["label"] if i == 0 else "", _pct(r["A0"]) if i == 0 else "", str(n)]
            row += [f"{_pct(c['A_t'])} / {_pct(c['A_r'])} / {psi_text(c)}" for c in cells]
            row.append(_pct(whole.get(n)))
            lines.append("| " + " | ".join(row) + " |")
            ci_lines.append("| " + " | ".join([r["label"] if i == 0 else "", str(n)] + [
                f"{psi_text(c)} {_ci_text(c['psi_ci'])}" for c in cells]) + " |")
    return "\n".join(lines + ci_lines) + "\n"


def tables_name(results: Sequence[Mapping[str, Any]]) -> str:
    """'Table 1' (Transformers only), 'Table 2' (CNNs only) or 'Tables 1-2': the tables a run has."""
    has = [any(r["family"] in TRANSFORMERS for r in results), any(r["family"] not in TRANSFORMERS for r in results)]
    return "Tables 1-2" if all(has) else ("Table 1" if has[0] else "Table 2")


def ns_text(ns: Sequence[int]) -> str:
    """The n values of a grid as text: 'n = 2', 'n = 1, 3', 'n = 1..4' (consecutive, three or more)."""
    ns = [int(n) for n in ns]
    if len(ns) >= 3 and ns == list(range(ns[0], ns[0] + len(ns))):
        return f"n = {ns[0]}..{ns[-1]}"
    return "n = " + ", ".join(str(n) for n in ns)


def tables_markdown(results: Sequence[Mapping[str, Any]], confidence: float) -> str:
    """Table 1 (Transformers) and Table 2 (CNNs), each only when it has models."""
    parts = [f"# Ablation results (paper 1, {tables_name(results)})", "",
             "Accuracies in % (top-1). A_t: top-p units of the last n layers dropped; A_r: mean of the random "
             "draws; ψ = (A0 - A_t) / (A0 - A_r); 'n.s.': A0 - A_r is within noise (its bootstrap interval "
             "reaches 0), so ψ is not reported. 'whole layer': every candidate unit of the last n layers "
             "dropped.", ""]
    transformers = [r for r in results if r["family"] in TRANSFORMERS]
    cnns = [r for r in results if r["family"] not in TRANSFORMERS]
    if transformers:
        parts.append(paper_table(transformers, "Table 1: Transformer models", confidence))
    if cnns:
        parts.append(paper_table(cnns, "Table 2: CNN models", confidence))
    return "\n".join(parts)


def csv_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, n, p) cell."""
    rows = []
    for r in results:
        whole = {w["n"]: w["acc"] for w in r.get("whole_layer", [])}
        for c in r["cells"]:
            row = {"model": r["model"], "tag": r["tag"] or "", "family": r["family"], "n": c["n"], "p": c["p"],
                   "k": ";".join(str(k) for k in r["k"][str(c["p"])][-c["n"]:]),
                   "images": r["images_used"], "A0": r["A0"], "A_t": c["A_t"], "A_r": c["A_r"]}
            row.update({f"A_r_draw{d}": a for d, a in enumerate(c["A_r_draws"])})
            row.update({"psi": c["psi"], "psi_lo": c["psi_ci"][0], "psi_hi": c["psi_ci"][1],
                        "drop_r_lo": c["drop_r_ci"][0], "drop_r_hi": c["drop_r_ci"][1],
                        "unstable": c["unstable"], "whole_layer": whole.get(c["n"])})
            rows.append(row)
    return rows


# --- sanity warnings, report.md and the files of a run ------------------------------------------------------

def add_sanity(out: dict[str, Any]) -> list[str]:
    """Records each model's weight provenance (`provenance`) and the run's `warnings` in `out` (results.json)
    and logs the warnings: untrained / unknown weights, A0 at or below chance, a label space that is not the
    model's."""
    warnings: list[str] = []
    data_classes = int(out.get("data", {}).get("num_classes") or 0)
    for r in out["models"]:
        r["provenance"] = sanity.provenance(r)
        classes = int((r.get("pretrained_cfg") or {}).get("num_classes") or 0)
        warnings += sanity.weights_warnings(r["name"], r)
        warnings += sanity.chance_warning(r["name"], r["A0"], r["images_used"], classes)
        warnings += sanity.label_space_warning(r["name"], data_classes, classes)
    out["warnings"] = sanity.emit(warnings)
    return out["warnings"]


def _items(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value or ()]


def write_outputs(workdir: Any, out: dict[str, Any], config: Any, explorers: Sequence[Any] = ()) -> None:
    """results.json / .csv, tables.md, Figures 4a and 4b (PNG + PDF), report.md and report.html (the report,
    tables, figures and `explorers`, report_html.Explorer) of a run."""
    from vitsparse_jax.experiments.ablation import figures
    from vitsparse_jax.report_html import write_report_html

    results, ab = out["models"], config.ablation
    add_sanity(out)
    workdir.write_json("results.json", out)
    workdir.write_csv("results.csv", csv_rows(results))
    workdir.write_text("tables.md", tables_markdown(results, float(ab.confidence)))
    n_a = 2 if 2 in results[0]["grid"]["n"] else results[0]["grid"]["n"][-1]
    shown = figure_models(results, _items(ab.figure_models), "ablation.figure_models") or results
    workdir.figure("figure4a", figures.accuracy_vs_p, shown, n=n_a)
    focus = (figure_models(results, _items(ab.figure_b_model), "ablation.figure_b_model") or results)[:MAX_PANELS]
    workdir.figure("figure4b", figures.accuracy_vs_p_by_n, focus)
    names = [r["name"] for r in focus]
    text = report_text(out, n_a, names)
    workdir.write_text("report.md", text)
    bands = band_text(results)
    write_report_html(workdir, "Ablation report", text + "\n" + tables_markdown(results, float(ab.confidence)),
                      [("figure4a", f"accuracy vs p at n = {n_a}" + bands),
                       ("figure4b", f"{' and '.join(names)}: accuracy vs p at {ns_text(focus[0]['grid']['n'])}"
                                    + (", whole-layer reference dotted" if "whole_layer" in focus[0] else "")
                                    + bands)],
                      explorers)


MAX_PANELS = 4   # Figure 4b: at most this many models side by side (the first ones selected)


def selects(pattern: str, name: str) -> bool:
    """Whether a name given to select models (ablation.figure_models, figure_b_model) selects the model `name`
    (arch.tag as loaded): an arch selects every tag of it, arch.tag that one tag."""
    return pattern == name or ("." not in pattern and name.split(".", 1)[0] == pattern)


def figure_models(results: Sequence[Mapping[str, Any]], patterns: Sequence[str], field: str
                  ) -> list[Mapping[str, Any]]:
    """The results that `patterns` select, in the run's order ([] for no pattern). A pattern that selects none
    of them (one the config check could not rule out: a tag named where the model was listed without one) is
    said in the log, not skipped silently."""
    for pattern in patterns:
        if not any(selects(pattern, r["name"]) for r in results):
            log.warning("%s: %s selects none of the models measured (%s); the figure shows the others", field,
                        pattern, ", ".join(r["name"] for r in results))
    return [r for r in results if any(selects(p, r["name"]) for p in patterns)]


def band_text(results: Sequence[Mapping[str, Any]]) -> str:
    """The figures' caption for their error bars: what they are and their confidence level ('' without)."""
    from vitsparse_jax.experiments.ablation.figures import confidence

    level = confidence(results)
    if level is None:
        return ""
    samples = results[0]["bootstrap"]["samples"]
    return (f"; error bars: the {100 * level:g}% percentile bootstrap interval of each accuracy (A0 at p = 0, A_t, "
            f"A_r) over {samples} resamples of the images (the points of each p drawn a little apart so that their "
            "bars do not overlap). Every curve is measured on the same images, so overlapping bars do not mean "
            "equal accuracies: ψ's own interval is in the tables")


def report_text(out: dict[str, Any], n_a: int, focus: str | Sequence[str]) -> str:
    lines = ["# Ablation report (paper 1, section 5)", ""]
    source = out["data"]
    lines += [f"Data: {source.get('name')} ({source.get('identity')}), {source.get('num_images')} images"
              + (f", {source['num_classes']} classes" if source.get("num_classes") else "") + ".", ""]
    lines += sanity.markdown(out.get("warnings", ()))
    for r in out["models"]:
        g = r["grid"]
        unit = f", unit: {g['cnn_unit']}" if r["family"] in ("vgg", "resnet", "convnext") else ""
        sites = ", ".join(f"{s['site']} (U={s['units']})" for s in r["sites"])
        prov = r.get("provenance") or sanity.provenance(r)
        draws = f"{g['draws']} random draw{'s' if g['draws'] != 1 else ''}"
        lines.append(f"- **{r['name']}** ({r['family']}; weights: {prov['kind']}, {prov['detail']}): A0 = "
                     f"{100 * r['A0']:.2f}% on {r['images_used']} images ({r['images_skipped']} skipped); grid: "
                     f"p = {', '.join(f'{100 * p:g}' for p in g['p'])}% x {ns_text(g['n'])}, {draws}; "
                     f"ranking: {g['rank_by']}{unit}; renormalize={g['renormalize']}; ablation layers: {sites}")
    flagged = sum(c["unstable"] for r in out["models"] for c in r["cells"])
    focus = [focus] if isinstance(focus, str) else list(focus)                         # Figure 4b's models
    shown = next((r for r in out["models"] if r["name"] == focus[0]), out["models"][0])
    total = sum(len(r["cells"]) for r in out["models"])
    lines += ["", f"{flagged} of {total} cells flagged 'n.s.' (A0 - A_r within noise).", "",
              "Files: `report.html` (this report with the tables, figures and an explorer of the dropped units), "
              f"`tables.md` ({tables_name(out['models'])}), `results.json`, `results.csv`, "
              f"`figure4a.png/pdf` (accuracy vs p at n = {n_a}), `figure4b.png/pdf` ({' and '.join(focus)}, "
              f"{ns_text(shown['grid']['n'])}" + (", whole-layer reference dotted" if "whole_layer" in shown else "")
              + ")" + band_text(out["models"]) + ".", "", "Decisions:", ""]
    lines += [f"- {decision}" for decision in out["decisions"]]
    units = [k for r in out["models"] for k in UNIT_DEFINITIONS[r["family"]]]
    whole = ["whole_layer"] if any("whole_layer" in r for r in out["models"]) else []
    lines += ["", *science.report_block(["preprocessing", *units, "accuracies", "psi", *whole])]
    return "\n".join(lines) + "\n"
