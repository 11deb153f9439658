"""What `train.py` needs around its loop: the output folder of a run (`training.run_folder`).

Errors a person can act on are `TrainingError`s: `train.py` prints their message as one line, without a
traceback (`--debug` or TRAIN_DEBUG=1 shows it).
"""


class TrainingError(RuntimeError):
    """A run cannot start or go on; the message says what was expected, what was found and what to do."""
