/* Crosscoder Atlas: the index page (index.html).
 *
 * Loads every data/index/<k>.js chunk (schema: atlas/render/index.py IndexChunk) into typed arrays and
 * shows them in a virtualised table: only the rows in view exist in the DOM, so 100k rows scroll
 * smoothly. Sorting (click a header), filters (density range, decoder class, alive/dead, bins from
 * the model-diff page) and search results all work on an index array of the rows. The decoder class
 * filter and the class badges read the same per-feature model-diff class (chunk key dc). Sites with
 * named corpora (meta.corpora) get a density column per corpus (chunk key cd) and a density range
 * filter on one of them; sites with special-token counts (meta.has_special) a column of the share of
 * activations on special tokens (chunk key sp) and a filter on its maximum.
 *
 * State lives in the URL hash, e.g. #rel=0.40-0.45&cos=0.90-1.00&peak=3&dens=1e-5-1e-3&cls=shared
 * &alive=alive&q=the&sort=-density (a bin "lo-hi" keeps lo <= x < hi, and x = hi for the last bin);
 * with latent scaling (meta.latent_scaling) also nue=MAX and nur=MAX (at most this ν^ε / ν^r);
 * &cdens=python:1e-3-1 (density on the corpus "python" from 1e-3 to 1), &smax=0.5 (at most half of the
 * activations on special tokens).
 */
(function () {
  "use strict";
  var A = window.Atlas, M = A.site, doc = document;
  var ROW_H = 30, OVERSCAN = 12;
  var table = doc.getElementById("table"), body = doc.getElementById("rows"), countEl = doc.getElementById("count");
  var heads = Array.prototype.slice.call(doc.querySelectorAll("#table thead th[data-key]"));
  var ctl = {
    dmin: doc.getElementById("f-dmin"), dmax: doc.getElementById("f-dmax"), cls: doc.getElementById("f-cls"),
    alive: doc.getElementById("f-alive"), nue: doc.getElementById("f-nue"), nur: doc.getElementById("f-nur"), bins: doc.getElementById("f-bins"), reset: doc.getElementById("f-reset"),
    corpus: doc.getElementById("f-corpus"), cmin: doc.getElementById("f-cmin"), cmax: doc.getElementById("f-cmax"),
    smax: doc.getElementById("f-smax"),
  };
  var CORPORA = (M.corpora || []).map(function (c) { return c.name; });
  var N = M.n_features, th = M.rel_thresholds;
  var CLS = { a: 0, shared: 1, b: 2 }, CLS_KEY = ["a", "shared", "b"], CLS_TEXT = ["A-only", "shared", "B-only"];
  var col = null; // columns once loaded
  var order = null; // Int32Array of row indices in view
  var state = null;
  var searchIds = null; // {ids: Int32Array ranked, q}

  function emptyState() {
    return { sort: "id", desc: false, dmin: null, dmax: null, cls: "", alive: "", rel: null, cos: null, peak: null, q: "",
      nue: null, nur: null, corpus: CORPORA.length ? CORPORA[0] : "", cmin: null, cmax: null, smax: null };
  }

  function parseRange(s) {
    if (!s) return null;
    // two decimal numbers (an exponent allowed: 1e-3-1 is 0.001 to 1) joined by "-"
    var m = /^(-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)-(-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$/.exec(s);
    if (!m) return null;
    var lo = parseFloat(m[1]), hi = parseFloat(m[2]);
    return isFinite(lo) && isFinite(hi) ? [lo, hi, m[1], m[2]] : null;
  }
  function readHash() {
    var p = A.hashParams(), st = emptyState();
    var sort = p.get("sort");
    if (sort) { st.desc = sort.charAt(0) === "-"; st.sort = sort.replace(/^-/, ""); }
    var dens = parseRange(p.get("dens"));
    if (dens) { st.dmin = dens[0]; st.dmax = dens[1]; }
    st.cls = p.get("cls") || "";
    st.alive = p.get("alive") || "";
    st.rel = parseRange(p.get("rel"));
    st.cos = parseRange(p.get("cos"));
    var peak = p.get("peak");
    st.peak = peak !== null && peak !== "" && isFinite(+peak) ? +peak : null;
    st.q = p.get("q") || new URLSearchParams(location.search).get("q") || "";
    if (M.latent_scaling) {  // a site without ν has no such filter
      ["nue", "nur"].forEach(function (k) { var v = p.get(k); st[k] = v !== null && v !== "" && isFinite(+v) ? +v : null; });
    }
    var cd = /^(.*):(.*)$/.exec(p.get("cdens") || ""), cr = cd ? parseRange(cd[2]) : null;
    if (cd && cr && CORPORA.indexOf(cd[1]) >= 0) { st.corpus = cd[1]; st.cmin = cr[0]; st.cmax = cr[1]; }
    var smax = p.get("smax");
    st.smax = M.has_special && smax !== null && smax !== "" && isFinite(+smax) ? +smax : null;
    return st;
  }
  function writeHash() {
    var p = new URLSearchParams();
    if (state.q) p.set("q", state.q);
    if (state.rel) p.set("rel", state.rel[2] + "-" + state.rel[3]);
    if (state.cos) p.set("cos", state.cos[2] + "-" + state.cos[3]);
    if (state.peak !== null) p.set("peak", String(state.peak));
    if (state.dmin !== null || state.dmax !== null) p.set("dens", (state.dmin === null ? 0 : state.dmin) + "-" + (state.dmax === null ? 1 : state.dmax));
    if (state.cls) p.set("cls", state.cls);
    if (state.alive) p.set("alive", state.alive);
    if (state.nue !== null) p.set("nue", String(state.nue));
    if (state.nur !== null) p.set("nur", String(state.nur));
    if (state.cmin !== null || state.cmax !== null) p.set("cdens", state.corpus + ":" + (state.cmin === null ? 0 : state.cmin) + "-" + (state.cmax === null ? 1 : state.cmax));
    if (state.smax !== null) p.set("smax", String(state.smax));
    if (state.sort !== "id" || state.desc) p.set("sort", (state.desc ? "-" : "") + state.sort);
    var h = p.toString();
    var url = location.href.replace(/#.*$/, "") + (h ? "#" + h : "");
    try { history.replaceState(null, "", url); } catch (e) { /* some file:// setups refuse */ }
  }
  function syncControls() {
    ctl.dmin.value = state.dmin === null ? "" : String(state.dmin);
    ctl.dmax.value = state.dmax === null ? "" : String(state.dmax);
    if (ctl.cls) ctl.cls.value = state.cls;
    ctl.alive.value = state.alive;
    if (ctl.nue) ctl.nue.value = state.nue === null ? "" : String(state.nue);
    if (ctl.nur) ctl.nur.value = state.nur === null ? "" : String(state.nur);
    if (ctl.corpus) {
      ctl.corpus.value = state.corpus;
      ctl.cmin.value = state.cmin === null ? "" : String(state.cmin);
      ctl.cmax.value = state.cmax === null ? "" : String(state.cmax);
    }
    if (ctl.smax) ctl.smax.value = state.smax === null ? "" : String(state.smax);
    ctl.bins.textContent = "";
    var parts = [];
    if (state.rel) parts.push("rel. norm " + state.rel[2] + "\u2013" + state.rel[3]);
    if (state.cos) parts.push("cosine " + state.cos[2] + "\u2013" + state.cos[3]);
    if (state.peak !== null) parts.push("peak source " + state.peak);
    if (parts.length) {
      ctl.bins.appendChild(A.el("span", null, parts.join(", ")));
      var x = A.el("button", "clear", "\u00d7");
      x.type = "button";
      x.title = "Clear the bin filter";
      x.addEventListener("click", function () { state.rel = state.cos = null; state.peak = null; update(); });
      ctl.bins.appendChild(x);
    }
    ctl.bins.hidden = !parts.length;
    heads.forEach(function (h) {
      var k = h.getAttribute("data-key");
      if (k === state.sort) h.setAttribute("aria-sort", state.desc ? "descending" : "ascending");
      else h.removeAttribute("aria-sort");
    });
  }

  // ---------------------------------------------------------------- data
  function load() {
    var n = M.index.n_chunks, jobs = [];
    for (var k = 0; k < n; k++) jobs.push(A.load("index/" + k));
    return Promise.all(jobs).then(function (chunks) {
      var c = {
        id: new Int32Array(N), density: new Float32Array(N), max: new Float32Array(N), rel: new Float32Array(N),
        cos: new Float32Array(N), peak: new Uint16Array(N), cls: new Int8Array(N), tokens: new Array(N),
        label: M.has_labels ? new Array(N) : null, special: new Float32Array(N).fill(NaN),
        nue: M.latent_scaling ? new Float32Array(N) : null, nur: M.latent_scaling ? new Float32Array(N) : null,
      };
      var C = CORPORA.length;
      for (var j = 0; j < C; j++) c["cd" + j] = new Float32Array(N);
      var r = 0;
      chunks.forEach(function (ch) {
        var d = A.f32(ch.d), m = A.f32(ch.m), rel = A.f32(ch.r), cos = A.f32(ch.c), pk = A.u16(ch.p), tt = A.u16(ch.tt);
        var dc = A.i8(ch.dc), cd = C && ch.cd ? A.f32(ch.cd) : null, sp = ch.sp ? A.f32(ch.sp) : null;
        var ne = c.nue && ch.ne ? A.f32(ch.ne) : null, nr = c.nur && ch.nr ? A.f32(ch.nr) : null;
        for (var i = 0; i < ch.n; i++, r++) {
          if (cd) for (var q = 0; q < C; q++) c["cd" + q][r] = cd[i * C + q];
          if (sp) c.special[r] = sp[i];
          c.id[r] = ch.start + i;
          c.density[r] = d[i]; c.max[r] = m[i]; c.rel[r] = rel[i]; c.cos[r] = cos[i]; c.peak[r] = pk[i];
          c.cls[r] = i < dc.length ? dc[i] : -1;
          var toks = [];
          for (var j = 0; j < 3; j++) { var t = tt[i * 3 + j]; if (t) toks.push(ch.ts[t - 1]); }
          c.tokens[r] = toks;
          if (c.label) c.label[r] = ch.lb ? ch.lb[i] : "";
          if (c.nue) { c.nue[r] = ne ? ne[i] : NaN; c.nur[r] = nr ? nr[i] : NaN; }
        }
      });
      return c;
    });
  }

  // ---------------------------------------------------------------- filter + sort
  function inBin(x, b) { return x >= b[0] && (x < b[1] || (x === b[1] && (b[1] >= 1))); }
  function compute() {
    var keep = new Int32Array(N), n = 0;
    var rows = null;
    if (state.q && searchIds) {
      rows = searchIds.ids;
    }
    var src = rows || null, total = src ? src.length : N;
    var ci = CORPORA.indexOf(state.corpus), cdens = ci >= 0 && (state.cmin !== null || state.cmax !== null) ? col["cd" + ci] : null;
    for (var t = 0; t < total; t++) {
      var i = src ? src[t] - M.first_id : t;
      if (i < 0 || i >= N) continue;
      var d = col.density[i];
      if (state.dmin !== null && !(d >= state.dmin)) continue;
      if (state.dmax !== null && !(d <= state.dmax)) continue;
      if (state.alive === "alive" && !(d > 0)) continue;
      if (state.alive === "dead" && d > 0) continue;
      var r = col.rel[i];
      if (state.cls && !(d > 0 && col.cls[i] === CLS[state.cls])) continue;
      if (state.rel && !(d > 0 && inBin(r, state.rel))) continue;
      if (state.cos && !(d > 0 && inBin(col.cos[i], state.cos))) continue;
      if (state.peak !== null && !(d > 0 && col.peak[i] === state.peak)) continue;
      if (state.nue !== null && !(col.nue && col.nue[i] <= state.nue)) continue;
      if (state.nur !== null && !(col.nur && col.nur[i] <= state.nur)) continue;
      if (cdens) {
        var cv = cdens[i];
        if (state.cmin !== null && !(cv >= state.cmin)) continue;
        if (state.cmax !== null && !(cv <= state.cmax)) continue;
      }
      if (state.smax !== null && !(col.special[i] <= state.smax)) continue;
      keep[n++] = i;
    }
    order = keep.slice(0, n);
    var key = state.sort, dir = state.desc ? -1 : 1;
    if (rows && key === "id" && !state.desc) return; // search results keep their rank
    var arr = Array.prototype.slice.call(order);
    var v = key === "label" ? col.label : key === "tokens" ? null : col[key];
    if (!v) return;
    if (key === "label") {
      arr.sort(function (a, b) {
        var x = v[a] || "", y = v[b] || "";
        if (!x !== !y) return x ? -1 : 1; // empty labels last
        return (x < y ? -1 : x > y ? 1 : 0) * dir || a - b;
      });
    } else {
      arr.sort(function (a, b) {
        var x = v[a], y = v[b], nx = x !== x, ny = y !== y;
        if (nx || ny) return nx === ny ? a - b : nx ? 1 : -1; // NaN last
        return (x - y) * dir || a - b;
      });
    }
    order = Int32Array.from(arr);
  }

  // ---------------------------------------------------------------- virtual table
  var drawn = [-1, -1], pending = false;
  function cell(tr, cls, text) { var td = A.el("td", cls, text); tr.appendChild(td); return td; }
  function rowEl(i) {
    var tr = A.el("tr");
    var id = col.id[i];
    var td = A.el("td", "num");
    var a = A.el("a", null, id);
    a.href = A.featureHref(id);
    td.appendChild(a);
    tr.appendChild(td);
    if (col.label) cell(tr, "label", col.label[i]);
    cell(tr, "num", A.pct(col.density[i]));
    cell(tr, "num", A.fmt(col.max[i]));
    var tk = A.el("td", "toks");
    col.tokens[i].forEach(function (s) { tk.appendChild(A.el("span", "chip", s)); });
    tr.appendChild(tk);
    if (M.sources.length === 2) {
      var k = col.cls[i], kc = cell(tr, "cls");
      if (k >= 0 && k <= 2) {
        var badge = A.el("span", "badge diff-" + CLS_KEY[k], CLS_TEXT[k]);
        badge.title = k === 0 ? "model-A-only: r < " + th[0] : k === 2 ? "model-B-only: r > " + th[1] : "shared: " + th[0] + " \u2264 r \u2264 " + th[1];
        kc.appendChild(badge);
      }
      var rc = cell(tr, "num rel", A.fmt(col.rel[i], 2));
      if (k >= 0 && k <= 2) rc.className += " " + CLS_KEY[k];
      cell(tr, "num", A.fmt(col.cos[i], 2));
    }
    if (col.nue) { cell(tr, "num", A.fmt(col.nue[i], 2)); cell(tr, "num", A.fmt(col.nur[i], 2)); }
    if (M.sources.length > 2) cell(tr, "num", col.density[i] > 0 ? String(col.peak[i]) : "\u2013");
    for (var q = 0; q < CORPORA.length; q++) cell(tr, "num", A.pct(col["cd" + q][i]));
    if (M.has_special) cell(tr, "num", A.pct(col.special[i]));
    if (!(col.density[i] > 0)) tr.className = "dead";
    return tr;
  }
  function spacer(h) {
    var tr = A.el("tr", "spacer");
    var td = A.el("td");
    td.colSpan = heads.length;
    tr.appendChild(td);
    tr.style.height = h + "px";
    return tr;
  }
  function draw(force) {
    pending = false;
    if (!order) return;
    var n = order.length;
    var headH = table.querySelector("thead").offsetHeight || ROW_H;
    var top = Math.max(0, table.scrollTop - headH);
    var first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    var last = Math.min(n, Math.ceil((top + table.clientHeight) / ROW_H) + OVERSCAN);
    if (!force && first === drawn[0] && last === drawn[1]) return;
    drawn = [first, last];
    var frag = doc.createDocumentFragment();
    frag.appendChild(spacer(first * ROW_H));
    for (var r = first; r < last; r++) frag.appendChild(rowEl(order[r]));
    frag.appendChild(spacer((n - last) * ROW_H));
    body.textContent = "";
    body.appendChild(frag);
  }
  function schedule() { if (!pending) { pending = true; requestAnimationFrame(function () { draw(false); }); } }

  function update(keepScroll) {
    syncControls();
    writeHash();
    if (!col) return;
    compute();
    countEl.textContent = order.length.toLocaleString("en") + " of " + N.toLocaleString("en") + " features" + (state.q ? " matching \u201c" + state.q + "\u201d" : "");
    if (!keepScroll) table.scrollTop = 0;
    draw(true);
  }

  // ---------------------------------------------------------------- events
  function num(input) {
    var s = input.value.trim();
    if (!s) return null;
    var x = parseFloat(s.replace(/%$/, ""));
    if (!isFinite(x)) return null;
    return /%$/.test(s) ? x / 100 : x;
  }
  ctl.dmin.addEventListener("change", function () { state.dmin = num(ctl.dmin); update(); });
  ctl.dmax.addEventListener("change", function () { state.dmax = num(ctl.dmax); update(); });
  if (ctl.cls) ctl.cls.addEventListener("change", function () { state.cls = ctl.cls.value; update(); });
  ctl.alive.addEventListener("change", function () { state.alive = ctl.alive.value; update(); });
  if (ctl.nue) ctl.nue.addEventListener("change", function () { state.nue = num(ctl.nue); update(); });
  if (ctl.nur) ctl.nur.addEventListener("change", function () { state.nur = num(ctl.nur); update(); });
  if (ctl.corpus) {
    ctl.corpus.addEventListener("change", function () { state.corpus = ctl.corpus.value; update(); });
    ctl.cmin.addEventListener("change", function () { state.cmin = num(ctl.cmin); update(); });
    ctl.cmax.addEventListener("change", function () { state.cmax = num(ctl.cmax); update(); });
  }
  if (ctl.smax) ctl.smax.addEventListener("change", function () { state.smax = num(ctl.smax); update(); });
  ctl.reset.addEventListener("click", function () {
    state = emptyState();
    searchIds = null;
    var q = doc.getElementById("q");
    if (q) q.value = "";
    update();
  });
  doc.getElementById("filters").addEventListener("submit", function (e) { e.preventDefault(); });
  heads.forEach(function (h) {
    var b = h.querySelector("button");
    if (!b) return;
    b.addEventListener("click", function () {
      var k = h.getAttribute("data-key");
      if (state.sort === k) state.desc = !state.desc;
      else { state.sort = k; state.desc = k !== "id" && k !== "label"; }
      update();
    });
  });
  table.addEventListener("scroll", schedule, { passive: true });
  window.addEventListener("resize", schedule);
  window.addEventListener("hashchange", function () {
    var before = state.q;
    state = readHash();
    if (state.q !== before) startSearch();
    update();
  });

  A.onSearch = function (q, results) {
    state.q = q;
    searchIds = q ? { q: q, ids: Int32Array.from(results.map(function (r) { return r.id; })) } : null;
    update();
  };
  function startSearch() {
    if (!state.q) { searchIds = null; return; }
    if (A.runSearch) A.runSearch(state.q);
  }

  state = readHash();
  syncControls();
  load().then(function (c) {
    col = c;
    if (state.q) startSearch();
    update(true);
    A.readyAt = performance.now();
    doc.documentElement.setAttribute("data-ready", "1");
  }, function (err) {
    countEl.textContent = "Could not load the feature table: " + (err && err.message ? err.message : err);
    if (window.console) console.error(err);
  });
})();
