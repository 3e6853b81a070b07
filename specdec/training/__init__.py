"""Training trained drafters on this machine's CPU or many GPUs (``specdec train ...``).

- `data`: self-distilled training data (`make_data`, resumable, a `datasets` dataset on disk)
  and padded batches of it.
- `train`: the `accelerate` loop shared by every recipe (logging, atomic checkpoints, resume).
- `medusa`: the Medusa-1 recipe (frozen target, per-head cross-entropy with decay).
- `eagle`: the EAGLE recipe (feature regression + cross-entropy, unrolled training-time test).
- `early_exit`: the exit-adapter recipe (cross-entropy against the target's own next token).
- `draft_model`: distils a smaller same-vocabulary LM toward the target (KL; full or LoRA).
- `arguments`: the checks every command runs on its arguments before any long work.
- `cli`: ``specdec train <make-data|medusa|eagle|early-exit|draft-model>``.

Boundary: the training layer; it may import the core and the drafters, never the edge.
"""

from specdec.training.data import MakeDataArguments, make_data
from specdec.training.draft_model import DraftModelArguments, DraftModelRecipe
from specdec.training.eagle import EagleArguments, EagleRecipe
from specdec.training.early_exit import EarlyExitArguments, EarlyExitRecipe
from specdec.training.medusa import MedusaArguments, MedusaRecipe
from specdec.training.train import TrainArguments, train

__all__ = [
    "DraftModelArguments", "DraftModelRecipe", "EagleArguments", "EagleRecipe", "EarlyExitArguments", "EarlyExitRecipe",
    "MakeDataArguments", "MedusaArguments", "MedusaRecipe", "TrainArguments", "make_data", "train",
]
