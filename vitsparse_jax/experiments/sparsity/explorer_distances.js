// Attention distance per head, the panel shared by explorer.js (ViT) and explorer_swin.js (explorer.py puts this
// file before either). distancePanel(d, vj, prefix, onHead) builds it once from d = data.distances
// (explorer.py `image_distances` + `run_distances`); panel.render(image, block, head) draws a block (head: the head
// shown in the other panels, -1 = the mean over heads); onHead(h) is called when a head's bars are clicked.
// d.image[key][i][b][h] (each example image), d.run[key][b][h] (the run's mean over d.run.images images), key:
// distance_px, distance_central_px, prefix_mass (null: no value, e.g. every row left out when renormalised);
// d.uniform[key][b]: the distances of a uniform map on the block's grid; d.heads[b], d.image_side[b].
// Bars: height = distance x (plot height / the axis maximum), one axis for every block and image of a source, so
// bars compare across blocks; prefix mass on its own 0..1 strip below.
function distancePanel(d, vj, prefix, onHead) {
  var NS = "http://www.w3.org/2000/svg", K = "sparsity-dist";
  var svg = vj.$(K), source = vj.$(K + "-source"), out = vj.$(K + "-readout");
  var SERIES = [["distance_px", "all", "#4c78a8", "all patch queries"],
                ["distance_central_px", "central", "#f58518", "central queries"]];
  var L = 46, R = 10, T = 10, PH = 160, XL = 18, SH = prefix > 0 ? 44 : 0, GAP = prefix > 0 ? 10 : 0, B = 4;

  function el(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(e);
    return e;
  }
  function values(src, key, image, b) { return src === "run" ? d.run[key][b] : d.image[key][image][b]; }
  function niceTop(x) {   // the axis maximum: a multiple of 1, 2, 2.5 or 5 x 10^k, about 4 ticks
    if (!(x > 0)) return { top: 1, step: 0.25 };
    var raw = x / 4, e = Math.pow(10, Math.floor(Math.log10(raw))), step = e * 10;
    [1, 2, 2.5, 5].some(function (m) { if (m * e >= raw) { step = m * e; return true; } return false; });
    return { top: Math.ceil(x / step - 1e-9) * step, step: step };
  }
  var axes = {};   // per source: one axis for every block (and image)
  function axis(src) {
    if (axes[src]) return axes[src];
    var top = 0;
    d.heads.forEach(function (h, b) {
      SERIES.forEach(function (s) {
        top = Math.max(top, d.uniform[s[0]][b]);
        var images = src === "run" ? [0] : d.image[s[0]].map(function (_, i) { return i; });
        images.forEach(function (i) {
          values(src, s[0], i, b).forEach(function (v) { if (v !== null && v > top) top = v; });
        });
      });
    });
    axes[src] = niceTop(top);
    return axes[src];
  }
  function mean(a) {
    var s = 0, n = 0;
    a.forEach(function (v) { if (v !== null) { s += v; n += 1; } });
    return n ? s / n : null;
  }
  function num(v, unit) { return v === null ? "n/a" : vj.fmt(v) + (unit || ""); }

  function render(image, block, head) {
    var src = source.value, H = d.heads[block], ax = axis(src), k = PH / ax.top, y0 = T + PH, h;
    var GW = Math.max(12, Math.min(32, Math.floor(560 / H))), BW = Math.floor((GW - 4) / 2);
    var PW = Math.max(H * GW, 240), W = L + PW + R, HT = T + PH + XL + GAP + SH + B, x0 = L + (PW - H * GW) / 2;
    svg.innerHTML = "";
    svg.setAttribute("width", W); svg.setAttribute("height", HT); svg.setAttribute("viewBox", "0 0 " + W + " " + HT);
    svg.dataset.block = block; svg.dataset.source = src; svg.dataset.image = image;
    if (head >= 0 && head < H) {   // the head of the other panels
      el("rect", { id: K + "-selected", x: x0 + head * GW, y: T, width: GW, height: PH + XL, fill: "#fff3bf" }, svg);
    }
    for (var i = 0, n = Math.round(ax.top / ax.step); i <= n; i++) {   // the distance axis
      var t = i * ax.step, y = y0 - t * k;
      el("line", { x1: L, x2: L + PW, y1: y, y2: y, stroke: t ? "#eceef2" : "#8a919c" }, svg);
      el("text", { x: L - 4, y: y + 4, "text-anchor": "end", "font-size": 11, "class": K + "-tick",
                   "data-value": t }, svg).textContent = vj.fmt(t);
    }
    el("text", { x: 12, y: T + PH / 2, "font-size": 11, "text-anchor": "middle",
                 transform: "rotate(-90 12 " + (T + PH / 2) + ")" }, svg).textContent = "distance (px)";
    SERIES.forEach(function (s, si) {
      var v = values(src, s[0], image, block);
      for (h = 0; h < H; h++) {
        var x = x0 + h * GW + 2 + si * BW;
        if (v[h] === null) continue;
        var bar = el("rect", { id: K + "-bar-" + s[1] + "-" + h, x: x, y: y0 - v[h] * k, width: BW,
          height: v[h] * k, fill: s[2], "data-head": h, "data-value": v[h], style: "cursor:pointer" }, svg);
        el("title", {}, bar).textContent = "head " + h + ", " + s[3] + ": " + num(v[h], " px") + " ("
          + vj.fmt(v[h] / d.image_side[block]) + " of the image side)";
      }
      var u = d.uniform[s[0]][block];   // the uniform map's distance: a dashed line across the plot
      el("line", { id: K + "-uniform-" + s[1], x1: L, x2: L + PW, y1: y0 - u * k, y2: y0 - u * k, stroke: s[2],
        "stroke-width": 1.5, "stroke-dasharray": "5 3", "data-value": u }, svg);
    });
    for (h = 0; h < H; h++) {
      el("text", { x: x0 + (h + 0.5) * GW, y: y0 + 13, "text-anchor": "middle", "font-size": 11, "data-head": h,
        style: "cursor:pointer", "font-weight": h === head ? 700 : 400 }, svg).textContent = String(h);
    }
    var pm = values(src, "prefix_mass", image, block);
    if (SH) {   // prefix mass per head, 0..1
      var s0 = T + PH + XL + GAP + SH;
      el("rect", { id: K + "-prefix-frame", x: L, y: s0 - SH, width: PW, height: SH, fill: "none",
                   stroke: "#c5cad3" }, svg);
      el("text", { x: L - 4, y: s0 - SH + 9, "text-anchor": "end", "font-size": 10 }, svg).textContent = "1";
      el("text", { x: L - 4, y: s0, "text-anchor": "end", "font-size": 10 }, svg).textContent = "0";
      el("text", { x: L + 4, y: s0 - SH + 11, "font-size": 10, fill: "#5b6472" }, svg).textContent = "prefix mass";
      for (h = 0; h < H; h++) {
        if (pm[h] === null) continue;
        var p = el("rect", { id: K + "-prefix-" + h, x: x0 + h * GW + 2, y: s0 - pm[h] * SH, width: 2 * BW,
          height: pm[h] * SH, fill: "#7f7f7f", "data-head": h, "data-value": pm[h] }, svg);
        el("title", {}, p).textContent = "head " + h + ": prefix mass " + num(pm[h]);
        if (GW >= 24) {   // room for the value above the bar
          el("text", { x: x0 + (h + 0.5) * GW, y: Math.max(s0 - pm[h] * SH - 2, s0 - SH + 20), "font-size": 9,
                       "text-anchor": "middle", fill: "#1d2330" }, svg).textContent = vj.fmt(pm[h], 2);
        }
      }
    }
    var all = values(src, "distance_px", image, block), cen = values(src, "distance_central_px", image, block);
    var what = src === "run" ? "mean over the run's " + d.run.images + " images" : "this image";
    var text = d.blocks[block] + " \u00b7 " + what + " \u00b7 mean over " + H + " heads: all patch queries "
      + num(mean(all), " px") + ", central " + num(mean(cen), " px") + " (uniform map: "
      + vj.fmt(d.uniform.distance_px[block]) + ", " + vj.fmt(d.uniform.distance_central_px[block]) + " px; image side "
      + d.image_side[block] + " px)" + (prefix > 0 ? " \u00b7 prefix mass " + num(mean(pm)) : "");
    if (head >= 0 && head < H) {
      text += " \u00b7 head " + head + ": " + num(all[head], " px") + ", " + num(cen[head], " px")
        + (prefix > 0 ? ", prefix mass " + num(pm[head]) : "");
    }
    out.textContent = text + (d.renormalize ? " \u00b7 rows renormalised to their patch mass" : "");
  }

  var items = d.run ? [["run", "mean over the run's " + d.run.images + " images"]] : [];
  vj.options(source, items.concat([["image", "this image"]]), d.run ? "run" : "image");
  vj.$(K + "-legend").innerHTML = SERIES.map(function (s) {
    return '<span style="color:' + s[2] + '">\u25a0</span> ' + s[3];
  }).join(" &nbsp; ") + " &nbsp; dashed: a uniform map" + (prefix > 0 ? " &nbsp; <span style=\"color:#7f7f7f\">"
    + "\u25a0</span> attention on prefix tokens" : "") + ". Click a head's bars to show it.";
  svg.addEventListener("click", function (e) {
    var h = e.target.getAttribute && e.target.getAttribute("data-head");
    if (h !== null && h !== undefined) onHead(+h);
  });
  return { render: render, source: source };
}
