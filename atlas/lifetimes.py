"""Python's cycle collector and the objects that live as long as a command does.

A full collection of the cycle collector walks every tracked object. Once torch, transformers and
NNsight are imported and a model is loaded, that is ~370k objects: each of the handful of full
collections an ``atlas build`` triggers on the way costs ~0.1 s, and the final one at interpreter exit
~1 s (measured in ``bench/fixed_costs.py``), all spent on modules, models and tokenizers that stay alive
until the process ends anyway. Forked page writers (:mod:`atlas.render.site`) that run a collection
also touch every inherited object's header, which copies the parent's memory pages.

:func:`paused` turns the collector off while a command imports its libraries and loads its inputs,
which creates hundreds of thousands of long-lived objects and almost no garbage (without it, the
imports of an ``atlas build`` ran six full collections). :func:`frozen` moves the objects alive when it is entered into the collector's permanent generation
(``gc.freeze``; objects are still freed by reference counting, and everything created later is
collected as usual) and gives them back to the collector when the outermost block ends, so that
in-process callers (tests, notebooks) keep normal collection. :func:`freeze_for_exit` is for the
command line once its command is done: what the exit collection would free, the OS frees.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

_depth = 0


@contextmanager
def frozen():
    """Freeze the objects alive now (again, when nested: what was created since is frozen too); the
    outermost block's end unfreezes them all."""
    global _depth
    gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()


@contextmanager
def paused():
    """No automatic collection inside the block (explicit ``gc.collect`` calls still run)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def freeze_for_exit() -> None:
    """Keep every object out of the collections of interpreter shutdown (call right before exiting)."""
    gc.freeze()
