"""Layer-similarity metrics: small plugins fed with per-sample cosine matrices.

The analysis engine captures the residual stream at every position p = 0..L (p < L: entering
layer p; p = L: leaving the last layer, before the final norm) and hands each metric, per batch,
the cosines between all pairs of positions: a float32 tensor of shape (M, L+1, L+1), one matrix
per sample's last token (``level = "last_token"``) or per non-padding token (``"all_tokens"``).
A metric reduces them into float64 accumulators and reports a JSON-ready result.
"""

from __future__ import annotations

from depthcut.registry import Registry

# The registry is declared here, without torch: the command line lists the metrics before importing
# any; `METRICS.get` imports the module that registers one.
METRICS: Registry = Registry("metric")
METRICS.declare("angular_last_token", "depthcut.metrics.angular_distance",
                "angular distance at each sequence's last token (the paper's metric)")
METRICS.declare("angular_all_tokens", "depthcut.metrics.angular_distance",
                "angular distance averaged over the non-padding tokens (up to --token-positions per "
                "sequence, evenly spaced)")
METRICS.declare("block_influence", "depthcut.metrics.block_influence",
                "1 - cos(layer input, layer output), averaged over all non-padding tokens (ShortGPT)")

# The all-token angular distance reads every pair of layer boundaries, so it needs each token's state at
# every boundary at once: a (tokens, L+1, H) slab that, for every token of a 16 x 512 batch of a 1.1B
# model, is a quarter of the forward's memory. Evenly spaced positions are a sample of the same mean
# (its standard error over sequences is reported beside it); sequences of at most this many tokens are
# read whole, exactly as before.
TOKEN_POSITIONS = 128

DEFAULT_METRICS = ("angular_last_token", "angular_all_tokens", "block_influence")
