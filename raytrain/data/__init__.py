"""Data: sources, tokenizer, shard writer (Ray Data), worker-side streaming."""
