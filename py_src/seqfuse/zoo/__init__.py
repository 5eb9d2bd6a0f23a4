"""The application built on the library: the model zoo.

  models    the classic sequence models on seqfuse layers, by name (MODELS); each
            declares its export plan (plans.py)
  data      real data sets that ship inside PyPI wheels (the `zoo` extra)
  tasks     per model: data set, batching, loss, metrics (ZOO)
  train     the trainer (DDP under torchrun), checkpoints
  metrics, plots, demo (`seqfuse demo`), export (checkpoint -> seqfuse.export), predict

The library (seqfuse.ops, nn, triton, export) never imports this package.
"""
