"""The transformer, generation, Hugging Face interop and FLOP counts; no distributed code."""
