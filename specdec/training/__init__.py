"""Training drafters on this machine's CPU or many GPUs (``specdec train ...``).

`data` (self-distilled data and batches), `prompts` (Magpie prompts), `train` (the `accelerate`
loop every recipe shares), the recipes `medusa`, `eagle`, `early_exit` and `draft_model`,
`draft_vocab`, `arguments` (checks run before any long work) and `cli`.

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
