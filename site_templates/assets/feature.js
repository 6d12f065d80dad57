/* Crosscoder Atlas: a feature page (f/<id>/index.html).
 *
 * Reads the payload embedded in <script type="application/x-atlas" id="atlas-feature"> (schema:
 * atlas/render/features.py FeaturePayload), loads the vocab shards it lists, and draws the panels:
 * top examples and interval groups (tokens shaded by activation, the max token marked .tok.max, hover
 * shows the value and, when the cache has it, the token's contribution to the next token's logit),
 * activation histogram, logit tables and histograms, decoder norms, nearest features, and, when the
 * cache has them, neuron alignment, correlated neurons and correlated features. Every example shows
 * its token position; special tokens (document breaks, chat markers) and the sequence start are marked.
 * Nearest and correlated features show their top tokens (from the index chunks). Correlations are
 * hidden for a feature with fewer than meta.min_active active tokens. Also: copy permalink, embed
 * code, j/k and arrow keys for previous/next.
 */
(function () {
  "use strict";
  var A = window.Atlas, M = A.site, doc = document;
  var NS = "http://www.w3.org/2000/svg";
  var main = doc.querySelector("main.feature");
  var tip = A.el("div", "tip");
  tip.id = "tip";
  tip.setAttribute("role", "tooltip");
  tip.hidden = true;
  doc.body.appendChild(tip);

  function panel(name) { return doc.querySelector('[data-panel="' + name + '"]'); }

  // ---------------------------------------------------------------- page structure
  function section(name, title) {
    var s = A.el("section", "panel");
    s.id = name;
    s.appendChild(A.el("h2", null, title));
    var body = A.el("div", "body");
    body.setAttribute("data-panel", name);
    s.appendChild(body);
    return s;
  }
  function buildPanels(p) {
    var box = doc.getElementById("panels"), dead = box.className === "dead";
    box.textContent = "";
    if (!dead) {
      box.appendChild(section("top", "Top activations"));
      box.appendChild(section("intervals", "Activation intervals"));
    }
    var grid = A.el("div", "grid");
    if (!dead) grid.appendChild(section("histogram", "Activation histogram"));
    grid.appendChild(section("decoder", "Decoder norm per source"));
    box.appendChild(grid);
    box.appendChild(section("logits", "Logit effects"));
    if (p.nb && p.nb.byteLength) box.appendChild(section("neighbours", "Nearest features by decoder cosine"));
    if (present(p.fi, dead)) box.appendChild(section("fcorr", "Correlated features"));
    var grid2 = A.el("div", "grid");
    var word = dimWord(), Word = word.charAt(0).toUpperCase() + word.slice(1);
    if (present(p.av, dead)) grid2.appendChild(section("alignment", Word + " alignment"));
    if (present(p.xv, dead)) grid2.appendChild(section("ncorr", "Correlated " + word + "s"));
    if (grid2.firstChild) box.appendChild(grid2);
  }
  /** An optional payload array: shown when the cache has it (key present), unless empty on a dead feature. */
  function present(bin, dead) { return bin !== undefined && bin !== null && (!dead || bin.byteLength > 0); }

  function sourceName(s) {
    var src = M.sources[s] || { model: "source " + s, site: "" };
    return (M.sources.length === 2 ? "AB"[s] + " \u00b7 " : "") + src.model + " \u00b7 " + src.site;
  }
  /** What a dimension of the sources' activations is: a residual dimension on a residual-stream site
   * (resid_*, attn_out, mlp_out), a neuron on an MLP's hidden layer (mlp.hook_post), a head dimension
   * on hook_z. */
  function dimWord() {
    var site = (M.sources[0] || {}).site || "";
    if (/mlp\.hook_post/.test(site)) return "neuron";
    if (/hook_z/.test(site)) return "head dimension";
    return "residual dimension";
  }
  function isOutlier(s, dim) {
    var o = M.outlier_dims && M.outlier_dims[s];
    return !!o && o.indexOf(dim) >= 0;
  }
  function outlierNote() {
    var o = M.outlier_dims, parts = [];
    if (!o) return null;
    var same = o.length > 1 && o.every(function (dims) { return dims.join() === o[0].join(); });
    if (same) parts = o[0].map(String);
    else o.forEach(function (dims, s) { dims.forEach(function (d) { parts.push((sourceShort(s) ? sourceShort(s) + " " : "") + d); }); });
    if (!parts.length) return null;
    return "Outlier " + dimWord() + "s (\u2691: RMS over all features above " + (M.outlier_factor || 10) +
      "\u00d7 the median dimension's, the massive dimensions many decoders write to): " + parts.join(", ") +
      (same ? (o.length === 2 ? " in A and B" : " in every source") : "") + ".";
  }
  function sourceShort(s) { return M.sources.length === 2 ? "AB"[s] : M.sources.length > 2 ? "s" + s : ""; }
  function signed(x) { return (x > 0 ? "+" : x < 0 ? "\u2212" : "") + A.fmt(Math.abs(x)); }

  function featureLinks(ids, vals, labels, cls) {
    var list = A.el("ol", cls);
    for (var i = 0; i < ids.length; i++) {
      var li = A.el("li"), id = ids[i];
      li.setAttribute("data-id", id);
      if (id >= M.first_id && id < M.first_id + M.n_features) {
        var a = A.el("a", null, id);
        a.href = A.featureHref(id);
        li.appendChild(a);
      } else {
        li.appendChild(A.el("span", null, id));
      }
      li.appendChild(A.el("span", "num", A.fmt(vals[i])));
      if (labels[i]) li.appendChild(A.el("span", "nlabel", labels[i]));
      list.appendChild(li);
    }
    return list;
  }
  function neuronTable(cls, head, rows) {
    var t = A.el("table", "neurons " + cls), tr = A.el("tr"), thead = A.el("thead"), tb = A.el("tbody");
    head.forEach(function (h, i) { tr.appendChild(A.el("th", i > 1 ? "num" : null, h)); });
    thead.appendChild(tr);
    t.appendChild(thead);
    rows.forEach(function (r) {
      var row = A.el("tr");
      var src = A.el("td", "src", sourceShort(r[0]) || sourceName(r[0]));
      src.title = sourceName(r[0]);
      row.appendChild(src);
      var dc = A.el("td", "num dim", r[1]);
      if (isOutlier(r[0], r[1])) {
        dc.appendChild(A.el("span", "outlier", " \u2691"));
        dc.title = "outlier dimension";
      }
      row.appendChild(dc);
      for (var k = 2; k < r.length; k++) row.appendChild(A.el("td", "num", r[k]));
      tb.appendChild(row);
    });
    t.appendChild(tb);
    return t;
  }

  /** True (and a note in ``body``) when the feature has too few active tokens for its correlations. */
  function tooFew(p, body) {
    var min = M.min_active || 0;
    if (p.na === undefined || p.na >= min || p.na === 0) return false;
    body.appendChild(A.el("p", "empty low-count", "Hidden: a correlation over only " + p.na + " active token" +
      (p.na === 1 ? "" : "s") + " (fewer than " + min + ") says little."));
    return true;
  }
  function drawCorrelatedFeatures(p) {
    var body = panel("fcorr");
    if (!body || tooFew(p, body)) return;
    var ids = A.u32(p.fi), r = A.f16(p.fv);
    if (!ids.length) { body.appendChild(A.el("p", "empty", "No correlated features.")); return; }
    body.appendChild(featureLinks(ids, r, p.fl || [], "neighbours fcorr"));
    body.appendChild(A.el("p", "note", "Pearson correlation of activations over all counted tokens, among the " +
      "feature's nearest features by decoder cosine; highest first."));
  }
  function drawCorrelatedNeurons(p) {
    var body = panel("ncorr");
    if (!body || tooFew(p, body)) return;
    var src = A.u16(p.xs), dim = A.u32(p.xd), r = A.f16(p.xv), rows = [];
    for (var i = 0; i < r.length; i++) rows.push([src[i], dim[i], A.fmt(r[i])]);
    if (!rows.length) { body.appendChild(A.el("p", "empty", "No correlated neurons.")); return; }
    var word = dimWord();
    body.appendChild(neuronTable("ncorr", ["Source", word.charAt(0).toUpperCase() + word.slice(1), "Pearson r"], rows));
    body.appendChild(A.el("p", "note", "Dimensions of the sources' activations (as read from the model) with the " +
      "largest |Pearson correlation| with the feature's activation over all counted tokens."));
    var o = outlierNote();
    if (o) body.appendChild(A.el("p", "note outliers", o));
  }
  function drawAlignment(p) {
    var body = panel("alignment");
    if (!body) return;
    var src = A.u16(p.as), dim = A.u32(p.ad), v = A.f32(p.av), frac = A.f16(p.af), rows = [], total = 0;
    for (var i = 0; i < v.length; i++) {
      rows.push([src[i], dim[i], A.fmt(v[i]), A.pct(frac[i])]);
      if (isFinite(frac[i])) total += frac[i];
    }
    if (!rows.length) { body.appendChild(A.el("p", "empty", "No decoder entries.")); return; }
    body.appendChild(neuronTable("alignment", ["Source", "Dim", "W_dec", "Share"], rows));
    var o = outlierNote();
    if (o) body.appendChild(A.el("p", "note outliers", o + " They are left out of this ranking."));
    var note = A.el("p", "note", "The " + rows.length + " largest decoder entries W_dec[f, s, i] carry ");
    var strong = A.el("strong", "align-total", A.pct(total));
    note.appendChild(strong);
    note.appendChild(doc.createTextNode(" of the decoder's L1 norm \u03a3|W_dec[f]| (all sources)."));
    body.appendChild(note);
  }

  function drawNeighbours(p) {
    var body = panel("neighbours");
    if (!body) return;
    body.appendChild(featureLinks(A.u32(p.nb), A.f16(p.nc), p.nl || [], "neighbours"));
  }
  /** Each listed feature (``li[data-id]`` of the neighbour and correlated-feature lists) gets its top
   * tokens from the index chunk that holds it (data/index/<k>.js, atlas/render/index.py IndexChunk). */
  function addTopTokens() {
    var items = main.querySelectorAll("ol.neighbours li[data-id]"), byChunk = {};
    items.forEach(function (li) {
      var id = +li.getAttribute("data-id");
      if (id < M.first_id || id >= M.first_id + M.n_features) return;
      var k = Math.floor((id - M.first_id) / M.index.rows_per_chunk);
      (byChunk[k] = byChunk[k] || []).push(li);
    });
    Object.keys(byChunk).forEach(function (k) {
      A.load("index/" + k).then(function (c) {
        var tt = A.u16(c.tt);
        byChunk[k].forEach(function (li) {
          var r = +li.getAttribute("data-id") - c.start, box = A.el("span", "ntoks");
          for (var j = 0; j < 3; j++) if (tt[r * 3 + j]) box.appendChild(A.el("span", "chip", c.ts[tt[r * 3 + j] - 1]));
          if (box.firstChild) li.insertBefore(box, li.querySelector(".nlabel"));
        });
      }, function () { /* the top tokens are an extra: the list stands without them */ });
    });
  }
  function svg(tag, attrs) {
    var e = doc.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function svgTitle(parent, text) { var t = svg("title", {}); t.textContent = text; parent.appendChild(t); }

  // ---------------------------------------------------------------- examples
  /** Offsets into a next-token logit array (``tn``/``in``): example e's values start at out[e]
   * (S values per window position with a nonzero quantised activation). */
  function nextStarts(q, n) {
    var W = M.window, S = M.sources.length, out = new Int32Array(n + 1), k = 0;
    for (var e = 0; e < n; e++) {
      out[e] = k;
      for (var p = 0; p < W; p++) if (q[e * W + p]) k += S;
    }
    out[n] = k;
    return out;
  }
  function nextText(nl, off) {
    var S = M.sources.length, parts = [];
    for (var s = 0; s < S; s++) parts.push(signed(nl[off + s]) + (S > 1 ? " " + sourceShort(s) : ""));
    return parts.join(" \u00b7 ");
  }

  var special = {};
  (M.special || []).forEach(function (id) { special[id] = true; });

  function drawExamples(container, tok, q, centre, maxAct, first, count, centreIndex, centreClass, nl, pos) {
    var W = M.window, frag = doc.createDocumentFragment();
    var starts = nl ? nextStarts(q, first + count) : null;
    for (var e = first; e < first + count; e++) {
      var off = starts ? starts[e] : 0;
      var row = A.el("div", "ex");
      row.appendChild(A.el("span", "exval", A.fmt(centre[e])));
      var at = pos ? pos[e] : -1;
      if (pos) {
        var pe = A.el("span", "expos", "@" + at);
        pe.title = "position of the marked token in its sequence (0 = the sequence's first token)";
        row.appendChild(pe);
      }
      var line = A.el("span", "line");
      for (var p = 0; p < W; p++) {
        var id = tok[e * W + p];
        if (!id) continue;
        var qa = q[e * W + p];
        var isMax = p === centreIndex;
        var cls = isMax ? "tok " + centreClass : "tok";
        if (special[id]) cls += " special";
        if (pos && at - centreIndex + p === 0) {
          var st = A.el("span", "seqstart", "start");
          st.title = "start of the sequence";
          line.appendChild(st);
        }
        var span = A.el("span", cls, A.visible(A.tok(id)));
        if (special[id]) span.title = "special token (a document break, BOS or chat-template marker)";
        var value = isMax ? centre[e] : (qa * maxAct) / 255;
        if (qa) span.style.backgroundColor = "rgba(255,112,0," + (0.08 + 0.82 * qa / 255).toFixed(3) + ")";
        span.setAttribute("data-v", qa ? (isMax ? A.fmt(value, 4) : "\u2248" + A.fmt(value)) : "0");
        span.setAttribute("data-t", id);
        if (nl) {
          var nextId = p + 1 < W ? tok[e * W + p + 1] : -1;  // -1: after the window (but in the sequence)
          if (qa) { span.setAttribute("data-n", nextText(nl, off)); off += M.sources.length; }
          else span.setAttribute("data-n", "0");
          if (nextId === 0) span.setAttribute("data-n", "none");
          if (nextId > 0) span.setAttribute("data-nt", nextId);
        }
        line.appendChild(span);
        line.appendChild(doc.createElement("wbr")); // lines break between tokens, not inside them
      }
      row.appendChild(line);
      frag.appendChild(row);
    }
    container.appendChild(frag);
  }

  function drawTop(p) {
    var body = panel("top");
    if (!body) return;
    body.textContent = "";
    var tok = A.ids(p.tt), q = A.u8(p.ta), val = A.f32(p.tv), n = val.length;
    if (!n) { body.appendChild(A.el("p", "empty", "No examples.")); return; }
    var box = A.el("div", "examples");
    drawExamples(box, tok, q, val, p.max, 0, n, M.window_before, "max", p.tn ? A.f16(p.tn) : null,
      p.tp ? A.u32(p.tp) : null);
    body.appendChild(box);
  }

  function drawIntervals(p) {
    var body = panel("intervals");
    if (!body) return;
    body.textContent = "";
    var counts = A.u8(p.ig), tok = A.ids(p.it), q = A.u8(p.ia), val = A.f16(p.iv), nl = p["in"] ? A.f16(p["in"]) : null;
    var starts = [], s = 0;
    for (var g = 0; g < counts.length; g++) { starts.push(s); s += counts[g]; }
    if (!s) { body.appendChild(A.el("p", "empty", "No interval samples.")); return; }
    for (g = counts.length - 1; g >= 0; g--) {
      if (!counts[g]) continue;
      var lo = g * p.iw, hi = Math.min((g + 1) * p.iw, p.max);
      var grp = A.el("div", "group");
      var head = A.el("h3", null, "(" + A.fmt(lo) + ", " + A.fmt(hi) + "]");
      head.appendChild(A.el("span", "sub", " " + Math.round(100 * lo / p.max) + "\u2013" + Math.round(100 * hi / p.max) + "% of max \u00b7 " + counts[g] + " sampled"));
      grp.appendChild(head);
      var box = A.el("div", "examples");
      drawExamples(box, tok, q, val, p.max, starts[g], counts[g], M.window_before, "centre", nl,
        p.ip ? A.u32(p.ip) : null);
      grp.appendChild(box);
      body.appendChild(grp);
    }
  }

  // ---------------------------------------------------------------- charts
  function barChart(body, opts) {
    // opts: bins [{count, title, cls}], ticks [{at (0..1), text}], label
    var Wd = 600, H = 150, pl = 40, pb = 24, pt = 8, pr = 24, n = opts.bins.length;
    var root = svg("svg", { viewBox: "0 0 " + Wd + " " + H, class: "hist", role: "img", "aria-label": opts.label });
    var ymax = 1;
    opts.bins.forEach(function (b) { if (b.count > ymax) ymax = b.count; });
    var iw = Wd - pl - pr, ih = H - pb - pt, bw = iw / Math.max(n, 1);
    root.appendChild(svg("line", { class: "axis", x1: pl, y1: H - pb, x2: Wd - pr, y2: H - pb }));
    var yl = svg("text", { class: "ylab", x: pl - 6, y: pt + 8 }); yl.textContent = A.fmt(ymax, 3); root.appendChild(yl);
    var y0 = svg("text", { class: "ylab", x: pl - 6, y: H - pb }); y0.textContent = "0"; root.appendChild(y0);
    opts.bins.forEach(function (b, i) {
      var h = ih * b.count / ymax;
      var g = svg("g", { class: "bin" });
      g.appendChild(svg("rect", { class: "hit", x: pl + i * bw, y: pt, width: Math.max(bw, 1), height: ih }));
      g.appendChild(svg("rect", { class: "bar " + (b.cls || ""), x: (pl + i * bw + 0.5).toFixed(2), y: (pt + ih - h).toFixed(2), width: Math.max(bw - 1, 0.8).toFixed(2), height: h.toFixed(2) }));
      svgTitle(g, b.title);
      root.appendChild(g);
    });
    opts.ticks.forEach(function (t) {
      var x = svg("text", { class: "xlab", x: (pl + t.at * iw).toFixed(1), y: H - pb + 16 });
      x.textContent = t.text;
      root.appendChild(x);
    });
    body.appendChild(root);
  }

  function drawHistogram(p) {
    var body = panel("histogram");
    if (!body) return;
    body.textContent = "";
    var first = p.h[0], counts = p.h[1];
    if (!counts.length) { body.appendChild(A.el("p", "empty", "No activations.")); return; }
    var hm = M.hist, step = (hm.log10_max - hm.log10_min) / hm.bins;
    var lo = hm.log10_min + first * step, n = counts.length, span = n * step;
    var bins = counts.map(function (c, i) {
      var a = Math.pow(10, lo + i * step), b = Math.pow(10, lo + (i + 1) * step);
      return { count: c, title: "[" + A.fmt(a) + ", " + A.fmt(b) + "): " + c.toLocaleString("en") + " tokens" };
    });
    var ticks = [];
    for (var d = Math.ceil(lo); d <= lo + span + 1e-9; d++) ticks.push({ at: (d - lo) / span, text: A.fmt(Math.pow(10, d)) });
    if (ticks.length < 2) {
      ticks = [{ at: 0, text: A.fmt(Math.pow(10, lo)) }, { at: 1, text: A.fmt(Math.pow(10, lo + span)) }];
    }
    barChart(body, { bins: bins, ticks: ticks, label: "Histogram of activations (log-spaced bins)" });
    body.appendChild(A.el("p", "note", "Activation values of the active tokens, log-spaced bins."));
  }

  function tokenTable(title, ids, vals, cls) {
    var t = A.el("table", "logit " + cls);
    var cap = A.el("caption", null, title);
    t.appendChild(cap);
    var tb = A.el("tbody");
    for (var i = 0; i < ids.length; i++) {
      var tr = A.el("tr");
      var td = A.el("td");
      td.appendChild(A.el("span", "chip", A.chip(A.tok(ids[i]))));
      tr.appendChild(td);
      tr.appendChild(A.el("td", "num", A.fmt(vals[i])));
      tb.appendChild(tr);
    }
    t.appendChild(tb);
    return t;
  }

  function drawLogits(p) {
    var body = panel("logits");
    if (!body) return;
    body.textContent = "";
    p.lg.forEach(function (l, s) {
      var src = M.sources[s] || { model: "source " + s, site: "" };
      var box = A.el("div", "logit-source");
      if (p.lg.length > 1) box.appendChild(A.el("h3", null, src.model + " \u00b7 " + src.site));
      var tables = A.el("div", "tables");
      tables.appendChild(tokenTable("Promoted", A.ids(l.ti), A.f32(l.tv), "pos"));
      tables.appendChild(tokenTable("Suppressed", A.ids(l.bi), A.f32(l.bv), "neg"));
      box.appendChild(tables);
      if (l.h && l.h.length) {
        var n = l.h.length, w = (l.hi - l.lo) / n;
        var bins = l.h.map(function (c, i) {
          var a = l.lo + i * w, b = a + w;
          return { count: c, cls: (a + b) / 2 < 0 ? "neg" : "pos", title: "[" + A.fmt(a) + ", " + A.fmt(b) + "): " + c + " tokens" };
        });
        barChart(box, { bins: bins, ticks: [{ at: 0, text: A.fmt(l.lo) }, { at: 1, text: A.fmt(l.hi) }], label: "Histogram of logit effects" });
      }
      if (l.m !== undefined && l.m !== null) {
        box.appendChild(A.el("p", "note centred", "Centred: the mean effect over the vocabulary (" + signed(l.m) +
          ") is subtracted from every value; it shifts every logit alike and moves no probability."));
      }
      body.appendChild(box);
    });
    var o = outlierNote();
    if (o && M.logits_without_outliers) {
      var held = [];
      p.lg.forEach(function (l, s) {
        if (l.o) held.push(A.fmt(100 * l.o) + "%" + (sourceShort(s) ? " via " + sourceShort(s) : ""));
      });
      body.appendChild(A.el("p", "note outliers", o + " They are left out of these effects: every decoder " +
        "writes to them, and through the unembedding they push the same tokens for nearly every feature." +
        (held.length ? " They hold " + held.join(", ") + " of this decoder's squared norm." : "") +
        " Hovering an example token shows its whole effect, these dimensions included."));
    } else if (o && /^residual/.test(dimWord())) {
      body.appendChild(A.el("p", "note outliers", o + " Their entries count in these effects, and a " +
        "direction shared by many decoders puts the same tokens near the top of many features' lists."));
    }
    if (p.ld) {
      var diff = A.el("div", "logit-source logit-diff");
      diff.appendChild(A.el("h3", null, "B − A: how the effect changes from A's decoder to B's"));
      var t2 = A.el("div", "tables");
      t2.appendChild(tokenTable("Grows in B", A.ids(p.ld.ti), A.f32(p.ld.tv), "pos"));
      t2.appendChild(tokenTable("Shrinks in B", A.ids(p.ld.bi), A.f32(p.ld.bv), "neg"));
      diff.appendChild(t2);
      diff.appendChild(A.el("p", "note", "Centred effect via B's decoder minus centred effect via A's, per token."));
      body.appendChild(diff);
    }
  }

  function drawDecoder(p) {
    var body = panel("decoder");
    if (!body) return;
    body.textContent = "";
    var dn = p.dn, mx = Math.max.apply(null, dn.concat([1e-30]));
    var list = A.el("div", "bars");
    dn.forEach(function (v, s) {
      var src = M.sources[s] || { model: "source " + s, site: "" };
      var row = A.el("div", "barrow");
      row.appendChild(A.el("span", "barname", (dn.length === 2 ? "AB"[s] + " \u00b7 " : "") + src.model + " \u00b7 " + src.site));
      var track = A.el("span", "track");
      var fill = A.el("span", "fill");
      fill.style.width = (100 * v / mx).toFixed(1) + "%";
      track.appendChild(fill);
      row.appendChild(track);
      row.appendChild(A.el("span", "num", A.fmt(v)));
      list.appendChild(row);
    });
    body.appendChild(list);
    if (p.rel !== null && p.rel !== undefined) {
      var th = M.rel_thresholds;
      var g = A.el("div", "gauge");
      var scale = A.el("div", "scale");
      var mark = A.el("span", "mark");
      mark.style.left = (100 * p.rel).toFixed(1) + "%";
      scale.appendChild(mark);
      g.appendChild(scale);
      var cls = ["model-A-only", "shared", "model-B-only"][p.dc] || "no class";
      g.appendChild(A.el("p", "note", "Relative norm " + A.fmt(p.rel) + " (" + cls + "; A-only below " + th[0] + ", B-only above " + th[1] + ") \u00b7 decoder cosine " + A.fmt(p.cos)));
      body.appendChild(g);
    }
  }

  // ---------------------------------------------------------------- hover
  function setupHover() {
    function hide() { tip.hidden = true; }
    main.addEventListener("mouseover", function (e) {
      var t = e.target.closest ? e.target.closest(".tok") : null;
      if (!t) return;
      tip.textContent = "";
      var first = A.el("div", "tipact");
      first.appendChild(A.el("strong", null, t.getAttribute("data-v")));
      var id = +t.getAttribute("data-t");
      first.appendChild(A.el("span", "tiptok", " " + A.chip(A.tok(id))));
      tip.appendChild(first);
      tip.setAttribute("data-t", id);
      A.tokIdAsync(id).then(function (orig) {
        if (orig >= 0 && !tip.hidden && tip.getAttribute("data-t") === String(id)) {
          first.appendChild(A.el("span", "tipid", " id " + orig));
        }
      }, function () { /* the id is optional */ });
      var n = t.getAttribute("data-n");
      if (n !== null) {
        var nt = t.getAttribute("data-nt");
        var next = A.el("div", "tipnext");
        if (n === "none") {
          next.textContent = "\u2192 no next token (end of the sequence)";
        } else {
          next.textContent = "\u2192 next token" + (nt ? " " + A.chip(A.tok(+nt)) : "") + " logit " + (n === "0" ? "0" : n);
          tip.appendChild(next);
          next = A.el("div", "tipdef", "this token's activation \u00d7 the feature's direct effect on that logit");
        }
        tip.appendChild(next);
      }
      tip.hidden = false;
      var r = t.getBoundingClientRect();
      var x = Math.min(r.left, window.innerWidth - tip.offsetWidth - 8);
      tip.style.left = Math.max(4, x) + "px";
      tip.style.top = (r.bottom + 6) + "px";
    });
    main.addEventListener("mouseout", function (e) {
      var t = e.target.closest ? e.target.closest(".tok") : null;
      if (t && !(e.relatedTarget && t.contains(e.relatedTarget))) hide();
    });
    window.addEventListener("scroll", hide, { passive: true });
  }

  // ---------------------------------------------------------------- permalink, embed, keys
  function canonicalUrl() {
    var u = location.href.replace(/[?#].*$/, "");
    if (/^https?:/.test(location.protocol)) u = u.replace(/index\.html$/, "");
    return u;
  }
  function shareBox() {
    var box = doc.getElementById("share");
    if (box) return box;
    box = A.el("div", "share");
    box.id = "share";
    var input = A.el("input");
    input.id = "share-text";
    input.readOnly = true;
    input.setAttribute("aria-label", "Link or embed code");
    var status = A.el("span");
    status.id = "share-status";
    status.setAttribute("role", "status");
    box.appendChild(input);
    box.appendChild(status);
    main.insertBefore(box, main.querySelector("h1"));
    return box;
  }
  function share(text, what) {
    shareBox();
    var input = doc.getElementById("share-text"), status = doc.getElementById("share-status");
    input.value = text;
    input.select();
    function done(ok) { status.textContent = ok ? what + " copied" : "Press Ctrl+C to copy the " + what.toLowerCase(); }
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, function () {
        var ok = false;
        try { ok = doc.execCommand("copy"); } catch (err) { ok = false; }
        done(ok);
      });
    } else {
      var ok = false;
      try { ok = doc.execCommand("copy"); } catch (err) { ok = false; }
      done(ok);
    }
  }
  function setupTools() {
    var copy = doc.getElementById("copy-link"), embed = doc.getElementById("embed-code");
    if (copy) copy.addEventListener("click", function () { share(canonicalUrl(), "Link"); });
    if (embed) embed.addEventListener("click", function () {
      var src = location.href.replace(/[?#].*$/, "") + "?embed";
      share('<iframe src="' + src + '" title="Feature ' + doc.documentElement.getAttribute("data-feature") + '" width="100%" height="640" style="border:0" loading="lazy"></iframe>', "Embed code");
    });
    doc.addEventListener("keydown", function (e) {
      if (A.typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
      var go = null;
      if (e.key === "j" || e.key === "ArrowRight") go = doc.getElementById("next");
      if (e.key === "k" || e.key === "ArrowLeft") go = doc.getElementById("prev");
      if (go) { e.preventDefault(); location.href = go.href + (/embed/.test(doc.documentElement.className) ? "?embed" : ""); }
    });
    if (/(^| )embed( |$)/.test(doc.documentElement.className)) {
      doc.querySelectorAll("main a[href]").forEach(function (a) { a.target = "_blank"; a.rel = "noopener"; });
    }
  }

  function fail(err) {
    var box = doc.getElementById("panels");
    box.textContent = "";
    box.appendChild(A.el("p", "error", "Could not load this feature's data: " + (err && err.message ? err.message : err)));
    if (window.console) console.error(err);
  }

  setupTools();
  setupHover();
  A.decodeBlock("atlas-feature").then(function (p) {
    return A.vocab.ensure(p.vs).then(function () { return p; });
  }).then(function (p) {
    buildPanels(p);
    drawTop(p);
    drawIntervals(p);
    drawHistogram(p);
    drawLogits(p);
    drawDecoder(p);
    drawNeighbours(p);
    drawCorrelatedFeatures(p);
    drawAlignment(p);
    drawCorrelatedNeurons(p);
    addTopTokens();
    A.readyAt = performance.now();
    doc.documentElement.setAttribute("data-ready", "1");
  }).catch(fail);
})();
