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
  /* Sizes `canvas` for an (h, w) grid: whole pixels per cell, the longer side at least `minSide` px (320),
     and at least `minCell` px per cell (10) as long as the longer side stays within `maxSide` px (720), so a
     56x56 grid gets 10 px cells (560 px), not 5.7. The CSS size is the pixel size. Returns the cell size. */
  function fitCanvas(canvas, h, w, opts) {
    opts = opts || {};
    var g = Math.max(h, w, 1), minSide = opts.minSide || 320, maxSide = opts.maxSide || 720;
    var cell = Math.max(1, Math.ceil(minSide / g), Math.min(opts.minCell || 10, Math.floor(maxSide / g)));
    if (canvas.width !== cell * w) canvas.width = cell * w;
    if (canvas.height !== cell * h) canvas.height = cell * h;
    canvas.style.width = canvas.width + "px";
    canvas.style.height = canvas.height + "px";
    return cell;
  }
  /* The colour range of a heat map: [vmin, vmax] (log10 values when opts.log) and whether every value is equal.
     opts: vmin / vmax (default: the values' range); minDecades (log only: vmin is at most vmax - minDecades,
     so that near-equal values are not stretched over the whole bar). A range of zero width (every value
     equal, nothing else asked) is widened downwards: log, by one decade; linear, to 0; so the values take
     the bar's top colour, never its bottom one. */
  function colourRange(vals, opts) {
    var r = range(vals), constant = r[0] === r[1];
    var vmin = opts.vmin !== undefined ? opts.vmin : r[0], vmax = opts.vmax !== undefined ? opts.vmax : r[1];
    if (opts.log && opts.minDecades) vmin = Math.min(vmin, vmax - opts.minDecades);
    if (!(vmax > vmin)) {
      if (opts.log) vmin = vmax - 1;
      else if (vmax > 0) vmin = 0;
      else if (vmax < 0) vmax = 0;
      else vmax = 1;
    }
    return { vmin: vmin, vmax: vmax, constant: constant };
  }
  /* Draws `values` (flat, h*w, row-major) as a heat map on `canvas` in the colour bar's own colours.
     opts: cmap ("viridis"); log (false: colour by log10, non-positive values not drawn); vmin / vmax /
     minDecades (see colourRange; log: in log10 units); alpha (1: opaque cells); image (an HTMLImageElement,
     optional: drawn washed out, at imageAlpha (0.4) over white, under the map; it shows in the cells that are
     not drawn and, when alpha < 1, through the others); mask (flat h*w, 0 = not drawn). NaN cells are not
     drawn. Returns {vmin, vmax, constant} as used (values, not log10; constant: every drawn value is equal). */
  function drawHeatmap(canvas, values, h, w, opts) {
    opts = opts || {};
    var ctx = canvas.getContext("2d"), n = h * w, vals = new Float32Array(n), i;
    for (i = 0; i < n; i++) {
      var x = opts.mask && !opts.mask[i] ? NaN : values[i];
      vals[i] = opts.log ? (x > 0 ? Math.log10(x) : NaN) : x;
    }
    var cr = colourRange(vals, opts), span = cr.vmax - cr.vmin;
    var alpha = Math.round(255 * (opts.alpha !== undefined ? opts.alpha : 1));
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (opts.image) {
      ctx.save();
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.globalAlpha = opts.imageAlpha !== undefined ? opts.imageAlpha : 0.4;
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(opts.image, 0, 0, canvas.width, canvas.height);
      ctx.restore();
    }
    var grid = document.createElement("canvas");
    grid.width = w; grid.height = h;
    var g = grid.getContext("2d"), img = g.createImageData(w, h);
    for (i = 0; i < n; i++) {
      var v = vals[i], off = 4 * i;
      if (v !== v) continue;
      var c = color(opts.cmap || "viridis", (v - cr.vmin) / span);
      img.data[off] = c[0]; img.data[off + 1] = c[1]; img.data[off + 2] = c[2]; img.data[off + 3] = alpha;
    }
    g.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(grid, 0, 0, canvas.width, canvas.height);
    return { vmin: opts.log ? Math.pow(10, cr.vmin) : cr.vmin, vmax: opts.log ? Math.pow(10, cr.vmax) : cr.vmax,
             constant: cr.constant };
  }
  /* Draws an image over the whole canvas (no smoothing for small images: their pixels stay sharp). */
  function drawImage(canvas, image) {
    var ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = image.naturalWidth >= canvas.width / 2;
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  }
  /* Outlines cells (an array of flat indices, or a flat h*w mask of truthy cells) of an (h, w) grid; `halo`:
     a darker outline under it, so that a light outline shows on light cells too. */
  function outlineCells(canvas, cells, h, w, colour, lineWidth, halo) {
    var ctx = canvas.getContext("2d"), cw = canvas.width / w, ch = canvas.height / h, lw = lineWidth || 2;
    var idx = [];
    if (cells.length === h * w && !Array.isArray(cells)) {
      for (var i = 0; i < cells.length; i++) if (cells[i]) idx.push(i);
    } else idx = Array.prototype.slice.call(cells);
    ctx.save();
    if (halo) {
      ctx.strokeStyle = halo; ctx.lineWidth = lw + 2;
      idx.forEach(function (k) {
        ctx.strokeRect((k % w) * cw + lw / 2, Math.floor(k / w) * ch + lw / 2, cw - lw, ch - lw);
      });
    }
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
    loadImage: loadImage, fitCanvas: fitCanvas, colourRange: colourRange, drawHeatmap: drawHeatmap,
    drawImage: drawImage, outlineCells: outlineCells, labelCells: labelCells,
    patchAt: patchAt, options: options, onArrows: onArrows, register: register, start: start,
    maps: Object.keys(MAPS)
  };
  return api;
})();
