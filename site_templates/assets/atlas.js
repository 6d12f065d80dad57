/* Crosscoder Atlas: code shared by every page.
 *
 * - Data: a data script data/<name>.js calls Atlas.chunk(name, base64); Atlas.load(name) injects that
 *   script and resolves with the decoded value. Payloads are msgpack, raw-deflated, base64 (see
 *   atlas/render/chunks.py). Classic scripts are used because fetch(), ES modules and workers are
 *   blocked on file://.
 * - Atlas.meta({...}) is called by data/meta.js with the site constants (Atlas.site).
 * - Tokens: Atlas.vocab.ensure(shards) loads data/vocab/<k>.js; Atlas.tok(siteId) gives the string,
 *   Atlas.tokIdAsync(siteId) the tokenizer id (data/vocab/ids<k>.js, loaded on first hover).
 * - Search: Atlas.search(query) (id, token and label search over data/search/*.js shards) and the
 *   search box in every page's header; "/" focuses it.
 * Untrusted text (tokens, labels) only ever reaches the DOM through textContent.
 * Under Node (tests/js) the same file exports Atlas through module.exports.
 */
(function (global) {
  "use strict";
  var Atlas = global.Atlas || {};
  global.Atlas = Atlas;
  var doc = global.document;
  Atlas.root = doc ? doc.documentElement.getAttribute("data-root") || "" : "";

  // ------------------------------------------------------------------ bytes and payloads
  function b64ToBytes(b64) {
    var bin = global.atob(b64);
    var n = bin.length;
    var out = new Uint8Array(n);
    for (var i = 0; i < n; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function inflateRaw(bytes) {
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
    return new Response(stream).arrayBuffer().then(function (buf) { return new Uint8Array(buf); });
  }

  /** base64 text (msgpack, raw deflate, base64) -> Promise of the decoded value. */
  Atlas.decode = function (b64) {
    try {
      return inflateRaw(b64ToBytes(b64)).then(function (bytes) { return global.MessagePack.decode(bytes); });
    } catch (err) {  // invalid base64: reject like the other decode errors
      return Promise.reject(err);
    }
  };

  /** Decode the payload embedded in <script type="application/x-atlas" id="...">. */
  Atlas.decodeBlock = function (id) {
    var el = doc.getElementById(id);
    if (!el) return Promise.reject(new Error("no data block #" + id));
    return Atlas.decode(el.textContent.trim());
  };

  function view(bin) { return new DataView(bin.buffer, bin.byteOffset, bin.byteLength); }
  function half(h) {
    var s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * f * Math.pow(2, -24);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * (1 + f / 1024) * Math.pow(2, e - 15);
  }
  function reader(width, Arr, get) {
    return function (bin) {
      var n = bin ? bin.byteLength / width : 0, out = new Arr(n);
      if (!n) return out;
      var dv = view(bin);
      for (var i = 0; i < n; i++) out[i] = get(dv, i * width);
      return out;
    };
  }
  /** Packed little-endian arrays in msgpack bin values -> typed arrays. */
  Atlas.u8 = function (bin) { return bin ? new Uint8Array(bin) : new Uint8Array(0); };
  Atlas.i8 = function (bin) { return bin ? new Int8Array(bin.buffer, bin.byteOffset, bin.byteLength) : new Int8Array(0); };
  Atlas.u16 = reader(2, Uint16Array, function (dv, o) { return dv.getUint16(o, true); });
  Atlas.u32 = reader(4, Uint32Array, function (dv, o) { return dv.getUint32(o, true); });
  Atlas.f32 = reader(4, Float32Array, function (dv, o) { return dv.getFloat32(o, true); });
  Atlas.f16 = reader(2, Float32Array, function (dv, o) { return half(dv.getUint16(o, true)); });
  /** Site token ids, 2 or 4 bytes wide as the site's meta says. */
  Atlas.ids = function (bin) {
    return Atlas.site && Atlas.site.vocab.id_bytes === 4 ? Atlas.u32(bin) : Atlas.u16(bin);
  };

  // ------------------------------------------------------------------ data scripts
  var waiting = {}, arrived = {}, loads = {};
  /** The error for a data script that cannot be read (truncated, edited, from another site). */
  function damaged(name, err) {
    return new Error("data/" + name + ".js is damaged or truncated" + (err && err.message ? " (" + err.message + ")" : "") +
      "; rebuild the site or upload it again");
  }
  /** Called by every data script: hands its payload to whoever asked for it. */
  Atlas.chunk = function (name, b64) {
    var w = waiting[name];
    if (w) {
      delete waiting[name];
      Atlas.decode(b64).then(w.resolve, function (err) { w.reject(damaged(name, err)); });
    } else {
      arrived[name] = b64;
    }
  };
  /** Load data/<name>.js once; resolves with its decoded payload. */
  Atlas.load = function (name) {
    if (loads[name]) return loads[name];
    loads[name] = new Promise(function (resolve, reject) {
      if (arrived[name] !== undefined) {
        var b64 = arrived[name];
        delete arrived[name];
        Atlas.decode(b64).then(resolve, function (err) { reject(damaged(name, err)); });
        return;
      }
      waiting[name] = { resolve: resolve, reject: reject };
      var s = doc.createElement("script");
      s.src = Atlas.root + "data/" + name + ".js";
      s.async = true;
      s.onload = function () {  // ran without handing over its payload: a syntax error, or another name
        if (waiting[name]) { delete waiting[name]; reject(damaged(name)); }
      };
      s.onerror = function () {
        delete waiting[name];
        reject(new Error("could not load data/" + name + ".js"));
      };
      doc.head.appendChild(s);
    });
    return loads[name];
  };
  Atlas.meta = function (m) { Atlas.site = m; };

  // ------------------------------------------------------------------ tokens
  var strings = [], origIds = [], shardLoads = {}, idLoads = {};
  Atlas.vocab = {
    /** Load the string shards listed (site ids k << bits ...). */
    ensure: function (shards) {
      var bits = Atlas.site.vocab.shard_bits;
      return Promise.all((shards || []).map(function (k) {
        if (!shardLoads[k]) {
          shardLoads[k] = Atlas.load("vocab/" + k).then(function (sh) {
            var base = sh.k << bits;
            for (var i = 0; i < sh.s.length; i++) strings[base + i] = sh.s[i];
          });
        }
        return shardLoads[k];
      }));
    },
  };
  /** The string of a site token id ("" for 0 or an unloaded id). */
  Atlas.tok = function (id) { var s = strings[id]; return s === undefined ? "" : s; };
  /** Promise of the tokenizer id of a site token id (-1 when unknown); loads data/vocab/ids<k>.js once. */
  Atlas.tokIdAsync = function (id) {
    if (!id) return Promise.resolve(-1);
    var k = id >> Atlas.site.vocab.shard_bits;
    if (!idLoads[k]) {
      idLoads[k] = Atlas.load("vocab/ids" + k).then(function (sh) {
        var base = sh.k << Atlas.site.vocab.shard_bits, o = Atlas.u32(sh.o);
        for (var i = 0; i < o.length; i++) origIds[base + i] = o[i];
      });
    }
    return idLoads[k].then(function () {
      var o = origIds[id];
      return o === undefined || o === 0xffffffff ? -1 : o;
    });
  };

  // ------------------------------------------------------------------ text
  var MARKS = { "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d", "\u007f": "\u2421" };
  /** A token as shown inside example text (same rules as atlas/render/text.py). */
  Atlas.visible = function (s) {
    return s.replace(/[\u0000-\u001f\u007f]/g, function (c) {
      return MARKS[c] || String.fromCharCode(0x2400 + c.charCodeAt(0));
    }).replace(/\p{Cf}/gu, function (c) {
      return "\u27e8U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") + "\u27e9";
    });
  };
  /** A token shown on its own: spaces as "·", empty as "∅". */
  Atlas.chip = function (s) { var v = Atlas.visible(s).replace(/ /g, "\u00b7"); return v || "\u2205"; };

  /** A number with `digits` significant digits (as atlas/render/pages.py fmt_num). */
  Atlas.fmt = function (x, digits) {
    digits = digits || 3;
    if (x === null || x === undefined || !isFinite(x)) return "\u2013";
    if (x === 0) return "0";
    // Python's "{:.{digits}g}": exponent notation when the rounded exponent is < -4 or >= digits
    var parts = Number(x).toExponential(digits - 1).split("e"), exp = parseInt(parts[1], 10), s;
    if (exp < -4 || exp >= digits) {
      var m = parts[0];
      if (m.indexOf(".") >= 0) m = m.replace(/0+$/, "").replace(/\.$/, "");
      return m + "e" + exp;
    }
    s = Number(x).toFixed(Math.max(0, digits - 1 - exp));
    if (s.indexOf(".") >= 0) s = s.replace(/0+$/, "").replace(/\.$/, "");
    return s;
  };
  Atlas.pct = function (x) { return isFinite(x) ? Atlas.fmt(100 * x) + "%" : "\u2013"; };

  /** Make an element with a class and text (textContent only). */
  Atlas.el = function (tag, cls, text) {
    var e = doc.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  Atlas.featureHref = function (id) { return Atlas.root + "f/" + id + "/index.html"; };

  // ------------------------------------------------------------------ search
  var enc = typeof TextEncoder !== "undefined" ? new TextEncoder() : null;
  Atlas.fnv1a = function (s) {
    var bytes = enc.encode(s), h = 0x811c9dc5;
    for (var i = 0; i < bytes.length; i++) {
      h ^= bytes[i];
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return h >>> 0;
  };
  /** The shard of a key: FNV-1a of its first two characters (code points) modulo n (a power of 2). */
  Atlas.shardOf = function (key, n) { return Atlas.fnv1a(Array.from(key).slice(0, 2).join("")) & (n - 1); };
  Atlas.tokenKey = function (s) { return Atlas.visible(s).trim().toLowerCase(); };
  Atlas.labelWords = function (s) {
    var m = s.toLowerCase().match(/[\p{L}\p{N}]+/gu) || [], seen = {}, out = [];
    for (var i = 0; i < m.length; i++) if (!seen[m[i]]) { seen[m[i]] = 1; out.push(m[i]); }
    return out;
  };

  /** Search features by id, token and label. Resolves with [{id, kind, text, score}], best first. */
  Atlas.search = function (query, limit) {
    limit = limit || 100;
    var M = Atlas.site, q = String(query || "").trim(), out = [], jobs = [];
    if (!q) return Promise.resolve(out);
    var idm = /^#?(\d+)$/.exec(q);
    if (idm) {
      var id = parseInt(idm[1], 10);
      if (id >= M.first_id && id < M.first_id + M.n_features) out.push({ id: id, kind: "id", text: "feature " + id, score: 3 });
    }
    var byLabel = [], byToken = [];
    var words = Atlas.labelWords(q);
    if (words.length && M.search.label_shards) {
      jobs.push(Promise.all(words.map(function (w) {
        return Atlas.load("search/l" + Atlas.shardOf(w, M.search.label_shards));
      })).then(function (shards) {
        var sets = words.map(function (w, i) {
          var set = {}, sh = shards[i];
          sh.w.forEach(function (e) {
            if (e[0].indexOf(w) === 0) Atlas.u32(e[1]).forEach(function (f) { set[f] = 1; });
          });
          return set;
        });
        var labels = {};
        shards.forEach(function (sh) { sh.l.forEach(function (e) { labels[e[0]] = e[1]; }); });
        Object.keys(sets[0]).forEach(function (f) {
          for (var i = 1; i < sets.length; i++) if (!sets[i][f]) return;
          byLabel.push({ id: +f, kind: "label", text: labels[f] || "", score: 2 });
        });
        byLabel.sort(function (a, b) { return a.id - b.id; });
      }));
    }
    var key = Atlas.tokenKey(q);
    if (key && M.search.token_shards) {
      jobs.push(Atlas.load("search/t" + Atlas.shardOf(key, M.search.token_shards)).then(function (sh) {
        var exact = [], prefix = [];
        sh.e.forEach(function (e) {
          if (e[0] === key) exact.push(e);
          else if (e[0].indexOf(key) === 0) prefix.push(e);
        });
        prefix.sort(function (a, b) { return a[0].length - b[0].length || (a[0] < b[0] ? -1 : 1); });
        exact.concat(prefix.slice(0, 8)).forEach(function (e, rank) {
          var ids = Atlas.u32(e[2]), counts = Atlas.u8(e[3]);
          var toks = e[1].map(Atlas.chip).join(" ");
          for (var i = 0; i < ids.length; i++) {
            byToken.push({ id: ids[i], kind: "token", text: toks + " \u00d7" + counts[i], score: 1 - rank * 1e-3 - i * 1e-6, token: e[0] });
          }
        });
      }));
    }
    return Promise.all(jobs).then(function () {
      var seen = {};
      out.concat(byLabel, byToken).forEach(function (r) {
        if (!seen[r.id]) { seen[r.id] = r; }
      });
      var all = Object.keys(seen).map(function (k) { return seen[k]; });
      all.sort(function (a, b) { return b.score - a.score || a.id - b.id; });
      return all.slice(0, limit);
    });
  };

  // ------------------------------------------------------------------ page chrome (browser only)
  Atlas.hashParams = function () {
    var h = doc.location.hash.replace(/^#/, "");
    return new URLSearchParams(h);
  };
  Atlas.typing = function (e) {
    var t = e.target, tag = t && t.tagName;
    return tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || (t && t.isContentEditable);
  };

  function setupSearchBox() {
    var input = doc.getElementById("q"), box = doc.getElementById("search-results");
    if (!input || !box) return;
    var form = input.form, timer = null, seq = 0;
    function show(results, q) {
      box.textContent = "";
      box.setAttribute("data-q", q);
      if (!q) { box.hidden = true; return; }
      if (!results.length) {
        box.appendChild(Atlas.el("p", "none", "No feature matches \u201c" + q + "\u201d"));
      }
      results.slice(0, 30).forEach(function (r) {
        var a = Atlas.el("a", "result");
        a.href = Atlas.featureHref(r.id);
        a.appendChild(Atlas.el("span", "rid", r.id));
        a.appendChild(Atlas.el("span", "rkind", r.kind));
        a.appendChild(Atlas.el("span", "rtext", r.text));
        box.appendChild(a);
      });
      box.hidden = false;
    }
    function run() {
      var q = input.value.trim(), mine = ++seq;
      if (!Atlas.site) return;
      Atlas.search(q).then(function (results) {
        if (mine !== seq) return;
        show(results, q);
        if (Atlas.onSearch) Atlas.onSearch(q, results);
      }, function (err) {
        if (mine !== seq) return;
        box.textContent = "";
        box.appendChild(Atlas.el("p", "none", String(err && err.message || err)));
        box.hidden = false;
      });
    }
    Atlas.runSearch = function (q) { input.value = q; run(); };
    input.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(run, 120); });
    input.addEventListener("focus", function () { if (input.value.trim()) run(); });
    input.addEventListener("keydown", function (e) {
      if (e.key === "Escape") { box.hidden = true; input.blur(); }
      if (e.key === "ArrowDown") { var first = box.querySelector("a"); if (first) { e.preventDefault(); first.focus(); } }
    });
    box.addEventListener("keydown", function (e) {
      var a = doc.activeElement;
      if (e.key === "ArrowDown" && a.nextElementSibling) { e.preventDefault(); a.nextElementSibling.focus(); }
      if (e.key === "ArrowUp") { e.preventDefault(); (a.previousElementSibling || input).focus(); }
      if (e.key === "Escape") { box.hidden = true; input.focus(); }
    });
    doc.addEventListener("click", function (e) {
      if (!form.contains(e.target)) box.hidden = true;
    });
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var q = input.value.trim();
      if (!q) return;
      Atlas.search(q).then(function (results) {
        if (results.length === 1 || (results.length && results[0].kind === "id")) {
          doc.location.href = Atlas.featureHref(results[0].id);
        } else if (doc.documentElement.getAttribute("data-page") !== "index") {
          doc.location.href = Atlas.root + "index.html#q=" + encodeURIComponent(q);
        } else {
          show(results, q);
          if (Atlas.onSearch) Atlas.onSearch(q, results);
        }
      });
    });
    doc.addEventListener("keydown", function (e) {
      if (e.key === "/" && !Atlas.typing(e) && !e.ctrlKey && !e.metaKey && !e.altKey) {
        e.preventDefault();
        input.focus();
        input.select();
      }
    });
  }

  if (doc) {
    if (doc.readyState === "loading") doc.addEventListener("DOMContentLoaded", setupSearchBox);
    else setupSearchBox();
  }

  if (typeof module === "object" && module.exports) module.exports = Atlas;
})(typeof window !== "undefined" ? window : globalThis);
