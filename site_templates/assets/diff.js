/* Crosscoder Atlas: the model-diff overview's scatter plots (diff/index.html).
 *
 * Reads data/diff.js (overview.OverviewData in atlas/render/overview.py) and draws on each
 * <canvas data-plot="..."> of the page:
 *   rel: every alive feature, relative decoder norm (x) × decoder cosine (y, on a -log10(1 - cos) scale
 *        so that the many shared features near 1 spread out), coloured by model-diff class, the class
 *        thresholds as dashed lines;
 *   nu:  the model-A-only and model-B-only features whose latent scaling ratios are both finite,
 *        ν^ε (x) × ν^r (y); values outside the plot's range are drawn at its edge.
 * Hovering shows the nearest point's feature id, coordinates and top tokens; a click within a few
 * pixels of a point opens that feature's page. Atlas.diffPlots[name].points() gives every drawn point
 * as [id, clientX, clientY] (used by the browser tests).
 */
(function () {
  "use strict";
  var A = window.Atlas, doc = document;
  var W = 640, H = 360, PAD = { l: 56, r: 14, t: 12, b: 40 };
  var HIT = 6; // a click or hover within this many canvas pixels of a point picks it
  var CLASS_VAR = { 0: "--a", 1: "--shared", 2: "--b" };

  var tip = A.el("div", "tip");
  tip.setAttribute("role", "tooltip");
  tip.hidden = true;
  doc.body.appendChild(tip);

  function cssVar(name, fallback) {
    var v = getComputedStyle(doc.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  /** Tick values between lo and hi: a round step giving at most 8 ticks. */
  function ticks(lo, hi) {
    var span = hi - lo, steps = [0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10], step = steps[steps.length - 1];
    for (var i = 0; i < steps.length; i++) if (span / steps[i] <= 8) { step = steps[i]; break; }
    var out = [];
    for (var v = Math.ceil(lo / step - 1e-9) * step; v <= hi + 1e-9; v += step) out.push(Math.round(v / step) * step);
    return out;
  }

  /** Axis range of finite values: [lo, hi] covering `must`, widened to the values within [floor, ceil]. */
  function range(vals, must, floor, ceil) {
    var lo = must[0], hi = must[1];
    for (var i = 0; i < vals.length; i++) {
      var v = vals[i];
      if (!isFinite(v)) continue;
      if (v < lo) lo = Math.max(v, floor);
      if (v > hi) hi = Math.min(v, ceil);
    }
    return [lo, hi];
  }

  /** The cosine axis: -log10(1 - cos), so that 0.9, 0.99, 0.999 are equally spaced (cos ≥ 0.9999 at the top). */
  var COS_FLOOR = 1e-4, COS_TICKS = [-1, 0, 0.5, 0.9, 0.99, 0.999, 1];
  function cosScale(c) { return -Math.log10(Math.max(1 - c, COS_FLOOR)); }

  function fmtTick(v) { return String(+v.toFixed(3)); }

  /**
   * Draw points on a canvas and wire hover and click.
   * p: {x, y: Float32Array (plot coordinates), shown: the y values to show on hover (default y),
   *     rows: Int32Array (data rows drawn), xr, yr: axis ranges, yticks: [[y, text]] (default: round
   *     values), xlabel, ylabel, xshort, yshort, vlines, hlines}
   */
  function plot(canvas, data, p) {
    var dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(W * dpr);
    canvas.height = Math.round(H * dpr);
    var ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    var iw = W - PAD.l - PAD.r, ih = H - PAD.t - PAD.b;
    function sx(v) { return PAD.l + iw * (Math.min(Math.max(v, p.xr[0]), p.xr[1]) - p.xr[0]) / (p.xr[1] - p.xr[0]); }
    function sy(v) { return PAD.t + ih * (1 - (Math.min(Math.max(v, p.yr[0]), p.yr[1]) - p.yr[0]) / (p.yr[1] - p.yr[0])); }
    var muted = cssVar("--muted", "#666"), line = cssVar("--line", "#ddd");
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    // grid, ticks and axis labels
    ctx.fillStyle = muted;
    ctx.textAlign = "center";
    ticks(p.xr[0], p.xr[1]).forEach(function (v) {
      var x = sx(v);
      ctx.strokeStyle = line;
      ctx.beginPath(); ctx.moveTo(x, PAD.t); ctx.lineTo(x, PAD.t + ih); ctx.stroke();
      ctx.fillText(fmtTick(v), x, PAD.t + ih + 14);
    });
    ctx.fillText(p.xlabel, PAD.l + iw / 2, H - 6);
    ctx.textAlign = "right";
    (p.yticks || ticks(p.yr[0], p.yr[1]).map(function (v) { return [v, fmtTick(v)]; })).forEach(function (t) {
      var v = t[0], y = sy(v);
      ctx.strokeStyle = line;
      ctx.beginPath(); ctx.moveTo(PAD.l, y); ctx.lineTo(PAD.l + iw, y); ctx.stroke();
      ctx.fillText(t[1], PAD.l - 5, y + 4);
    });
    ctx.save();
    ctx.translate(12, PAD.t + ih / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center";
    ctx.fillText(p.ylabel, 0, 0);
    ctx.restore();
    ctx.strokeStyle = muted;
    ctx.strokeRect(PAD.l, PAD.t, iw, ih);
    // reference lines
    ctx.setLineDash([4, 4]);
    (p.vlines || []).forEach(function (v) {
      ctx.beginPath(); ctx.moveTo(sx(v), PAD.t); ctx.lineTo(sx(v), PAD.t + ih); ctx.stroke();
    });
    (p.hlines || []).forEach(function (v) {
      ctx.beginPath(); ctx.moveTo(PAD.l, sy(v)); ctx.lineTo(PAD.l + iw, sy(v)); ctx.stroke();
    });
    ctx.setLineDash([]);
    // points: shared first, the model-specific ones on top
    var n = p.rows.length, px = new Float32Array(n), py = new Float32Array(n);
    for (var k = 0; k < n; k++) { px[k] = sx(p.x[k]); py[k] = sy(p.y[k]); }
    var colors = {};
    Object.keys(CLASS_VAR).forEach(function (c) { colors[c] = cssVar(CLASS_VAR[c], "#555"); });
    [1, -1, 0, 2].forEach(function (cls) {
      ctx.fillStyle = colors[cls] || muted;
      for (var k = 0; k < n; k++) {
        if (data.dc[p.rows[k]] !== cls) continue;
        ctx.beginPath();
        ctx.arc(px[k], py[k], 2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
    });

    function toCanvas(e) {
      var b = canvas.getBoundingClientRect();
      return [(e.clientX - b.left) * W / b.width, (e.clientY - b.top) * H / b.height];
    }
    function nearest(e) {
      var c = toCanvas(e), best = -1, bd = HIT * HIT;
      for (var k = 0; k < n; k++) {
        var dx = px[k] - c[0], dy = py[k] - c[1], d = dx * dx + dy * dy;
        if (d <= bd) { bd = d; best = k; }
      }
      return best;
    }
    canvas.addEventListener("mousemove", function (e) {
      var k = nearest(e);
      canvas.style.cursor = k < 0 ? "crosshair" : "pointer";
      if (k < 0) { tip.hidden = true; return; }
      var row = p.rows[k], toks = [];
      for (var j = 0; j < 3; j++) {
        var t = data.tt[row * 3 + j];
        if (t) toks.push(data.ts[t - 1]);
      }
      tip.textContent = "feature " + data.id[row] + "  " + p.xshort + " " + A.fmt(p.x[k], 3) + "  " +
        p.yshort + " " + A.fmt((p.shown || p.y)[k], 3) + (toks.length ? "\n" + toks.join("  ") : "");
      tip.setAttribute("data-id", String(data.id[row]));
      tip.hidden = false;
      tip.style.left = Math.min(e.clientX + 12, window.innerWidth - tip.offsetWidth - 4) + "px";
      tip.style.top = (e.clientY + 14) + "px";
    });
    canvas.addEventListener("mouseleave", function () { tip.hidden = true; });
    canvas.addEventListener("click", function (e) {
      var k = nearest(e);
      if (k >= 0) window.location.href = A.featureHref(data.id[p.rows[k]]);
    });
    return {
      n: n,
      points: function () {
        var b = canvas.getBoundingClientRect(), out = [];
        for (var k = 0; k < n; k++) {
          out.push([data.id[p.rows[k]], b.left + px[k] * b.width / W, b.top + py[k] * b.height / H]);
        }
        return out;
      }
    };
  }

  function draw(raw) {
    var data = {
      n: raw.n, id: A.u32(raw.id), r: A.f32(raw.r), c: A.f32(raw.c), dc: A.i8(raw.dc), ts: raw.ts, tt: A.u32(raw.tt),
      ne: raw.ne ? A.f32(raw.ne) : null, nr: raw.nr ? A.f32(raw.nr) : null
    };
    A.diffPlots = {};
    var rel = doc.querySelector("canvas[data-plot=rel]");
    if (rel) {
      var rows = [];
      for (var i = 0; i < data.n; i++) if (isFinite(data.r[i]) && isFinite(data.c[i])) rows.push(i);
      var x = new Float32Array(rows.length), y = new Float32Array(rows.length), cos = new Float32Array(rows.length);
      rows.forEach(function (row, k) { x[k] = data.r[row]; cos[k] = data.c[row]; y[k] = cosScale(data.c[row]); });
      var ylo = range(cos, [0, 1], -1, 1)[0] < 0 ? -1 : 0;
      A.diffPlots.rel = plot(rel, data, {
        x: x, y: y, shown: cos, rows: Int32Array.from(rows), xr: [0, 1], yr: [cosScale(ylo), cosScale(1)],
        yticks: COS_TICKS.filter(function (c) { return c >= ylo; }).map(function (c) { return [cosScale(c), String(c)]; }),
        xlabel: "relative decoder norm r (A-only \u2190 \u2192 B-only)", ylabel: "decoder cosine (finer near 1)",
        xshort: "r", yshort: "cos", vlines: [raw.lo, raw.hi]
      });
    }
    var nu = doc.querySelector("canvas[data-plot=nu]");
    if (nu && data.ne && data.nr) {
      var rows2 = [];
      for (var j = 0; j < data.n; j++) {
        if ((data.dc[j] === 0 || data.dc[j] === 2) && isFinite(data.ne[j]) && isFinite(data.nr[j])) rows2.push(j);
      }
      var x2 = new Float32Array(rows2.length), y2 = new Float32Array(rows2.length);
      rows2.forEach(function (row, k) { x2[k] = data.ne[row]; y2[k] = data.nr[row]; });
      A.diffPlots.nu = plot(nu, data, {
        x: x2, y: y2, rows: Int32Array.from(rows2), xr: range(x2, [0, 1.1], -1, 3), yr: range(y2, [0, 1.1], -1, 3),
        xlabel: "\u03bd^\u03b5 (reconstruction error)", ylabel: "\u03bd^r (reconstruction)",
        xshort: "\u03bd^\u03b5", yshort: "\u03bd^r", vlines: [1], hlines: [1]
      });
    }
  }

  A.load("diff").then(function (raw) {
    draw(raw);
    doc.documentElement.setAttribute("data-ready", "1");
  }, function (err) {
    Array.prototype.forEach.call(doc.querySelectorAll("section.scatter .note"), function (el) {
      el.textContent = "Could not load the scatter data: " + (err && err.message ? err.message : err);
    });
    if (window.console) console.error(err);
  });
})();
