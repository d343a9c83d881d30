"""The one per-worker training loop and what it needs: objectives, optimizer, checkpoints, metrics."""
