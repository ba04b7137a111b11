// Receptive-field explorer (report.html): runs as a function body with `data` (decoded) and `vj` in scope.
// data.models[m]: name, image_size [H, W], map_size [h, w], pool, layers [{name, group, depth, grid, central,
//   centre_px}], variants (untrained first) [{label, trained, num_images, S, mean_radius, max_M, maps (L, h, w)
//   uint8: 0 = below, else M / map_max = 10^(-D (1 - (q - 1) / 254)), map_max}]; data.log_decades: D;
//   data.scale: the run's map_scale ('per_map' | 'shared'), the initial colour scale.
// The slider steps through the layers' depths (a ViT block: its position); the sub-stage control picks one of the
// layers at that depth (attn, attn_res, mlp, mlp_res); the chosen sub-stage is kept while the slider moves.
var $ = vj.$, K = "rf", SVG = "http://www.w3.org/2000/svg", D = data.log_decades;
var el = { model: $(K + "-model"), layer: $(K + "-layer"), stage: $(K + "-stage"), label: $(K + "-layer-label"),
  scale: $(K + "-scale"), colour: $(K + "-colour"), maps: $(K + "-maps"), curves: $(K + "-curves"),
  note: $(K + "-note"), root: $(K + "-explorer") };
var METRICS = [["S", "S = \u03a3 r E_r / max M (px)"], ["mean_radius", "mean radius (px)"]];
var COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
var state = { model: 0, layer: 0, group: "attn" };   // group: the sub-stage kept while the slider moves
var steps = [];   // per slider position: the indices of the model's layers at that depth, forward order

function model() { return data.models[state.model]; }
function stepsOf(m) {   // layers grouped by depth, in order of first appearance
  var out = [], at = {};
  m.layers.forEach(function (l, i) {
    var key = String(l.depth);
    if (!(key in at)) { at[key] = out.length; out.push([]); }
    out[at[key]].push(i);
  });
  return out;
}
function stepOf(i) {
  for (var s = 0; s < steps.length; s++) if (steps[s].indexOf(i) >= 0) return s;
  return 0;
}
function firstLayer(m) {   // the attention sub-stage of the middle block (else the layer nearest depth 0.5)
  var best = -1, pool = m.layers.some(function (l) { return l.group === "attn"; });
  m.layers.forEach(function (l, i) {
    if (pool && l.group !== "attn") return;
    if (best < 0 || Math.abs(l.depth - 0.5) < Math.abs(m.layers[best].depth - 0.5)) best = i;
  });
  return Math.max(best, 0);
}
function groups(m) {
  var out = [];
  m.layers.forEach(function (l) { if (out.indexOf(l.group) < 0) out.push(l.group); });
  return out;
}
var LUT = new Float32Array(256);   // q -> M / max M
for (var q = 1; q < 256; q++) LUT[q] = Math.pow(10, -D * (1 - (q - 1) / 254));
function mapValues(m, v, l) {   // the layer's map as M values (flat h*w; 0 below 10^-D of its max)
  var h = m.map_size[0], w = m.map_size[1], n = h * w, q = m.variants[v].maps, out = new Float32Array(n);
  var top = m.variants[v].map_max[l];
  for (var i = 0; i < n; i++) out[i] = LUT[q[l * n + i]] * top;
  return out;
}
function vmax(m, v, l) {
  var mode = el.scale.value;
  if (mode === "per_map") return m.variants[v].map_max[l];
  var top = 0;
  m.variants.forEach(function (vr) {
    if (mode === "shared_layer") top = Math.max(top, vr.map_max[l]);
    else vr.map_max.forEach(function (x) { top = Math.max(top, x); });
  });
  return top;
}

function buildPanels(m) {
  el.maps.innerHTML = "";
  m.variants.forEach(function (vr, v) {
    var p = document.createElement("div");
    p.className = "vj-panel";
    p.innerHTML = '<h3 id="' + K + "-title-" + v + '"></h3><canvas id="' + K + "-map-" + v
      + '" width="320" height="320"></canvas><div class="vj-colorbar" id="' + K + "-cb-" + v + '"></div>'
      + '<div class="vj-readout" id="' + K + "-readout-" + v + '"></div><div class="vj-readout" id="' + K
      + "-hover-" + v + '"></div>';
    el.maps.appendChild(p);
    $(K + "-title-" + v).textContent = vr.label + ", " + vr.num_images + (vr.num_images === 1 ? " image" : " images");
    $(K + "-map-" + v).addEventListener("mousemove", function (e) {
      var at = vj.patchAt(e.target, e, m.map_size[0], m.map_size[1]);
      if (!at) return;
      var val = mapValues(m, v, state.layer)[at.index];
      var sy = m.image_size[0] / m.map_size[0], sx = m.image_size[1] / m.map_size[1];
      $(K + "-hover-" + v).textContent = "M \u2248 " + vj.fmt(val) + " at pixel (" + Math.floor((at.row + 0.5) * sy)
        + ", " + Math.floor((at.col + 0.5) * sx) + ")";
    });
  });
  el.curves.innerHTML = "";
  METRICS.forEach(function (metric) { el.curves.appendChild(curve(m, metric[0], metric[1])); });
}

function svg(tag, attrs, parent) {
  var e = document.createElementNS(SVG, tag);
  Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
  if (parent) parent.appendChild(e);
  return e;
}
// One metric against relative depth: a line per pathway and variant (untrained dashed), log y axis,
// the current layer marked on every variant's line (#rf-mark-<metric>-<v>) and by a vertical line.
function curve(m, metric, title) {
  var W = 460, H = 270, L = 52, R = 12, T = 22, B = 40, gs = groups(m);
  var box = document.createElement("div");
  box.className = "vj-panel";
  var s = svg("svg", { id: K + "-curve-" + metric, width: W, height: H, viewBox: "0 0 " + W + " " + H });
  box.appendChild(s);
  var lo = Infinity, hi = -Infinity;
  m.variants.forEach(function (vr) {
    vr[metric].forEach(function (x) { if (x > 0) { lo = Math.min(lo, x); hi = Math.max(hi, x); } });
  });
  if (!(lo <= hi)) { lo = 1; hi = 10; }
  var y0 = Math.floor(Math.log10(lo) * 4) / 4, y1 = Math.ceil(Math.log10(hi) * 4) / 4;
  if (y1 <= y0) y1 = y0 + 1;
  function X(d) { return L + d * (W - L - R); }
  function Y(x) { return T + (1 - (Math.log10(Math.max(x, lo)) - y0) / (y1 - y0)) * (H - T - B); }
  svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#c5cad3" }, s);
  for (var e = Math.ceil(y0); e <= Math.floor(y1); e++) {
    svg("line", { x1: L, x2: W - R, y1: Y(Math.pow(10, e)), y2: Y(Math.pow(10, e)), stroke: "#eceef2" }, s);
    svg("text", { x: L - 4, y: Y(Math.pow(10, e)) + 4, "text-anchor": "end", "font-size": 11 }, s).textContent =
      vj.fmt(Math.pow(10, e));
  }
  [0, 0.25, 0.5, 0.75, 1].forEach(function (d) {
    svg("text", { x: X(d), y: H - B + 14, "text-anchor": "middle", "font-size": 11 }, s).textContent = String(d);
  });
  svg("text", { x: X(0.5), y: H - 6, "text-anchor": "middle", "font-size": 12 }, s).textContent = "relative depth";
  svg("text", { x: L, y: 14, "font-size": 12, "font-weight": 600 }, s).textContent = title;
  svg("line", { id: K + "-vline-" + metric, y1: T, y2: H - B, stroke: "#2a62c9", "stroke-width": 1,
    "stroke-dasharray": "3 3" }, s);
  m.variants.forEach(function (vr, v) {
    gs.forEach(function (g, gi) {
      var pts = [];
      m.layers.forEach(function (l, i) {
        if (l.group === g) pts.push(X(l.depth).toFixed(1) + "," + Y(vr[metric][i]).toFixed(1));
      });
      svg("polyline", { points: pts.join(" "), fill: "none", stroke: COLOURS[gi % COLOURS.length],
        "stroke-width": 1.5, "stroke-dasharray": vr.trained ? "" : "5 3" }, s);
    });
    m.layers.forEach(function (l, i) {   // small clickable points: a click selects the layer
      var c = svg("circle", { cx: X(l.depth), cy: Y(vr[metric][i]), r: 2.5, "data-layer": i, style: "cursor:pointer",
        fill: COLOURS[gs.indexOf(l.group) % COLOURS.length] }, s);
      svg("title", {}, c).textContent = l.name + " (" + vr.label + "): " + vj.fmt(vr[metric][i]);
    });
  });
  m.variants.forEach(function (vr, v) {
    svg("circle", { id: K + "-mark-" + metric + "-" + v, r: 6, fill: "none", stroke: "#111", "stroke-width": 2 }, s);
  });
  var legend = document.createElement("div");
  legend.className = "vj-note";
  legend.innerHTML = gs.map(function (g, gi) {
    return '<span style="color:' + COLOURS[gi % COLOURS.length] + '">\u25a0</span> ' + g;
  }).join(" &nbsp; ") + (m.variants.length > 1 ? " &nbsp; (untrained dashed)" : "");
  box.appendChild(legend);
  s.addEventListener("click", function (e) {
    var i = e.target.getAttribute && e.target.getAttribute("data-layer");
    if (i !== null && i !== undefined) setLayer(+i);
  });
  return box;
}

function render() {
  var m = model(), l = state.layer, layer = m.layers[l], h = m.map_size[0], w = m.map_size[1];
  var step = stepOf(l), log = el.colour.value === "log";
  el.layer.value = String(step);
  vj.options(el.stage, steps[step].map(function (i) {   // the group, or the layer's name where groups repeat
    var g = m.layers[i].group, twice = steps[step].filter(function (j) { return m.layers[j].group === g; }).length > 1;
    return [i, twice ? m.layers[i].name : g];
  }), l);
  el.stage.disabled = steps[step].length < 2;
  el.label.textContent = layer.name + " \u00b7 " + layer.group + " \u00b7 relative depth " + vj.fmt(layer.depth)
    + " \u00b7 layer " + (l + 1) + " of " + m.layers.length;
  el.root.dataset.layer = layer.name;
  m.variants.forEach(function (vr, v) {
    var c = $(K + "-map-" + v), top = vmax(m, v, l) || 1, values = mapValues(m, v, l), lo = top * Math.pow(10, -D);
    if (log) for (var i = 0; i < values.length; i++) values[i] = Math.max(values[i], lo);   // below: bottom colour
    vj.drawHeatmap(c, values, h, w, log ? { cmap: "magma", log: true, vmin: Math.log10(lo), vmax: Math.log10(top) }
                                        : { cmap: "magma", vmin: 0, vmax: top });
    var g = layer.grid, r = layer.central, ctx = c.getContext("2d");   // central region (cyan) and its centre
    ctx.save();
    ctx.strokeStyle = "#00e5ff"; ctx.lineWidth = 2;
    ctx.strokeRect(r[2] / g[1] * c.width, r[0] / g[0] * c.height, (r[3] - r[2]) / g[1] * c.width,
      (r[1] - r[0]) / g[0] * c.height);
    ctx.fillStyle = "#00e5ff";
    ctx.beginPath();
    ctx.arc(layer.centre_px[1] / m.image_size[1] * c.width, layer.centre_px[0] / m.image_size[0] * c.height, 3, 0,
      2 * Math.PI);
    ctx.fill();
    ctx.restore();
    var pooled = m.pool > 1 ? ", " + m.pool + "\u00d7" + m.pool + " means" : "";
    vj.colorbar($(K + "-cb-" + v), "magma", log ? lo : 0, top, "M (" + (log ? "log10, " : "")
      + (el.scale.value === "per_map" ? "this map" : "shared") + pooled + ")");
    $(K + "-readout-" + v).textContent = "S = " + vj.fmt(vr.S[l]) + " px \u00b7 mean radius = "
      + vj.fmt(vr.mean_radius[l]) + " px \u00b7 max M = " + vj.fmt(vr.max_M[l]);
  });
  METRICS.forEach(function (metric) {
    var s = $(K + "-curve-" + metric[0]), vline = $(K + "-vline-" + metric[0]);
    var pts = s.querySelectorAll('circle[data-layer="' + l + '"]');   // one per variant, in variant order
    m.variants.forEach(function (vr, v) {
      var ref = pts[v], mark = $(K + "-mark-" + metric[0] + "-" + v);
      mark.setAttribute("cx", ref.getAttribute("cx"));
      mark.setAttribute("cy", ref.getAttribute("cy"));
      vline.setAttribute("x1", ref.getAttribute("cx"));
      vline.setAttribute("x2", ref.getAttribute("cx"));
    });
  });
}

function setLayer(i) {   // a layer (a curve's point, the sub-stage control): its group is kept from now on
  var n = model().layers.length;
  state.layer = Math.max(0, Math.min(n - 1, i));
  state.group = model().layers[state.layer].group;
  render();
}
function setStep(s) {   // a slider position: the layer there of the kept group, else its first layer
  var m = model(), at = steps[Math.max(0, Math.min(steps.length - 1, s))];
  var same = at.filter(function (i) { return m.layers[i].group === state.group; });
  state.layer = same.length ? same[0] : at[0];
  render();
}
function setModel(i) {
  var m = data.models[i];
  state.model = i;
  steps = stepsOf(m);
  el.layer.max = String(steps.length - 1);
  state.layer = firstLayer(m);
  state.group = m.layers[state.layer].group;
  buildPanels(m);
  el.note.textContent = "Mean |\u2202 sum(Y_central) / \u2202x| over the images, summed over colour channels; "
    + "cyan: the central region of the layer's grid and its centre. Shown " + m.map_size[0] + "\u00d7" + m.map_size[1]
    + (m.pool > 1 ? " (" + m.pool + "\u00d7" + m.pool + " average-pooled from " + m.image_size[0] + "\u00d7"
      + m.image_size[1] + ")" : "") + ", stored on a log scale (255 levels over " + D + " decades below each map's "
    + "max, within 2.3%); S and the mean radius are the run's values, from the full maps. The slider (or the arrow "
    + "keys) steps through depth and keeps the sub-stage; a point of a curve selects its layer.";
  render();
}

vj.options(el.model, data.models.map(function (m, i) { return [i, m.name]; }), 0);
$(K + "-model-box").hidden = data.models.length < 2;
el.scale.value = data.scale === "shared" ? "shared" : "per_map";
el.model.addEventListener("change", function () { setModel(+el.model.value); });
el.layer.addEventListener("input", function () { setStep(+el.layer.value); });
el.stage.addEventListener("change", function () { setLayer(+el.stage.value); });
el.scale.addEventListener("change", render);
el.colour.addEventListener("change", render);
vj.onArrows(el.root, function (step) { setStep(stepOf(state.layer) + step); });
setModel(0);
