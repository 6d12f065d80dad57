"""Mergeable per-feature summaries and weight-derived statistics.

- :mod:`.scalars`: counts, sums, maxima, log-spaced histograms
- :mod:`.top`: top activating examples (one per sequence) with activation windows
- :mod:`.intervals`: uniform samples per activation interval (bottom-k priority sampling)
- :mod:`.correlations`: Pearson correlations with neurons and with candidate features (streaming sums)
- :mod:`.summaries`: all of the above for one analysis (``FeatureSummaries``, ``merge``)
- :mod:`.geometry`: decoder norms, relative norms, cosines, model-diff classes, neuron alignment,
  nearest neighbours
- :mod:`.logits`: direct logit effects through the unembeddings, and per example token the effect on
  the next token's logit
"""

from .correlations import FeatureCorrelations, NeuronCorrelations
from .geometry import decoder_norms, diff_classes, nearest_neighbours, neuron_alignment, outlier_dims, outlier_share
from .intervals import IntervalSamples, interval_keys
from .logits import example_windows, logit_effects, next_token_ids
from .scalars import ScalarStats
from .summaries import FeatureSummaries, merge
from .top import TopExamples

__all__ = [
    "FeatureCorrelations", "FeatureSummaries", "IntervalSamples", "NeuronCorrelations", "ScalarStats",
    "TopExamples", "decoder_norms", "diff_classes", "example_windows", "interval_keys", "logit_effects",
    "merge", "nearest_neighbours", "neuron_alignment", "next_token_ids", "outlier_dims", "outlier_share",
]
