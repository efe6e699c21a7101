"""Measurement primitives shared by the plan search (compress) and the reports (eval).

``stats``: Wilson intervals, exact paired tests and paired perplexity ratios (pure functions);
``perplexity``: windowed next-token NLL of a model over a token stream. They sit below both
``compress`` and ``eval`` so that the search can validate candidates with the same rules the
report scores them by.
"""
