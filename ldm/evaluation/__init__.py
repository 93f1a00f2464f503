"""Measuring models: held-out loss, a likelihood bound, image metrics from local weights, CLIP score,
and ratings from pairwise votes. It reads pipelines and models; training and the entry points use it."""
