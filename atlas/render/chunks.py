"""Binary payloads of the site: msgpack, raw-deflated, base64, wrapped in classic scripts.

Every data file of the site is a msgpack value, compressed with raw DEFLATE (``zlib`` with
``wbits=-15``; the browser inflates it with ``DecompressionStream("deflate-raw")``) and base64-encoded.
It reaches the browser in one of two wrappers, both readable from ``file://`` where ``fetch()``, ES
modules and workers are blocked:

- a data script file ``data/<name>.js`` holding one call ``Atlas.chunk("<name>","<base64>");``
  (:func:`chunk_script`), loaded by injecting a ``<script>`` element (``Atlas.load(name)`` in
  ``assets/atlas.js``);
- a non-executing block inside a page, ``<script type="application/x-atlas" id="...">base64</script>``
  (:func:`encode_payload`), read with ``Atlas.decodeBlock(id)``.

Arrays travel as msgpack ``bin`` values holding packed little-endian numbers (:func:`pack`); the JS side
reads them with ``Atlas.u16``/``u32``/``f16``/``f32``. Maps are written with their keys in a fixed order,
so the same data always gives the same bytes.
"""

from __future__ import annotations

import base64
import zlib

import msgpack
import numpy as np

PAGE_LEVEL = 1  # feature pages: many small payloads, speed matters (level 6 is ~2.4% smaller, 1.8x slower)
CHUNK_LEVEL = 6  # site-wide data scripts: few, downloaded often

_LE = {"u1": "u1", "u2": "<u2", "u4": "<u4", "f2": "<f2", "f4": "<f4", "i1": "i1", "i4": "<i4"}


def pack(values, kind: str) -> bytes:
    """``values`` as packed little-endian ``kind`` (u1, u2, u4, i1, i4, f2, f4) bytes."""
    return np.ascontiguousarray(values, dtype=_LE[kind]).tobytes()


def to_msgpack(obj) -> bytes:
    """msgpack bytes of ``obj`` (floats as float32, bytes as bin, strings as str)."""
    return msgpack.packb(obj, use_bin_type=True, use_single_float=True)


def deflate(data: bytes, level: int = CHUNK_LEVEL) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15, 8)
    return c.compress(data) + c.flush()


def inflate(data: bytes) -> bytes:
    return zlib.decompress(data, -15)


def encode_payload(obj, level: int = CHUNK_LEVEL) -> str:
    """The base64 text of ``obj`` (msgpack, raw deflate at ``level``, base64)."""
    return base64.b64encode(deflate(to_msgpack(obj), level)).decode("ascii")


def decode_payload(text: str):
    """Inverse of :func:`encode_payload` (used by tests and :mod:`atlas.render.verify`)."""
    return msgpack.unpackb(inflate(base64.b64decode(text)), raw=False)


def chunk_script(name: str, obj) -> bytes:
    """The bytes of the data script ``data/<name>.js`` carrying ``obj``."""
    return f'Atlas.chunk("{name}","{encode_payload(obj)}");\n'.encode("ascii")


def read_chunk_script(data: bytes):
    """``(name, obj)`` of a data script written by :func:`chunk_script`."""
    text = data.decode("ascii").strip()
    prefix = 'Atlas.chunk("'
    if not text.startswith(prefix) or not text.endswith('");'):
        raise ValueError("not an atlas data script")
    name, _, b64 = text[len(prefix):-3].partition('","')
    return name, decode_payload(b64)
