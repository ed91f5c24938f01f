"""smine_jax: Smart Mining for Deep Metric Learning (Harwood et al., ICCV 2017) in JAX/Flax.

Modules (pure functions first, I/O at the edges):
  losses      ratio triplet (Eq. 2), global (Eq. 3), margin triplet, lifted structure, N-pairs
  metrics     Recall@K, NMI (+ k-means), MAP@R, R-precision
  knn         exact chunked k-nearest neighbours on the device (shared by metrics and index)
  validation  argument checks with errors that name the argument
"""

__version__ = "0.1.0"
