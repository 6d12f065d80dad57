"""atlas.lifetimes: objects frozen for a command are handed back to the cycle collector afterwards, so
in-process callers (tests, notebooks) keep normal collection and cyclic garbage is still freed."""

import gc

from atlas import lifetimes
from atlas.cli import main


class Cycle:
    def __init__(self):
        self.me = self


def test_frozen_nests_and_unfreezes_at_the_outermost_end():
    assert gc.get_freeze_count() == 0
    with lifetimes.frozen():
        outer = gc.get_freeze_count()
        assert outer > 0
        with lifetimes.frozen():
            assert gc.get_freeze_count() >= outer
        assert gc.get_freeze_count() >= outer  # still frozen: the outer block has not ended
    assert gc.get_freeze_count() == 0


def test_garbage_made_inside_a_frozen_block_is_collected_after_it():
    import weakref

    with lifetimes.frozen():
        c = Cycle()
        ref = weakref.ref(c)
        with lifetimes.frozen():  # c is now frozen: a collection cannot free it
            del c
            gc.collect()
            assert ref() is not None
    gc.collect()
    assert ref() is None


def test_paused_restores_the_collector_state():
    assert gc.isenabled()
    with lifetimes.paused():
        assert not gc.isenabled()
        with lifetimes.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with lifetimes.paused():
            pass
        assert not gc.isenabled()  # was off before: stays off
    finally:
        gc.enable()


def test_cli_with_arguments_leaves_nothing_frozen(tmp_path, tiny_world, capsys):
    """main(argv) as tests and scripts call it: the collector is back to normal after a whole build."""
    site = tmp_path / "site"
    rc = main(["build", str(tiny_world.sae_ckpt), "--dataset", str(tiny_world.corpus_txt), "-n", "8", "-s", "4",
               "--seq-len", "32", "--device", "cpu", "-o", str(site)])
    assert rc == 0, capsys.readouterr().err
    assert (site / "index.html").is_file()
    assert gc.get_freeze_count() == 0
    assert gc.isenabled()
