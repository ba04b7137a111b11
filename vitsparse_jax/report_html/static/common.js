/* vitsparse_jax report.html: helpers shared by the explorers (`vj`). No network, no console output in normal
   use. An explorer registers itself with vj.register(key, function (data, vj) {...}); vj.start() parses its
   JSON (<script id="KEY-data">), decodes every encode_array() payload in it into a flat typed array (with a
   `.shape`), and calls it; an exception is shown in the explorer (#KEY-error) and logged as an error. */
"use strict";
var vj = (function () {
  var registry = [];

  function $(id) { return document.getElementById(id); }

  // --- encode_array payloads -------------------------------------------------------------------------------
  function bytes(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  function half(h) {   // IEEE 754 binary16 bits -> number
    var s = (h & 0x8000) ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * f * Math.pow(2, -24);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * (1 + f / 1024) * Math.pow(2, e - 15);
  }
  function isEncoded(v) {
    return v !== null && typeof v === "object" && typeof v.b64 === "string" && typeof v.kind === "string"
      && Array.isArray(v.shape);
  }
  function decode(enc) {   // -> Float32Array (float16, uint8) | Uint8Array | Uint16Array | Int32Array, flat
    var raw = bytes(enc.b64), out, i;
    if (enc.kind === "float16") {
      var u = new Uint16Array(raw.buffer, 0, raw.length >> 1);
      out = new Float32Array(u.length);
      for (i = 0; i < u.length; i++) out[i] = half(u[i]);
    } else if (enc.kind === "uint8") {
      out = new Float32Array(raw.length);
      for (i = 0; i < raw.length; i++) out[i] = raw[i] * enc.scale + enc.offset;
    } else if (enc.kind === "uint8_raw") {
      out = raw;
    } else if (enc.kind === "uint16") {
      out = new Uint16Array(raw.buffer, 0, raw.length >> 1);
    } else if (enc.kind === "int32") {
      out = new Int32Array(raw.buffer, 0, raw.length >> 2);
    } else {
      throw new Error("vj.decode: unknown kind " + enc.kind);
    }
    out.shape = enc.shape.slice();
    return out;
  }
  function decodeAll(v) {   // replaces every encoded array in a parsed JSON tree
    if (isEncoded(v)) return decode(v);
    if (Array.isArray(v)) return v.map(decodeAll);
    if (v !== null && typeof v === "object") {
      var o = {};
      Object.keys(v).forEach(function (k) { o[k] = decodeAll(v[k]); });
      return o;
    }
    return v;
  }

  // --- colours -------------------------------------------------------------------------------------------
  var MAPS = {   // 9 evenly spaced anchors of matplotlib's maps, linearly interpolated
    viridis: [[68, 1, 84], [71, 45, 123], [59, 82, 139], [44, 114, 142], [33, 145, 140], [40, 174, 128],
      [94, 201, 98], [173, 220, 48], [253, 231, 37]],
    magma: [[0, 0, 4], [29, 17, 71], [81, 18, 124], [131, 38, 129], [183, 55, 121], [231, 82, 99],
      [252, 137, 97], [254, 196, 136], [252, 253, 191]],
    rdbu: [[5, 48, 97], [42, 113, 178], [107, 172, 209], [194, 221, 236], [247, 246, 246], [251, 204, 180],
      [228, 128, 102], [186, 40, 50], [103, 0, 31]],
    gray: [[0, 0, 0], [255, 255, 255]]
  };
  function color(name, t) {   // t in [0, 1] -> [r, g, b]
    var a = MAPS[name] || MAPS.viridis, n = a.length - 1;
    t = Math.min(1, Math.max(0, isFinite(t) ? t : 0)) * n;
    var i = Math.min(n - 1, Math.floor(t)), f = t - i, p = a[i], q = a[i + 1];
    return [p[0] + f * (q[0] - p[0]), p[1] + f * (q[1] - p[1]), p[2] + f * (q[2] - p[2])];
  }
  function css(rgb) { return "rgb(" + rgb.map(Math.round).join(",") + ")"; }
  function range(values) {
    var lo = Infinity, hi = -Infinity;
    for (var i = 0; i < values.length; i++) {
      var v = values[i];
      if (v === v) { if (v < lo) lo = v; if (v > hi) hi = v; }
    }
    return lo <= hi ? [lo, hi] : [0, 1];
  }
  function colorbar(el, cmap, vmin, vmax, label) {   // a CSS gradient bar with its range
    var stops = [];
    for (var i = 0; i <= 8; i++) stops.push(css(color(cmap, i / 8)) + " " + (i * 12.5) + "%");
    el.innerHTML = '<span class="vj-cb-lo"></span><span class="vj-cb-bar"></span><span class="vj-cb-hi"></span>'
      + '<span class="vj-cb-label"></span>';
    el.children[0].textContent = fmt(vmin);
    el.children[1].style.background = "linear-gradient(to right," + stops.join(",") + ")";
    el.children[2].textContent = fmt(vmax);
    el.children[3].textContent = label || "";
  }
  function fmt(x, digits) {
    if (typeof x !== "number" || !isFinite(x)) return String(x);
    var d = digits || 3, a = Math.abs(x);
    return (a !== 0 && (a < 1e-3 || a >= 1e4)) ? x.toExponential(d - 1) : String(+x.toPrecision(d));
  }

  // --- canvases ------------------------------------------------------------------------------------------
  function loadImage(url) {
    return new Promise(function (resolve, reject) {
      var im = new Image();
      im.onload = function () { resolve(im); };
      im.onerror = function () { reject(new Error("vj.loadImage: cannot decode the image")); };
      im.src = url;
    });
  }
  /* Draws `values` (flat, h*w, row-major) as a heat map over `opts.image` (an HTMLImageElement, optional)
     on `canvas`. opts: alpha (0.65), cmap ("viridis"), vmin/vmax (default: the values' range), log (false:
     colour by log10, non-positive values transparent), mask (flat h*w, 0 = transparent cell).
     Returns {vmin, vmax} as used. NaN cells are transparent. */
  function drawHeatmap(canvas, values, h, w, opts) {
    opts = opts || {};
    var ctx = canvas.getContext("2d"), n = h * w, vals = values, i;
    if (opts.log) {
      vals = new Float32Array(n);
      for (i = 0; i < n; i++) vals[i] = values[i] > 0 ? Math.log10(values[i]) : NaN;
    }
    var r = range(vals), vmin = opts.vmin !== undefined ? opts.vmin : r[0];
    var vmax = opts.vmax !== undefined ? opts.vmax : r[1], span = vmax > vmin ? vmax - vmin : 1;
    var alpha = Math.round(255 * (opts.alpha !== undefined ? opts.alpha : 0.65));
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = true;
    if (opts.image) ctx.drawImage(opts.image, 0, 0, canvas.width, canvas.height);
    var grid = document.createElement("canvas");
    grid.width = w; grid.height = h;
    var g = grid.getContext("2d"), img = g.createImageData(w, h);
    for (i = 0; i < n; i++) {
      var v = vals[i], off = 4 * i;
      if (v !== v || (opts.mask && !opts.mask[i])) continue;
      var c = color(opts.cmap || "viridis", (v - vmin) / span);
      img.data[off] = c[0]; img.data[off + 1] = c[1]; img.data[off + 2] = c[2]; img.data[off + 3] = alpha;
    }
    g.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(grid, 0, 0, canvas.width, canvas.height);
    return { vmin: opts.log ? Math.pow(10, vmin) : vmin, vmax: opts.log ? Math.pow(10, vmax) : vmax };
  }
  /* Outlines cells (an array of flat indices, or a flat h*w mask of truthy cells) of an (h, w) grid. */
  function outlineCells(canvas, cells, h, w, colour, lineWidth) {
    var ctx = canvas.getContext("2d"), cw = canvas.width / w, ch = canvas.height / h, lw = lineWidth || 2;
    var idx = [];
    if (cells.length === h * w && !Array.isArray(cells)) {
      for (var i = 0; i < cells.length; i++) if (cells[i]) idx.push(i);
    } else idx = Array.prototype.slice.call(cells);
    ctx.save();
    ctx.strokeStyle = colour || "#ff2d55"; ctx.lineWidth = lw;
    idx.forEach(function (k) {
      ctx.strokeRect((k % w) * cw + lw / 2, Math.floor(k / w) * ch + lw / 2, cw - lw, ch - lw);
    });
    ctx.restore();
  }
  /* Writes short texts (e.g. numbers) centred in cells: texts = flat h*w array of strings ("" = none). */
  function labelCells(canvas, texts, h, w, colour) {
    var ctx = canvas.getContext("2d"), cw = canvas.width / w, ch = canvas.height / h;
    ctx.save();
    ctx.font = Math.max(8, Math.min(14, Math.floor(Math.min(cw, ch) * 0.45))) + "px sans-serif";
    ctx.textAlign = "center"; ctx.textBaseline = "middle";
    ctx.lineWidth = 3; ctx.strokeStyle = "rgba(0,0,0,0.75)"; ctx.fillStyle = colour || "#fff";
    for (var k = 0; k < texts.length; k++) {
      if (!texts[k]) continue;
      var x = (k % w + 0.5) * cw, y = (Math.floor(k / w) + 0.5) * ch;
      ctx.strokeText(texts[k], x, y); ctx.fillText(texts[k], x, y);
    }
    ctx.restore();
  }
  /* The grid cell under a mouse event on a canvas showing an (h, w) grid: {index, row, col} or null. */
  function patchAt(canvas, event, h, w) {
    var b = canvas.getBoundingClientRect();
    var x = (event.clientX - b.left) / b.width, y = (event.clientY - b.top) / b.height;
    if (!(x >= 0 && x < 1 && y >= 0 && y < 1)) return null;
    var row = Math.floor(y * h), col = Math.floor(x * w);
    return { index: row * w + col, row: row, col: col };
  }

  // --- controls ------------------------------------------------------------------------------------------
  /* Fills a <select> with items ([value, label] pairs or plain values) and selects `selected`. */
  function options(select, items, selected) {
    select.innerHTML = "";
    items.forEach(function (it) {
      var o = document.createElement("option"), pair = Array.isArray(it) ? it : [it, it];
      o.value = String(pair[0]); o.textContent = String(pair[1]);
      select.appendChild(o);
    });
    if (selected !== undefined) select.value = String(selected);
  }
  /* ArrowLeft / ArrowRight -> onStep(-1 | +1) while `root` is on screen and no form control has focus. */
  function onArrows(root, onStep) {
    document.addEventListener("keydown", function (e) {
      if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      var t = e.target, tag = t && t.tagName ? t.tagName.toLowerCase() : "";
      if (tag === "input" || tag === "select" || tag === "textarea" || (t && t.isContentEditable)) return;
      var b = root.getBoundingClientRect();
      if (b.bottom < 0 || b.top > window.innerHeight) return;
      e.preventDefault();
      onStep(e.key === "ArrowLeft" ? -1 : 1);
    });
  }

  // --- start-up ------------------------------------------------------------------------------------------
  function register(key, fn) { registry.push([key, fn]); }
  function start() {
    registry.forEach(function (entry) {
      var key = entry[0];
      try {
        var data = decodeAll(JSON.parse($(key + "-data").textContent));
        var res = entry[1](data, api);
        if (res && typeof res.then === "function") res.then(null, function (e) { fail(key, e); });
      } catch (e) { fail(key, e); }
    });
  }
  function fail(key, e) {
    var el = $(key + "-error");
    if (el) { el.hidden = false; el.textContent = "This explorer failed: " + (e && e.message ? e.message : e); }
    console.error("explorer " + key + ":", e);
  }

  var api = {
    $: $, decode: decode, half: half, color: color, css: css, range: range, colorbar: colorbar, fmt: fmt,
    loadImage: loadImage, drawHeatmap: drawHeatmap, outlineCells: outlineCells, labelCells: labelCells,
    patchAt: patchAt, options: options, onArrows: onArrows, register: register, start: start,
    maps: Object.keys(MAPS)
  };
  return api;
})();
