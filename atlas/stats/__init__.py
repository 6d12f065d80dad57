"""Mergeable per-feature summaries and weight-derived statistics.

- :mod:`.scalars`: counts, sums, maxima, log-spaced histograms
- :mod:`.top`: top activating examples (one per sequence) with activation windows
- :mod:`.intervals`: uniform samples per activation interval (bottom-k priority sampling)
- :mod:`.summaries`: all of the above for one analysis (``FeatureSummaries``, ``merge``)
- :mod:`.geometry`: decoder norms, relative norms, cosines, nearest neighbours
- :mod:`.logits`: direct logit effects through the unembeddings
"""

from .geometry import decoder_norms, nearest_neighbours
from .intervals import IntervalSamples, interval_keys
from .logits import logit_effects
from .scalars import ScalarStats
from .summaries import FeatureSummaries, merge
from .top import TopExamples

__all__ = [
    "FeatureSummaries", "IntervalSamples", "ScalarStats", "TopExamples", "decoder_norms", "interval_keys",
    "logit_effects", "merge", "nearest_neighbours",
]
