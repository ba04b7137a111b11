// Sparsity explorer (vitsparse_jax/experiments/sparsity/explorer.py builds `data`). Runs with `data`, `vj`.
// Arrays (flat, C order): idx/val (I, L, H+1, N, K), pre (I, L, H+1, N, P), rest/mu (I, L, H+1, N),
// top (I, L, H+1, T), norms (I, L+1, N); head index H = the mean over heads; tokens: P prefix, then patches.
// data.distances (optional): each head's attention distance per block, drawn by explorer_distances.js.
var I = data.images.length, L = data.blocks.length, H1 = data.heads + 1, P = data.prefix;
var gh = data.grid[0], gw = data.grid[1], NP = gh * gw, N = P + NP, K = data.row_top_k, T = data.top_n;
var root = vj.$("sparsity-explorer");
var st = { image: 0, block: L - 1, head: H1 - 1, query: P + Math.floor(gh / 2) * gw + Math.floor(gw / 2),
           pinned: false };
var lut = new Float32Array(256);   // uint8 log-quantised values -> attention
for (var q = 1; q < 256; q++) lut[q] = Math.pow(10, data.log_floor * (1 - (q - 1) / 254));
var images = [];
var canvases = ["picture", "row", "col", "mu", "norm"].map(function (n) { return vj.$("sparsity-" + n); });
var dist = data.distances ? distancePanel(data.distances, vj, P, function (h) {
  st.head = h; vj.$("sparsity-head").value = String(h); render();
}) : null;

function base() { return (st.image * L + st.block) * H1 + st.head; }
function tokenName(t) {
  if (t < P) return data.prefix_kinds[t] + (P > 1 ? " (token " + t + ")" : "");
  var j = t - P;
  return "patch " + j + " (row " + Math.floor(j / gw) + ", col " + (j % gw) + ")";
}
function row(t) {   // the stored entries of query t's row
  var r = base() * N + t, vals = new Float32Array(NP).fill(NaN), pre = [];
  for (var k = 0; k < K; k++) {
    var v = data.val[r * K + k];
    vals[data.idx[r * K + k]] = v ? lut[v] : NaN;
  }
  for (var p = 0; p < P; p++) pre.push(data.pre[r * P + p]);
  return { patches: vals, prefix: pre, rest: data.rest[r] };
}
function column(t) {   // token t's column, rebuilt from the rows (patch columns: only top-K entries exist)
  var b = base() * N, vals = new Float32Array(N).fill(NaN);
  for (var r = 0; r < N; r++) {
    if (t < P) { vals[r] = data.pre[(b + r) * P + t]; continue; }
    for (var k = 0; k < K; k++) {
      var o = (b + r) * K + k;
      if (data.idx[o] === t - P) { if (data.val[o]) vals[r] = lut[data.val[o]]; break; }
    }
  }
  return vals;
}
function topColumns() {
  var o = base() * T;
  return Array.prototype.slice.call(data.top.subarray(o, o + T));
}
function maxOf(a) {
  var m = -Infinity, at = -1;
  for (var i = 0; i < a.length; i++) if (a[i] > m) { m = a[i]; at = i; }
  return [m, at];
}
// The colour options of the "colour" control: log10 over at least one decade below the maximum (near-equal
// values stay near the top colour instead of being stretched over the bar), log10 stretched from the minimum to
// the maximum, or linear from 0.
function colourOptions() {
  var scale = vj.$("sparsity-scale").value;
  if (scale === "linear") return { log: false, vmin: 0, what: "" };
  return scale === "stretch" ? { log: true, what: " (log colour, min to max)" }
                             : { log: true, minDecades: 1, what: " (log colour)" };
}
function draw(name, values, label) {
  var c = vj.$("sparsity-" + name), o = colourOptions(), cell = vj.fitCanvas(c, gh, gw);
  var r = vj.drawHeatmap(c, values, gh, gw, { image: images[st.image], log: o.log, vmin: o.vmin,
    minDecades: o.minDecades, cmap: "magma", alpha: +vj.$("sparsity-opacity").value / 100 });
  var lw = cell < 8 ? 1 : 2;
  if (vj.$("sparsity-show-top").checked) vj.outlineCells(c, topColumns(), gh, gw, "#38d9ff", lw);
  if (st.query >= P) vj.outlineCells(c, [st.query - P], gh, gw, "#ffffff", lw + 1, "#000000");
  vj.colorbar(vj.$("sparsity-" + name + "-cb"), "magma", r.vmin, r.vmax,
              label + o.what + (r.constant ? ": every value equal" : ""));
  root.dataset[name + "Range"] = r.vmin.toPrecision(6) + "," + r.vmax.toPrecision(6);
}
function drawPicture() {
  var c = vj.$("sparsity-picture"), cell = vj.fitCanvas(c, gh, gw);
  vj.drawImage(c, images[st.image]);
  if (st.query >= P) vj.outlineCells(c, [st.query - P], gh, gw, "#ffffff", cell < 8 ? 2 : 3, "#000000");
  vj.$("sparsity-grid-note").textContent = gh + "x" + gw + " patches, " + cell + " px per patch";
}
function render() {
  var rw = row(st.query), col = column(st.query), colPatches = col.subarray(P);
  var m = base() * N, mu = data.mu.subarray(m, m + N);
  vj.$("sparsity-opacity-value").textContent = vj.$("sparsity-opacity").value + "%";
  drawPicture();
  draw("row", rw.patches, "attention");
  draw("col", colPatches, "attention");
  var showMu = vj.$("sparsity-show-mu").checked;
  vj.$("sparsity-mu-panel").hidden = !showMu;
  if (showMu) draw("mu", mu.subarray(P), "mu");
  var showNorms = vj.$("sparsity-show-norms").checked && data.norms !== undefined;
  vj.$("sparsity-norm-panel").hidden = !showNorms;
  if (showNorms) {
    var n0 = (st.image * (L + 1) + st.block) * N;
    draw("norm", data.norms.subarray(n0 + P, n0 + N), "norm");
  }
  var best = maxOf(rw.patches), stored = 0;
  for (var i = 0; i < NP; i++) if (rw.patches[i] === rw.patches[i]) stored += rw.patches[i];
  var head = st.head === H1 - 1 ? "mean" : String(st.head);
  root.dataset.image = st.image; root.dataset.block = st.block; root.dataset.head = head;
  root.dataset.query = st.query; root.dataset.rowMax = best[0].toFixed(6); root.dataset.rowMaxPatch = best[1];
  vj.$("sparsity-readout").textContent = "image " + data.image_index[st.image] + " · " + data.blocks[st.block]
    + " · head " + head + " · query " + tokenName(st.query) + (st.pinned ? " [pinned]" : "")
    + " · row max " + vj.fmt(best[0]) + " at patch " + best[1] + " · stored patch entries hold \u2248"
    + vj.fmt(100 * Math.min(stored, 1)) + "% (rest " + vj.fmt(100 * rw.rest) + "%) · mu of this column "
    + vj.fmt(mu[st.query]);
  var showDist = vj.$("sparsity-show-dist").checked && dist !== null;
  vj.$("sparsity-dist-panel").hidden = !showDist;
  vj.$("sparsity-dist-readout").hidden = !showDist;
  if (showDist) dist.render(st.image, st.block, st.head === H1 - 1 ? -1 : st.head);
  var pre = vj.$("sparsity-prefix");
  pre.hidden = !vj.$("sparsity-show-prefix").checked;
  if (P === 0) { pre.textContent = "this model has no prefix tokens"; return; }
  var parts = [];
  for (var p = 0; p < P; p++) {
    parts.push(data.prefix_kinds[p] + ": mu " + vj.fmt(mu[p]) + ", the query gives it " + vj.fmt(rw.prefix[p])
      + ", it gives the query " + (col[p] === col[p] ? vj.fmt(col[p]) : "< row top-" + K));
  }
  var mass = 0;
  for (p = 0; p < P; p++) mass += mu[p];
  pre.textContent = "prefix-token mass (mean attention on prefix columns) " + vj.fmt(mass) + " · "
    + parts.join(" · ");
  if (showNorms) {
    var n1 = (st.image * (L + 1) + st.block) * N, np = [];
    for (p = 0; p < P; p++) np.push(data.prefix_kinds[p] + " norm " + vj.fmt(data.norms[n1 + p]));
    pre.textContent += " · " + np.join(", ");
  }
}
function setBlock(l) {
  st.block = Math.max(0, Math.min(L - 1, l));
  vj.$("sparsity-block").value = String(st.block);
  render();
}

vj.$("sparsity-k").textContent = K < NP ? "Each row keeps its prefix-token entries and its " + K
  + " largest patch entries; uncoloured cells are not stored (smaller)." : "Every entry of every row is stored.";
vj.$("sparsity-top-pct").textContent = String(+(100 * data.top_fraction).toPrecision(3));
vj.options(vj.$("sparsity-image"), data.image_index.map(function (ix, i) {
  return [i, "#" + ix + (data.label[i] >= 0 ? " (label " + data.label[i] + ")" : "")];
}), 0);
vj.options(vj.$("sparsity-block"), data.blocks.map(function (b, l) { return [l, b]; }), st.block);
var heads = [[H1 - 1, "mean"]];
for (var h = 0; h < H1 - 1; h++) heads.push([h, String(h)]);
vj.options(vj.$("sparsity-head"), heads, st.head);
var qbox = vj.$("sparsity-queries");
if (P > 0) {
  qbox.appendChild(document.createTextNode("query a prefix token:"));
  for (var t = 0; t < P; t++) {
    var btn = document.createElement("button");
    btn.type = "button"; btn.id = "sparsity-query-" + t; btn.textContent = data.prefix_kinds[t];
    btn.dataset.token = String(t);
    btn.addEventListener("click", function (e) {
      st.query = +e.currentTarget.dataset.token; st.pinned = true; render();
    });
    qbox.appendChild(btn);
  }
}
vj.$("sparsity-image").addEventListener("change", function (e) { st.image = +e.target.value; render(); });
vj.$("sparsity-block").addEventListener("change", function (e) { setBlock(+e.target.value); });
vj.$("sparsity-head").addEventListener("change", function (e) { st.head = +e.target.value; render(); });
vj.$("sparsity-prev").addEventListener("click", function () { setBlock(st.block - 1); });
vj.$("sparsity-next").addEventListener("click", function () { setBlock(st.block + 1); });
["sparsity-scale", "sparsity-show-mu", "sparsity-show-top", "sparsity-show-norms", "sparsity-show-prefix",
 "sparsity-show-dist", "sparsity-dist-source"].forEach(function (id) { vj.$(id).addEventListener("change", render); });
vj.$("sparsity-opacity").addEventListener("input", render);
if (data.norms === undefined) vj.$("sparsity-show-norms").disabled = true;
if (dist === null) vj.$("sparsity-show-dist").disabled = true;
canvases.forEach(function (c) {
  c.addEventListener("mousemove", function (e) {
    var at = vj.patchAt(c, e, gh, gw);
    if (!st.pinned && at && at.index + P !== st.query) { st.query = at.index + P; render(); }
  });
  c.addEventListener("click", function (e) {
    var at = vj.patchAt(c, e, gh, gw);
    if (!at) return;
    st.pinned = !(st.pinned && st.query === at.index + P);
    st.query = at.index + P;
    render();
  });
});
vj.onArrows(root, function (step) { setBlock(st.block + step); });
return Promise.all(data.images.map(vj.loadImage)).then(function (ims) { images = ims; render(); });
