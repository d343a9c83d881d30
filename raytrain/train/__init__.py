"""The one training loop and what it needs: the worker loop (loop.py) and its batch source for prepared rows
(batches.py), objectives, optimizer and schedule, checkpoints, metrics, evaluation sums; its launch on Ray
Train (launch.py) or without Ray (local.py)."""
