"""Token trees: the one data structure every drafter returns and the verifier consumes.

Boundary: torch only. Nothing here knows about models, caches or tokenizers; drafters that
grow trees from a model pass the model in as a callable (`expand`).
"""

from specdec.trees.dynamic import expand
from specdec.trees.mask import VerifyInputs, tree_mask, verify_inputs
from specdec.trees.merge import merge
from specdec.trees.sizing import DEFAULT_VERIFY_COST, LinearCost, RunningRate, best_size
from specdec.trees.static import Shape, fill, optimal_shape, parents_of
from specdec.trees.tree import TokenTree

__all__ = [
    "DEFAULT_VERIFY_COST", "LinearCost", "RunningRate", "Shape", "TokenTree", "VerifyInputs", "best_size", "expand",
    "fill", "merge", "optimal_shape", "parents_of", "tree_mask", "verify_inputs",
]
