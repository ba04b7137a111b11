// Locality explorer (report.html; explorer.py builds `data`): runs as a function body with `data` and `vj` in scope.
// data.models[m]: name, family, image_size [H, W], map_size [h, w], pool (the maps are pool x pool means, so a map
//   pixel is `pool` input pixels), layers [{name, group, grid, central [r0, r1, c0, c1], centre_px [y, x]}],
//   blocks [{name, depth, attn (layer index of the attention sub-stage, null for a CNN stage), out (of the
//   output)}], variants (untrained first) [{label, trained, num_images, maps (L, h, w) uint8: 0 = below, else
//   M / map_max = 10^(-D (1 - (q - 1) / 254)), map_max, blocks [the block's row of locality.csv: heads,
//   attn_distance_central_px (+ _min, _max), attn_distance_px, prefix_mass, prefix_mass_central,
//   uniform_attn_distance_central_px, rf_attn_mass_distance_px, rf_out_mass_distance_px,
//   uniform_rf_mass_distance_px, rf_attn_S, rf_out_S; null = none]}]; data.log_decades: D.
// Each map has an overlay canvas (#locality-over-<v>) with the central region (cyan), the attention circle (white,
// solid), the receptive field's mass-weighted distance (green, dashed) and, on request, both uniform-map values
// (dotted), all centred on the central region's centre; canvas px per input px = canvas width / (w x pool).
var $ = vj.$, K = "locality", D = data.log_decades;
var el = { model: $(K + "-model"), block: $(K + "-block"), layer: $(K + "-layer"), label: $(K + "-label"),
  scale: $(K + "-scale"), colour: $(K + "-colour"), maps: $(K + "-maps"), note: $(K + "-note"),
  attn: $(K + "-show-attn"), rf: $(K + "-show-rf"), uniform: $(K + "-show-uniform"), root: $(K + "-explorer") };
var ATTN = "#ffffff", RF = "#a3e635", REGION = "#00e5ff";
var state = { model: 0, block: 0, which: "attn" };   // which: the attention sub-stage, or the block output
var LUT = new Float32Array(256);   // q -> M / max M
for (var q = 1; q < 256; q++) LUT[q] = Math.pow(10, -D * (1 - (q - 1) / 254));

function model() { return data.models[state.model]; }
function layerIndex() {   // the layer shown: the block's attention sub-stage when chosen and there, else its output
  var b = model().blocks[state.block];
  return state.which === "attn" && b.attn !== null ? b.attn : b.out;
}
function mapValues(m, v, l) {   // the layer's map as M values (flat h*w; 0 below 10^-D of its max)
  var n = m.map_size[0] * m.map_size[1], q = m.variants[v].maps, top = m.variants[v].map_max[l];
  var out = new Float32Array(n);
  for (var i = 0; i < n; i++) out[i] = LUT[q[l * n + i]] * top;
  return out;
}
function fmt(v, unit) { return v === null || v === undefined ? "n/a" : vj.fmt(v) + (unit || ""); }

function buildPanels(m) {
  el.maps.innerHTML = "";
  m.variants.forEach(function (vr, v) {
    var p = document.createElement("div");
    p.className = "vj-panel";
    p.innerHTML = '<h3 id="' + K + "-title-" + v + '"></h3><div style="position:relative;line-height:0">'
      + '<canvas id="' + K + "-map-" + v + '" width="320" height="320" style="display:block"></canvas>'
      + '<canvas id="' + K + "-over-" + v + '" width="320" height="320" style="display:block;position:absolute;'
      + 'left:0;top:0;pointer-events:none;border-color:transparent"></canvas></div>'
      + '<div class="vj-colorbar" id="' + K + "-cb-" + v + '"></div><div class="vj-readout" id="' + K + "-readout-"
      + v + '"></div><div class="vj-readout" id="' + K + "-hover-" + v + '"></div>';
    el.maps.appendChild(p);
    $(K + "-title-" + v).textContent = vr.label + ", " + vr.num_images + (vr.num_images === 1 ? " image" : " images");
    $(K + "-map-" + v).addEventListener("mousemove", function (e) {   // M and the distance to the centre
      var at = vj.patchAt(e.target, e, m.map_size[0], m.map_size[1]);
      if (!at) return;
      var c = m.layers[layerIndex()].centre_px, y = (at.row + 0.5) * m.pool, x = (at.col + 0.5) * m.pool;
      $(K + "-hover-" + v).textContent = "M \u2248 " + vj.fmt(mapValues(m, v, layerIndex())[at.index])
        + " at pixel (" + Math.floor(y) + ", " + Math.floor(x) + "), " + vj.fmt(Math.hypot(y - c[0], x - c[1]))
        + " px from the centre";
    });
  });
}

function circle(ctx, x, y, r, colour, width, dash, halo) {   // a circle (with a dark halo under it)
  if (!(r > 0)) return;
  (halo ? [["rgba(0,0,0,0.7)", width + 2], [colour, width]] : [[colour, width]]).forEach(function (s) {
    ctx.save();
    ctx.strokeStyle = s[0]; ctx.lineWidth = s[1]; ctx.setLineDash(dash);
    ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.stroke();
    ctx.restore();
  });
}
// The overlay of variant v: what the map's numbers say, in canvas pixels (s = canvas px per input px).
function drawOverlay(m, v, c) {
  var over = $(K + "-over-" + v), l = layerIndex(), layer = m.layers[l], row = m.variants[v].blocks[state.block];
  over.width = c.width; over.height = c.height;
  over.style.width = c.style.width; over.style.height = c.style.height;
  var ctx = over.getContext("2d"), s = c.width / (m.map_size[1] * m.pool), g = layer.grid, r = layer.central;
  var cy = layer.centre_px[0] * s, cx = layer.centre_px[1] * s;
  var py = m.image_size[0] / g[0] * s, px = m.image_size[1] / g[1] * s;   // canvas px per grid cell
  var mass = l === m.blocks[state.block].attn ? row.rf_attn_mass_distance_px : row.rf_out_mass_distance_px;
  var drawn = {};
  ctx.clearRect(0, 0, over.width, over.height);
  ctx.save();
  ctx.strokeStyle = REGION; ctx.lineWidth = 2;
  ctx.strokeRect(r[2] * px, r[0] * py, (r[3] - r[2]) * px, (r[1] - r[0]) * py);
  ctx.fillStyle = REGION;
  ctx.beginPath(); ctx.arc(cx, cy, 3, 0, 2 * Math.PI); ctx.fill();
  ctx.restore();
  if (el.uniform.checked) {
    var u = row.uniform_attn_distance_central_px;
    if (u !== null) circle(ctx, cx, cy, u * s, ATTN, 1, [2, 3], false);
    circle(ctx, cx, cy, row.uniform_rf_mass_distance_px * s, RF, 1, [2, 3], false);
  }
  if (el.rf.checked && mass !== null) {
    circle(ctx, cx, cy, mass * s, RF, 2, [8, 5], true);
    drawn.rf = mass * s;
  }
  if (el.attn.checked && row.attn_distance_central_px !== null) {
    circle(ctx, cx, cy, row.attn_distance_central_px * s, ATTN, 2, [], true);
    drawn.attn = row.attn_distance_central_px * s;
  }
  over.dataset.centre = cx.toFixed(3) + "," + cy.toFixed(3);
  over.dataset.attnRadius = drawn.attn === undefined ? "" : drawn.attn.toFixed(3);
  over.dataset.rfRadius = drawn.rf === undefined ? "" : drawn.rf.toFixed(3);
  return mass;
}

function render() {
  var m = model(), b = m.blocks[state.block], l = layerIndex(), h = m.map_size[0], w = m.map_size[1];
  var log = el.colour.value === "log", shared = el.scale.value === "shared";
  el.block.value = String(state.block);
  vj.options(el.layer, b.attn === null ? [["out", "stage output"]]
    : [["attn", "attention sub-stage (before its residual)"], ["out", "block output"]], l === b.attn ? "attn" : "out");
  el.layer.disabled = b.attn === null;
  el.label.textContent = m.layers[l].name + " \u00b7 relative depth " + vj.fmt(b.depth) + " \u00b7 block "
    + (state.block + 1) + " of " + m.blocks.length;
  el.root.dataset.layer = m.layers[l].name;
  var top = 0;
  m.variants.forEach(function (vr) { top = Math.max(top, vr.map_max[l]); });
  m.variants.forEach(function (vr, v) {
    var c = $(K + "-map-" + v), vmax = (shared ? top : vr.map_max[l]) || 1, lo = vmax * Math.pow(10, -D);
    var values = mapValues(m, v, l);
    vj.fitCanvas(c, h, w);
    if (log) for (var i = 0; i < values.length; i++) values[i] = Math.max(values[i], lo);   // below: bottom colour
    vj.drawHeatmap(c, values, h, w, log ? { cmap: "magma", log: true, vmin: Math.log10(lo), vmax: Math.log10(vmax) }
                                        : { cmap: "magma", vmin: 0, vmax: vmax });
    var mass = drawOverlay(m, v, c), row = vr.blocks[state.block];
    vj.colorbar($(K + "-cb-" + v), "magma", log ? lo : 0, vmax, "M (" + (log ? "log10, " : "")
      + (shared ? "shared" : "this map") + (m.pool > 1 ? ", " + m.pool + "\u00d7" + m.pool + " means" : "") + ")");
    var where = l === b.attn ? "the attention sub-stage" : (b.attn === null ? "the stage output" : "the block output");
    var attn = row.attn_distance_central_px === null ? "no attention (a CNN stage)"
      : "attention distance (central queries): " + fmt(row.attn_distance_central_px, " px") + ", heads "
        + fmt(row.attn_distance_central_px_min) + "\u2013" + fmt(row.attn_distance_central_px_max, " px")
        + ", uniform map " + fmt(row.uniform_attn_distance_central_px, " px") + "; prefix mass "
        + fmt(row.prefix_mass_central);
    var readout = $(K + "-readout-" + v);
    readout.style.maxWidth = $(K + "-hover-" + v).style.maxWidth = (c.width + 2) + "px";
    readout.style.whiteSpace = "pre-line";
    readout.textContent = attn + "\nreceptive field at " + where + ": mass-weighted distance " + fmt(mass, " px")
      + ", uniform map " + fmt(row.uniform_rf_mass_distance_px, " px") + "; S "
      + fmt(l === b.attn ? row.rf_attn_S : row.rf_out_S, " px");
  });
}

function setBlock(i) {
  state.block = Math.max(0, Math.min(model().blocks.length - 1, i));
  render();
}
function setModel(i) {
  var m = data.models[i], attention = m.blocks.some(function (b) { return b.attn !== null; });
  state.model = i;
  el.block.max = String(m.blocks.length - 1);
  state.block = Math.floor((m.blocks.length - 1) / 2);   // the middle block
  buildPanels(m);
  el.note.textContent = "Mean |\u2202 sum(Y_central) / \u2202x| over the images, summed over colour channels, "
    + "and on it, around the centre of the central region (cyan): "
    + (attention ? "solid, the block's mean attention distance of the central queries (mean over heads), in input "
      + "pixels; " : "no attention distance (a CNN); ")
    + "dashed, the receptive field's mass-weighted distance of the map shown; dotted (on request), the value of "
    + "each for a uniform map on the same grid. The attention distance is one block's attention alone; the "
    + "receptive field is cumulative over the blocks below and includes the residual path (docs/science.md"
    + "#attention-distance)." + (data.renormalize ? " Attention rows renormalised to their patch mass." : "")
    + " Shown " + m.map_size[0] + "\u00d7" + m.map_size[1] + (m.pool > 1 ? " (" + m.pool + "\u00d7" + m.pool
    + " average-pooled from " + m.image_size[0] + "\u00d7" + m.image_size[1] + ")" : "") + ", stored on a log "
    + "scale (255 levels over " + D + " decades below each map's max); the numbers are the run's (locality.csv).";
  render();
}

vj.options(el.model, data.models.map(function (m, i) { return [i, m.name]; }), 0);
$(K + "-model-box").hidden = data.models.length < 2;
el.model.addEventListener("change", function () { setModel(+el.model.value); });
el.block.addEventListener("input", function () { setBlock(+el.block.value); });
el.layer.addEventListener("change", function () { state.which = el.layer.value; render(); });
[el.scale, el.colour, el.attn, el.rf, el.uniform].forEach(function (c) { c.addEventListener("change", render); });
vj.onArrows(el.root, function (step) { setBlock(state.block + step); });
setModel(0);
