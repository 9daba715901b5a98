"""R&B Regroup: embedding k-means with a silhouette-scored k sweep; clusters become new domains."""
from megamix.regroup.core import (DocRef, cluster_name, collect_refs, embed_to_memmap,
                                  fit_minibatch_kmeans, predict_memmap, regroup, sweep_k,
                                  write_regrouped)

__all__ = ["DocRef", "cluster_name", "collect_refs", "embed_to_memmap", "fit_minibatch_kmeans",
           "predict_memmap", "regroup", "sweep_k", "write_regrouped"]
