"""smine_jax: Smart Mining for Deep Metric Learning (Harwood et al., ICCV 2017) in JAX/Flax.

Modules (pure functions first, I/O at the edges):
  losses        ratio triplet (Eq. 2), global (Eq. 3), margin triplet, lifted structure, N-pairs
  metrics       Recall@K, NMI (+ k-means), MAP@R, R-precision
  knn           exact chunked k-nearest neighbours on the device (shared by metrics and index)
  index         embedding shard dumps; neighbour search backends (exact, ScaNN)
  mining        smart mining (Algorithm 1), random triplets, an epoch's triplet list
  batch_miners  in-batch baselines: semi-hard, batch-hard, distance-weighted sampling
  controller    the adaptive κ controller (Eqs. 7-8) and the manual schedule
  models        Flax backbones (GoogLeNet, ResNet-50, small conv net) + embedding head
  data          dataset sources, image cache, on-device augmentation, batch samplers
  train         train state, jitted steps, config check, the epoch loop and resume
  epoch_plan    an epoch's plan: embed -> neighbours -> mine or draw -> global batches
  embedding     a split embedded into shards and read back; evaluation
  checkpoints   orbax checkpoints (with a mid-epoch plan), the best epoch by validation
  runtime       the mesh and placements, each process's part, barriers, preemption
  logs          what a run records in its workdir (config.json, metrics.jsonl, TensorBoard)
  validation    argument checks with errors that name the argument
  fileio        atomic file writes (temporary name, fsync, rename)
  hostmem       glibc malloc tuning for XLA on CPU
  configs       the experiment configs (ml_collections): omniglot, cub, cars196, common
"""

__version__ = "0.1.0"
