"""Training trained drafters on this machine's CPU or many GPUs (``specdec train ...``).

- `data`: self-distilled training data (`make_data`, resumable, a `datasets` dataset on disk)
  and padded batches of it.
- `train`: the `accelerate` loop shared by every recipe (logging, atomic checkpoints, resume).
- `medusa`: the Medusa-1 recipe (frozen target, per-head cross-entropy with decay).
- `cli`: ``specdec train <make-data|medusa>``.

Boundary: the training layer; it may import the core and the drafters, never the edge.
"""

from specdec.training.data import MakeDataArguments, make_data
from specdec.training.medusa import MedusaArguments, MedusaRecipe
from specdec.training.train import TrainArguments, train

__all__ = ["MakeDataArguments", "MedusaArguments", "MedusaRecipe", "TrainArguments", "make_data", "train"]
