// Ablation explorer (report.html): runs as a function body with `data` (decoded) and `vj` in scope.
// data.models[m]: name, family, ps, ns, draws, whole_layer, sites [{site, kind, units, prefix, grid, k}],
//   images (indices into data.images), index, label, clean, preds (Nn, V, k), dropped {site: (P, 1 + D, k, U)}.
// Variant v of a group: p index * (1 + D) + draw (0 = top set, 1.. = random draws); V - 1 = the whole layer.
var $ = vj.$, K = "ablation";
var el = {
  model: $(K + "-model"), image: $(K + "-image"), n: $(K + "-n"), p: $(K + "-p"), draw: $(K + "-draw"),
  layer: $(K + "-layer"), canvas: $(K + "-canvas"), channels: $(K + "-channels"), title: $(K + "-title"),
  units: $(K + "-units"), cell: $(K + "-cell"), readout: $(K + "-readout"), status: $(K + "-status"),
  table: $(K + "-table"), thumbs: $(K + "-thumbs")
};
var pictures = [];   // decoded <img> of data.images
var state = { model: 0, image: 0, n: 0, p: 0, draw: 0, site: "" };   // site: the layer shown

function model() { return data.models[state.model]; }
function slots(m) { return 1 + m.draws; }
function variantCount(m) { return m.ps.length * slots(m) + (m.whole_layer ? 1 : 0); }
function isWhole(m) { return m.whole_layer && state.draw === slots(m); }
function className(c) {
  var name = data.class_names[String(c)];
  return name && name !== String(c) ? c + " (" + name + ")" : String(c);
}
function prediction(m, ni, v) { return m.preds[(ni * variantCount(m) + v) * m.index.length + state.image]; }
function variantIndex(m) { return isWhole(m) ? variantCount(m) - 1 : state.p * slots(m) + state.draw; }
function drawName(m, d) {
  if (d === 0) return "top " + "set";
  if (d <= m.draws) return "random draw " + d;
  return "whole layer";
}
function layerSites(m) {   // the sites of the last n layers, forward order
  var n = m.ns[state.n];
  return m.sites.slice(m.sites.length - n);
}
// 1 where the selected variant dropped unit u of `site` for the selected image.
function droppedOf(m, site) {
  var out = new Uint8Array(site.units);
  if (isWhole(m)) { out.fill(1); return out; }
  var flags = m.dropped[site.site], k = m.index.length;
  var base = ((state.p * slots(m) + state.draw) * k + state.image) * site.units;
  for (var u = 0; u < site.units; u++) out[u] = flags[base + u];
  return out;
}
function currentSite(m) {
  return layerSites(m).filter(function (s) { return s.site === state.site; })[0];
}
function count(a) { var c = 0; for (var i = 0; i < a.length; i++) c += a[i]; return c; }
function unitName(site) {
  return { token: "patch tokens", window: "tokens of the block's input map", channel: "channels",
    spatial: "positions" }[site.kind];
}

function fillControls() {
  var m = model();
  vj.options(el.image, m.index.map(function (idx, i) {
    return [i, "#" + idx + " (label " + className(m.label[i]) + ")"];
  }), state.image);
  vj.options(el.n, m.ns.map(function (n, i) { return [i, n]; }), state.n);
  vj.options(el.p, m.ps.map(function (p, i) { return [i, +(100 * p).toPrecision(4) + "%"]; }), state.p);
  var draws = [];
  for (var d = 0; d <= m.draws + (m.whole_layer ? 1 : 0); d++) draws.push([d, drawName(m, d)]);
  vj.options(el.draw, draws, state.draw);
  var names = layerSites(m).map(function (s) { return s.site; });
  if (names.indexOf(state.site) < 0) state.site = names[names.length - 1];   // default: the last layer
  vj.options(el.layer, names, state.site);
  el.thumbs.innerHTML = "";
  m.images.forEach(function (ref, i) {
    var t = document.createElement("img");
    t.src = data.images[ref]; t.id = K + "-thumb-" + i; t.title = "image #" + m.index[i];
    t.width = 56; t.height = 56;
    t.style.cssText = "margin:2px;cursor:pointer;image-rendering:pixelated;border:2px solid "
      + (i === state.image ? "#2a62c9" : "transparent");
    t.addEventListener("click", function () { state.image = i; fillControls(); render(); });
    el.thumbs.appendChild(t);
  });
}

function drawOverlay(m, site, dropped) {
  var pic = pictures[m.images[state.image]], c = el.canvas, ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.drawImage(pic, 0, 0, c.width, c.height);
  el.channels.hidden = site.kind !== "channel";
  if (site.kind === "channel") {   // channels have no position: a grid of channel cells beside the image
    var cols = Math.ceil(Math.sqrt(site.units)), rows = Math.ceil(site.units / cols);
    var cc = el.channels, g = cc.getContext("2d");
    cc.height = Math.round(cc.width * rows / cols);
    var cw = cc.width / cols, ch = cc.height / rows;
    g.clearRect(0, 0, cc.width, cc.height);
    for (var u = 0; u < site.units; u++) {
      g.fillStyle = dropped[u] ? "#ff2d55" : "#e3e6ea";
      g.fillRect((u % cols) * cw + 0.5, Math.floor(u / cols) * ch + 0.5, Math.max(1, cw - 1), Math.max(1, ch - 1));
    }
    return;
  }
  var h = site.grid[0], w = site.grid[1], cw2 = c.width / w, ch2 = c.height / h;
  ctx.fillStyle = "rgba(255,45,85,0.45)";
  for (var i = 0; i < dropped.length; i++) {
    if (dropped[i]) ctx.fillRect((i % w) * cw2, Math.floor(i / w) * ch2, cw2, ch2);
  }
  vj.outlineCells(c, dropped, h, w, "#ff2d55", Math.max(1, Math.min(2, cw2 / 6)));
}

function renderTable(m) {
  var ni = state.n, head = "<tr><th>p</th>";
  for (var d = 0; d <= m.draws; d++) head += "<th>" + drawName(m, d) + "</th>";
  var rows = [head + "</tr>"], clean = m.clean[state.image], label = m.label[state.image];
  m.ps.forEach(function (p, pi) {
    var r = "<tr><td>" + +(100 * p).toPrecision(4) + "%</td>";
    for (var d = 0; d <= m.draws; d++) {
      var pred = prediction(m, ni, pi * slots(m) + d), sel = pi === state.p && d === state.draw;
      r += '<td id="' + K + "-cell-" + pi + "-" + d + '" data-p="' + pi + '" data-d="' + d + '" style="cursor:pointer;'
        + "background:" + (pred === clean ? "#dcf3dc" : "#f8d4d4") + (sel ? ";outline:2px solid #2a62c9" : "")
        + '">' + pred + (pred === label ? " ✓" : "") + "</td>";
    }
    rows.push(r + "</tr>");
  });
  if (m.whole_layer) {
    var w = prediction(m, ni, variantCount(m) - 1);
    rows.push('<tr><td>whole layer</td><td id="' + K + '-cell-whole" data-p="0" data-d="' + slots(m)
      + '" style="cursor:pointer;background:' + (w === clean ? "#dcf3dc" : "#f8d4d4") + '">' + w
      + (w === label ? " ✓" : "") + "</td></tr>");
  }
  el.table.innerHTML = rows.join("");
}

function render() {
  var m = model(), site = currentSite(m), dropped = droppedOf(m, site);
  var clean = m.clean[state.image], label = m.label[state.image], ablated = prediction(m, state.n, variantIndex(m));
  drawOverlay(m, site, dropped);
  el.title.textContent = site.site + ": " + drawName(m, state.draw)
    + (isWhole(m) ? "" : ", p = " + +(100 * m.ps[state.p]).toPrecision(4) + "%");
  el.units.textContent = count(dropped) + " of " + site.units + " " + unitName(site) + " dropped"
    + (site.kind === "channel" ? " (red cells; channels in index order)" : " (shaded red)")
    + (site.prefix ? "; prefix tokens (" + site.prefix + ") are never dropped" : "");
  el.readout.textContent = "label " + className(label) + "\nunablated: " + className(clean)
    + (clean === label ? " (correct)" : " (wrong)") + "\nablated in the last " + m.ns[state.n]
    + (m.ns[state.n] === 1 ? " layer: " : " layers: ")
    + className(ablated) + (ablated === label ? " (correct)" : " (wrong)");
  el.readout.style.whiteSpace = "pre-line";
  el.status.textContent = ablated === clean ? "unchanged" : "changed";
  el.status.style.color = ablated === clean ? "#1b7f1b" : "#b00020";
  el.cell.textContent = "";
  renderTable(m);
}

function on(select, field, refill) {
  select.addEventListener("change", function () {
    state[field] = +select.value;
    if (refill) fillControls();
    render();
  });
}
el.model.addEventListener("change", function () {
  state.model = +el.model.value; state.image = 0; state.n = 0; state.p = 0; state.draw = 0; state.site = "";
  fillControls(); render();
});
on(el.image, "image", true); on(el.n, "n", true); on(el.p, "p");
on(el.draw, "draw");
el.layer.addEventListener("change", function () { state.site = el.layer.value; render(); });
el.table.addEventListener("click", function (e) {
  var td = e.target.closest("td[data-d]");
  if (!td) return;
  state.p = +td.dataset.p; state.draw = +td.dataset.d;
  el.p.value = String(state.p); el.draw.value = String(state.draw);
  render();
});
el.canvas.addEventListener("click", function (e) {   // which layers of the group dropped the unit under the mouse
  var m = model(), site = currentSite(m);
  if (site.kind === "channel") return;
  var at = vj.patchAt(el.canvas, e, site.grid[0], site.grid[1]);
  if (!at) return;
  var where = layerSites(m).filter(function (s) {
    if (s.kind === "channel") return false;
    var r = Math.floor(at.row * s.grid[0] / site.grid[0]), c = Math.floor(at.col * s.grid[1] / site.grid[1]);
    return droppedOf(m, s)[r * s.grid[1] + c] === 1;
  }).map(function (s) { return s.site; });
  el.cell.textContent = "unit (row " + at.row + ", col " + at.col + ") of " + site.site + ": dropped in "
    + (where.length ? where.join(", ") : "none of the last " + m.ns[state.n] + " layers");
});
el.channels.addEventListener("click", function (e) {   // channel cells: which channel, dropped or kept
  var m = model(), site = currentSite(m), cols = Math.ceil(Math.sqrt(site.units));
  var at = vj.patchAt(el.channels, e, Math.ceil(site.units / cols), cols);
  if (!at || at.index >= site.units) return;
  el.cell.textContent = "channel " + at.index + " of " + site.site + ": "
    + (droppedOf(m, site)[at.index] ? "dropped" : "kept");
});
el.model.parentElement.hidden = data.models.length < 2;
vj.options(el.model, data.models.map(function (m, i) { return [i, m.name]; }), 0);
return Promise.all(data.images.map(vj.loadImage)).then(function (ims) {
  pictures = ims;
  fillControls();
  render();
});
