"""Domain2Vec (arXiv 2506.10952) as an offline mixture prior.

Pipeline: :mod:`~megamix.domain2vec.vocab` (embed a reference corpus, k-means per language group into
meta-domains) → :mod:`~megamix.domain2vec.classifier` (text → meta-domain probabilities) →
:mod:`~megamix.domain2vec.vectorize` (dataset → mean probability vector; ``V_train`` rows are domains) →
:mod:`~megamix.domain2vec.da2` (distribution alignment, exact or Dirichlet search, data-amount caps) or
:mod:`~megamix.domain2vec.regmix` (LightGBM per meta-domain fitted on proxy runs) →
:func:`megamix.mixture.write_mixture` (mixture JSON for ``mixture.kind=file``).
:mod:`~megamix.domain2vec.evaluate` measures rank correlation of predictions with real proxy runs.
CLI: ``megamix d2v --help``.
"""
