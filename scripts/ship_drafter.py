"""Copy a trained drafter checkpoint into the package (specdec/drafters/shipped/<base model>/<kind>/),
its float tensors stored as bfloat16 to halve the repository's share (the drafter casts them back
to the target's dtype when it loads; drafts only steer speculation, outputs stay exact).

    python scripts/ship_drafter.py runs/medusa-smollm2/drafter
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specdec.drafters import checkpoint


def ship(source: Path) -> Path:
    header = json.loads((source / checkpoint.CONFIG_NAME).read_text())
    tensors = load_file(str(source / checkpoint.WEIGHTS_NAME))
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    header["metadata"]["shipped_dtype"] = "bfloat16"
    destination = checkpoint.SHIPPED_DIR / header["target"]["base_model"] / header["drafter"]

    def fill(staged: Path) -> None:
        (staged / checkpoint.CONFIG_NAME).write_text(json.dumps(header, indent=2) + "\n")
        save_file(tensors, str(staged / checkpoint.WEIGHTS_NAME))
        for extra in source.iterdir():  # anything else the checkpoint carries
            if extra.name not in (checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME):
                shutil.copy2(extra, staged / extra.name)

    return checkpoint.write_directory(destination, fill)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(ship(Path(sys.argv[1])))
