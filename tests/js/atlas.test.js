// The browser reader (site_templates/assets/atlas.js) against the Python writer (atlas/render/chunks.py).
// Run by tests/test_render_js.py: `node --test tests/js/`, with ATLAS_JS_FIXTURE naming a folder that
// Python filled with data scripts, a rendered feature page and expected.json.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const vm = require("node:vm");

const repo = path.resolve(__dirname, "..", "..");
globalThis.MessagePack = require(path.join(repo, "site_templates", "vendor", "msgpack", "msgpack.min.js"));
const Atlas = require(path.join(repo, "site_templates", "assets", "atlas.js"));

const fixture = process.env.ATLAS_JS_FIXTURE;
const expected = fixture ? JSON.parse(fs.readFileSync(path.join(fixture, "expected.json"), "utf8")) : null;

function runDataScript(file) {
  let call = null;
  vm.runInNewContext(fs.readFileSync(file, "utf8"), { Atlas: { chunk: (name, b64) => { call = { name, b64 }; } } });
  assert.ok(call, "the data script calls Atlas.chunk");
  return call;
}

const readers = { u1: Atlas.u8, u2: Atlas.u16, u4: Atlas.u32, f2: Atlas.f16, f4: Atlas.f32, i1: Atlas.i8 };

test("fixture present", { skip: !fixture && "ATLAS_JS_FIXTURE not set (run through pytest)" }, () => {
  assert.ok(fs.existsSync(path.join(fixture, "expected.json")));
});

test("decodes a data script written by Python", { skip: !fixture }, async () => {
  const call = runDataScript(path.join(fixture, "sample.js"));
  assert.equal(call.name, "sample");
  const obj = await Atlas.decode(call.b64);
  const exp = expected.sample;
  assert.equal(obj.int, exp.int);
  assert.equal(obj.neg, exp.neg);
  assert.ok(Math.abs(obj.float - exp.float) < 1e-6);
  assert.equal(obj.none, null);
  assert.deepEqual(obj.strings, exp.strings);
  assert.deepEqual(obj.nested, exp.nested);
  for (const [key, kind] of Object.entries(exp.bins_kind)) {
    const got = Array.from(readers[kind](obj[key]));
    const want = exp.bins[key];
    assert.equal(got.length, want.length, key);
    want.forEach((w, i) => {
      if (w === null) assert.ok(Number.isNaN(got[i]), `${key}[${i}] is NaN`);
      else assert.ok(Math.abs(got[i] - w) <= Math.abs(w) * 1e-3 + 1e-7, `${key}[${i}]: ${got[i]} vs ${w}`);
    });
  }
});

test("decodes the payload embedded in a rendered feature page", { skip: !fixture }, async () => {
  const html = fs.readFileSync(path.join(fixture, "feature.html"), "utf8");
  const m = /<script type="application\/x-atlas" id="atlas-feature">([A-Za-z0-9+/=]+)<\/script>/.exec(html);
  assert.ok(m, "the page embeds its payload");
  const p = await Atlas.decode(m[1]);
  const exp = expected.feature;
  Atlas.site = { vocab: { id_bytes: exp.id_bytes } };
  assert.equal(p.id, exp.id);
  assert.ok(Math.abs(p.max - exp.max) < 1e-5);
  assert.deepEqual(Array.from(Atlas.ids(p.tt)), exp.tt);
  assert.deepEqual(Array.from(Atlas.u8(p.ta)), exp.ta);
  assert.deepEqual(Array.from(Atlas.u8(p.ig)), exp.ig);
  assert.deepEqual(p.vs, exp.vs);
  assert.deepEqual(p.h, exp.h);
  Array.from(Atlas.f16(p.iv)).forEach((v, i) => assert.ok(Math.abs(v - exp.iv[i]) < 1e-6));
});

test("decodes the optional statistics of a feature payload and the index classes", { skip: !fixture }, async () => {
  const html = fs.readFileSync(path.join(fixture, "feature.html"), "utf8");
  const m = /<script type="application\/x-atlas" id="atlas-feature">([A-Za-z0-9+/=]+)<\/script>/.exec(html);
  const p = await Atlas.decode(m[1]);
  const exp = expected.feature;
  assert.equal(p.dc, exp.dc);
  for (const [key, [kind, want]] of Object.entries(exp.optional)) {
    assert.ok(p[key] instanceof Uint8Array, `${key} is a bin value`);
    const got = Array.from(readers[kind](p[key]));
    assert.equal(got.length, want.length, key);
    want.forEach((w, i) => {
      if (w === null) assert.ok(Number.isNaN(got[i]), `${key}[${i}] is NaN`);
      else assert.ok(Math.abs(got[i] - w) <= Math.abs(w) * 1e-6 + 1e-12, `${key}[${i}]: ${got[i]} vs ${w}`);
    });
  }
  for (const [key, [kind, want]] of Object.entries(exp.ld)) {
    const got = Array.from(kind === "ids" ? Atlas.ids(p.ld[key]) : readers[kind](p.ld[key]));
    assert.equal(got.length, want.length, "ld." + key);
    want.forEach((w, i) => assert.ok(Math.abs(got[i] - w) <= Math.abs(w) * 1e-6 + 1e-12, `ld.${key}[${i}]`));
  }
  assert.deepEqual(p.lg.map((l) => l.m), exp.lg_mean);
  assert.equal(p.na, exp.na);
  // one value per source at each window position with a nonzero quantised activation
  assert.equal(exp.optional.tn[1].length, exp.n_active_ta * exp.n_sources);
  assert.equal(exp.optional.in[1].length, exp.n_active_ia * exp.n_sources);
  const chunk = await Atlas.decode(runDataScript(path.join(fixture, "index0.js")).b64);
  assert.deepEqual(Array.from(Atlas.i8(chunk.dc)), expected.index_dc);
});

test("decodes the per-corpus densities and special-token shares of an index chunk", { skip: !fixture }, async () => {
  const chunk = await Atlas.decode(runDataScript(path.join(fixture, "index_corpora0.js")).b64);
  const exp = expected.index_corpora;
  const cd = Array.from(Atlas.f32(chunk.cd)), sp = Array.from(Atlas.f32(chunk.sp));
  assert.equal(cd.length, chunk.n * exp.n_corpora);
  assert.equal(sp.length, chunk.n);
  for (const [got, want] of [[cd, exp.cd], [sp, exp.sp]]) {
    want.forEach((w, i) => {
      if (w === null) assert.ok(Number.isNaN(got[i]), `[${i}] is NaN`);
      else assert.ok(Math.abs(got[i] - w) <= Math.abs(w) * 1e-6, `[${i}]: ${got[i]} vs ${w}`);
    });
  }
  assert.ok(sp.some((v) => v > 0) && cd.some((v) => v > 0));
});

test("vocab shard strings and token ids survive the round trip", { skip: !fixture }, async () => {
  const sh = await Atlas.decode(runDataScript(path.join(fixture, "vocab0.js")).b64);
  assert.deepEqual(sh.s, expected.vocab0.s);
  const ids = await Atlas.decode(runDataScript(path.join(fixture, "ids0.js")).b64);
  assert.deepEqual(Array.from(Atlas.u32(ids.o)), expected.vocab0.o);
});

test("search keys and shards agree with Python", { skip: !fixture }, () => {
  for (const c of expected.search.tokens) {
    assert.equal(Atlas.tokenKey(c.raw), c.key, JSON.stringify(c.raw));
  }
  for (const c of expected.search.shards) {
    assert.equal(Atlas.fnv1a(Array.from(c.key).slice(0, 2).join("")), c.hash, c.key);
    assert.equal(Atlas.shardOf(c.key, c.n), c.shard, c.key);
  }
  for (const c of expected.search.labels) {
    assert.deepEqual(Atlas.labelWords(c.text), c.words, c.text);
  }
});

test("number formatting agrees with Python", { skip: !fixture }, () => {
  for (const c of expected.fmt) {
    assert.equal(Atlas.fmt(c.x, c.digits), c.text, `${c.x} (${c.digits})`);
  }
  for (const c of expected.visible) {
    assert.equal(Atlas.visible(c.raw), c.visible);
    assert.equal(Atlas.chip(c.raw), c.chip);
  }
});
