"""The bounds on every number a user can type, in one place so the CLI, the app and recipes share them.

A typo such as ``epochs: 1000000000`` or ``--bins 1000000000`` must be refused before any work
starts, with the limit in the message, rather than hang or try to allocate the machine away. Each
bound sits far above what this tool is for (small models on a laptop), so no real use meets it.
`check_int` is the one check; the specs, the training config and the CLI's flag types call it.
"""
from __future__ import annotations

from explorer.errors import ExplorerError

MAX_EPOCHS = 1_000            # training epochs (budget, fine-tune, a file model's warm-up)
MAX_BATCH = 65_536            # examples in one batch (latency, training, calibration)
MAX_CALIB_BATCHES = 10_000    # calibration batches for data-driven scores
MAX_SEQ_LEN = 1_048_576       # tokens in one calibration sequence (a model's positions bound it too)
MAX_EVAL_TOKENS = 100_000_000  # tokens of a perplexity's token budget
MAX_THREADS = 1_024           # CPU threads for latency
MAX_BINS = 10_000             # histogram bins (inspect)
MAX_SEED = 2**32 - 1          # numpy's generators take seeds of 32 bits
MAX_SAMPLES = 10_000_000      # examples in a validation subset
MAX_CLASSES = 100_000         # distinct labels in a user's data file
MAX_GRID_POINTS = 100_000     # points of one sweep grid, even with --yes
MAX_SECONDS = 3_600.0         # seconds of timing per measurement


def check_int(what: str, value, low: int, high: int) -> int:
    """``value`` if it is a whole number in [low, high]; else one ExplorerError naming ``what`` and the bounds."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ExplorerError(f"{what} must be a whole number from {low:,} to {high:,}, got {value!r}.")
    return value
