"""Random state of a training run as plain tensors and numbers (checkpoint-safe, no pickle).

``capture()`` records Python's, NumPy's global (which PML's ``MPerClassSampler`` draws from),
torch's CPU and CUDA generators; ``restore(state)`` puts them back, so a run resumed at an epoch
boundary draws the same batches, augmentations and mined tuples as one that never stopped.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """The current random state of every generator training draws from."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    """Put back a state from :func:`capture`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
