"""raytrain's own vocabulary layout: the byte alphabet and the special tokens every raytrain tokenizer has
(ids 0..6, in this order). Kept apart so config checks and the tokenizer share it without importing each other."""

SPECIAL_TOKENS = {
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "pad": "<|pad|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "mask": "<|mask|>",
}
BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET + len(SPECIAL_TOKENS)
