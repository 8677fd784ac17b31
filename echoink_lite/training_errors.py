"""The errors that stop a training run (`grpo.train`). Each message says where the run stopped and which
knobs to turn; the steps that finished stay saved.

In a module of their own so that the parts of the loop (grpo.py, step_data.py) raise the same types without
importing each other; `from echoink_lite.grpo import TrainingError` still works, as grpo.py raises them too.
"""


class TrainingError(RuntimeError):
    """A run that had to stop; the message says where and which knobs to turn. Checkpoints are kept."""


class RowsSkippedError(TrainingError):
    """Too many rows of the run could not be loaded, or a step has no prompt left (row_skips.py)."""
