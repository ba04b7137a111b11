// Sparsity explorer for Swin (vitsparse_jax/experiments/sparsity/explorer.py `encode_swin` builds `data`). Runs
// with `data`, `vj`. Per block b (data.swin[b]; its own grid gh x gw, heads Hb, nW windows of T tokens), flat C
// order: tokens (nW, T) = the raster token of each window position (the model's mapping, cyclic shift undone);
// val (I, Hb+1, nW, T, k) log-quantised row entries, with idx (same shape: window positions) and rest
// (I, Hb+1, nW, T) when k < T (else position = entry); mu (I, Hb+1, gh*gw); top (I, Hb+1, top_n).
// Head index Hb = the mean over heads. Rows and columns live within one window: a query only sees its window.
// data.distances (optional): each head's attention distance per block, drawn by explorer_distances.js.
var I = data.images.length, L = data.blocks.length, S = data.swin;
var root = vj.$("sparsity-explorer");
var st = { image: 0, block: L - 1, head: -1, qy: 0.5, qx: 0.5, pinned: false };   // head -1 = mean
var lut = new Float32Array(256);   // uint8 log-quantised values -> attention
for (var q = 1; q < 256; q++) lut[q] = Math.pow(10, data.log_floor * (1 - (q - 1) / 254));
var images = [];
var canvases = ["picture", "row", "col", "mu"].map(function (n) { return vj.$("sparsity-" + n); });
var dist = data.distances ? distancePanel(data.distances, vj, 0, function (h) {
  st.head = h; vj.$("sparsity-head").value = String(h); render();
}) : null;
var where = S.map(function (b) {   // raster token -> window * T + position (the inverse of `tokens`)
  var inv = new Int32Array(b.grid[0] * b.grid[1]);
  for (var r = 0; r < b.tokens.length; r++) inv[b.tokens[r]] = r;
  return inv;
});

function blk() { return S[st.block]; }
function headIndex() { var b = blk(); return st.head < 0 ? b.heads : Math.min(st.head, b.heads - 1); }
function query() {   // the query token on this block's grid: the cell under the remembered image position
  var b = blk(), gh = b.grid[0], gw = b.grid[1];
  return Math.min(gh - 1, Math.floor(st.qy * gh)) * gw + Math.min(gw - 1, Math.floor(st.qx * gw));
}
function windowOf(t) {   // the window holding token t, t's position in it, tokens per window
  var b = blk(), r = where[st.block][t], T = b.tokens.length / b.windows;
  return { w: Math.floor(r / T), pos: r % T, T: T };
}
function rowBase(w, T) { var b = blk(); return ((st.image * (b.heads + 1) + headIndex()) * b.windows + w) * T; }
function entry(r, pos) {   // stored value of row r (a flat row number) at window position pos; NaN: not stored
  var b = blk(), K = b.k, T = b.tokens.length / b.windows;
  if (K >= T) { var v = b.val[r * T + pos]; return v ? lut[v] : NaN; }
  for (var k = 0; k < K; k++) if (b.idx[r * K + k] === pos) return b.val[r * K + k] ? lut[b.val[r * K + k]] : NaN;
  return NaN;
}
function tokenName(t) {
  var gw = blk().grid[1];
  return "token " + t + " (row " + Math.floor(t / gw) + ", col " + (t % gw) + ")";
}
function row(t) {   // query t's row over the block's grid (only its window's tokens can hold values)
  var b = blk(), at = windowOf(t), r = rowBase(at.w, at.T) + at.pos;
  var vals = new Float32Array(b.grid[0] * b.grid[1]).fill(NaN);
  for (var p = 0; p < at.T; p++) vals[b.tokens[at.w * at.T + p]] = entry(r, p);
  return { values: vals, rest: b.k >= at.T ? 0 : b.rest[r] };
}
function column(t) {   // token t's column: the queries of its window, rebuilt from their rows
  var b = blk(), at = windowOf(t), r0 = rowBase(at.w, at.T);
  var vals = new Float32Array(b.grid[0] * b.grid[1]).fill(NaN);
  for (var p = 0; p < at.T; p++) vals[b.tokens[at.w * at.T + p]] = entry(r0 + p, at.pos);
  return vals;
}
function windowMask(w) {
  var b = blk(), T = b.tokens.length / b.windows, m = new Uint8Array(b.grid[0] * b.grid[1]);
  for (var p = 0; p < T; p++) m[b.tokens[w * T + p]] = 1;
  return m;
}
function outlineRegion(c, mask, gh, gw, colour) {   // the border of a set of cells (a wrapped window: pieces)
  var ctx = c.getContext("2d"), cw = c.width / gw, ch = c.height / gh;
  ctx.save(); ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.beginPath();
  for (var i = 0; i < mask.length; i++) {
    if (!mask[i]) continue;
    var y = Math.floor(i / gw), x = i % gw, x0 = x * cw, y0 = y * ch;
    if (y === 0 || !mask[i - gw]) { ctx.moveTo(x0, y0 + 1); ctx.lineTo(x0 + cw, y0 + 1); }
    if (y === gh - 1 || !mask[i + gw]) { ctx.moveTo(x0, y0 + ch - 1); ctx.lineTo(x0 + cw, y0 + ch - 1); }
    if (x === 0 || !mask[i - 1]) { ctx.moveTo(x0 + 1, y0); ctx.lineTo(x0 + 1, y0 + ch); }
    if (x === gw - 1 || !mask[i + 1]) { ctx.moveTo(x0 + cw - 1, y0); ctx.lineTo(x0 + cw - 1, y0 + ch); }
  }
  ctx.stroke(); ctx.restore();
}
function topColumns() {
  var b = blk(), o = (st.image * (b.heads + 1) + headIndex()) * b.top_n;
  return Array.prototype.slice.call(b.top.subarray(o, o + b.top_n));
}
function maxOf(a) {
  var m = -Infinity, at = -1;
  for (var i = 0; i < a.length; i++) if (a[i] > m) { m = a[i]; at = i; }
  return [m, at];
}
// The "colour" control (as explorer.js): log10 over at least one decade below the maximum, so that a window of
// near-equal values (an untrained model's later stages) shows near the top colour, not stretched over the bar;
// log10 from the minimum to the maximum; or linear from 0.
function colourOptions() {
  var scale = vj.$("sparsity-scale").value;
  if (scale === "linear") return { log: false, vmin: 0, what: "" };
  return scale === "stretch" ? { log: true, what: " (log colour, min to max)" }
                             : { log: true, minDecades: 1, what: " (log colour)" };
}
function draw(name, values, label, win) {
  var b = blk(), gh = b.grid[0], gw = b.grid[1], c = vj.$("sparsity-" + name), o = colourOptions();
  var thin = vj.fitCanvas(c, gh, gw) < 8 ? 1 : 2;
  var r = vj.drawHeatmap(c, values, gh, gw, { image: images[st.image], log: o.log, vmin: o.vmin,
    minDecades: o.minDecades, cmap: "magma", alpha: +vj.$("sparsity-opacity").value / 100 });
  if (vj.$("sparsity-show-top").checked) vj.outlineCells(c, topColumns(), gh, gw, "#38d9ff", thin);
  outlineRegion(c, win, gh, gw, "#ffd43b");
  vj.outlineCells(c, [query()], gh, gw, "#ffffff", thin + 1, "#000000");
  vj.colorbar(vj.$("sparsity-" + name + "-cb"), "magma", r.vmin, r.vmax,
              label + o.what + (r.constant ? ": every value equal" : ""));
  root.dataset[name + "Range"] = r.vmin.toPrecision(6) + "," + r.vmax.toPrecision(6);
}
function drawPicture(win) {
  var b = blk(), gh = b.grid[0], gw = b.grid[1], c = vj.$("sparsity-picture"), cell = vj.fitCanvas(c, gh, gw);
  vj.drawImage(c, images[st.image]);
  outlineRegion(c, win, gh, gw, "#ffd43b");
  vj.outlineCells(c, [query()], gh, gw, "#ffffff", cell < 8 ? 2 : 3, "#000000");
  vj.$("sparsity-grid-note").textContent = gh + "x" + gw + " tokens, " + cell + " px per token";
}
function render() {
  var b = blk(), t = query(), at = windowOf(t), h = headIndex(), hw = b.grid[0] * b.grid[1];
  var rw = row(t), col = column(t), win = windowMask(at.w);
  var m0 = (st.image * (b.heads + 1) + h) * hw, mu = b.mu.subarray(m0, m0 + hw);
  vj.$("sparsity-opacity-value").textContent = vj.$("sparsity-opacity").value + "%";
  drawPicture(win);
  draw("row", rw.values, "attention", win);
  draw("col", col, "attention", win);
  var showMu = vj.$("sparsity-show-mu").checked;
  vj.$("sparsity-mu-panel").hidden = !showMu;
  if (showMu) draw("mu", mu, h === b.heads ? "mu" : "mu_h", win);
  var best = maxOf(rw.values), stored = 0;
  for (var i = 0; i < hw; i++) if (rw.values[i] === rw.values[i]) stored += rw.values[i];
  var showDist = vj.$("sparsity-show-dist").checked && dist !== null;
  vj.$("sparsity-dist-panel").hidden = !showDist;
  vj.$("sparsity-dist-readout").hidden = !showDist;
  if (showDist) dist.render(st.image, st.block, h === b.heads ? -1 : h);
  var head = h === b.heads ? "mean" : String(h);
  root.dataset.image = st.image; root.dataset.block = st.block; root.dataset.head = head;
  root.dataset.query = t; root.dataset.window = at.w; root.dataset.rowMax = best[0].toFixed(6);
  root.dataset.rowMaxToken = best[1];
  vj.$("sparsity-readout").textContent = "image " + data.image_index[st.image] + " · " + data.blocks[st.block]
    + " (" + b.grid[0] + "x" + b.grid[1] + " tokens, window " + b.window[0] + "x" + b.window[1]
    + (b.shift[0] || b.shift[1] ? ", shifted by " + b.shift[0] + "," + b.shift[1] : ", not shifted") + ")"
    + " · head " + head + " · query " + tokenName(t) + " in window " + at.w + (st.pinned ? " [pinned]" : "")
    + " · row max " + vj.fmt(best[0]) + " at " + tokenName(best[1]) + " · stored entries hold \u2248"
    + vj.fmt(100 * Math.min(stored, 1)) + "% (rest " + vj.fmt(100 * rw.rest) + "%) · mu of this column " + vj.fmt(mu[t]);
}
function setHeads() {
  var b = blk(), items = [[-1, "mean"]];
  for (var h = 0; h < b.heads; h++) items.push([h, String(h)]);
  vj.options(vj.$("sparsity-head"), items, st.head < 0 ? -1 : Math.min(st.head, b.heads - 1));
}
function setBlock(l) {
  st.block = Math.max(0, Math.min(L - 1, l));
  vj.$("sparsity-block").value = String(st.block);
  setHeads();
  render();
}

var K = data.row_top_k, full = S.every(function (b) { return b.k * b.windows >= b.tokens.length; });   // k >= T
vj.$("sparsity-k").textContent = "Swin attends within windows (outlined in yellow; in a shifted-window block a"
  + " window wraps around the image edge, as the model's cyclic shift does, so it may show in pieces). "
  + (full ? "Every entry of every window row is stored." : "Each row keeps its " + K + " largest entries of its "
  + "window; uncoloured cells of the window are not stored (smaller).");
vj.$("sparsity-top-pct").textContent = String(+(100 * data.top_fraction).toPrecision(3));
vj.options(vj.$("sparsity-image"), data.image_index.map(function (ix, i) {
  return [i, "#" + ix + (data.label[i] >= 0 ? " (label " + data.label[i] + ")" : "")];
}), 0);
vj.options(vj.$("sparsity-block"), data.blocks.map(function (b, l) {
  return [l, b + " (" + S[l].grid[0] + "x" + S[l].grid[1] + ")"];
}), st.block);
setHeads();
vj.$("sparsity-queries").hidden = true;                 // no prefix tokens to query
["sparsity-show-norms", "sparsity-show-prefix"].forEach(function (id) {
  var box = vj.$(id);
  box.checked = false; box.disabled = true;
  box.parentNode.appendChild(document.createTextNode(" (n/a for Swin)"));
});
vj.$("sparsity-norm-panel").hidden = true;
vj.$("sparsity-prefix").textContent = "token norms and prefix-token mass: n/a (Swin has no prefix tokens; its"
  + " token norms are not measured)";
vj.$("sparsity-image").addEventListener("change", function (e) { st.image = +e.target.value; render(); });
vj.$("sparsity-block").addEventListener("change", function (e) { setBlock(+e.target.value); });
vj.$("sparsity-head").addEventListener("change", function (e) { st.head = +e.target.value; render(); });
vj.$("sparsity-prev").addEventListener("click", function () { setBlock(st.block - 1); });
vj.$("sparsity-next").addEventListener("click", function () { setBlock(st.block + 1); });
["sparsity-scale", "sparsity-show-mu", "sparsity-show-top", "sparsity-show-dist", "sparsity-dist-source"]
  .forEach(function (id) { vj.$(id).addEventListener("change", render); });
vj.$("sparsity-opacity").addEventListener("input", render);
if (dist === null) vj.$("sparsity-show-dist").disabled = true;
function cellAt(c, e) {
  var b = blk(), at = vj.patchAt(c, e, b.grid[0], b.grid[1]);
  return at ? { index: at.index, qy: (at.row + 0.5) / b.grid[0], qx: (at.col + 0.5) / b.grid[1] } : null;
}
canvases.forEach(function (c) {
  c.addEventListener("mousemove", function (e) {
    var at = cellAt(c, e);
    if (!st.pinned && at && at.index !== query()) { st.qy = at.qy; st.qx = at.qx; render(); }
  });
  c.addEventListener("click", function (e) {
    var at = cellAt(c, e);
    if (!at) return;
    st.pinned = !(st.pinned && query() === at.index);
    st.qy = at.qy; st.qx = at.qx;
    render();
  });
});
vj.onArrows(root, function (step) { setBlock(st.block + step); });
return Promise.all(data.images.map(vj.loadImage)).then(function (ims) { images = ims; render(); });
