"""Random-weight models of each open family, built by transformers from its own config class (no downloads):
shared by the family tests and the imported-model chain test."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320
SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
# Each family with what its real checkpoints use: Llama 3.1/3.2's llama3 rope scaling, Qwen2.5's q/k/v biases and
# tied embeddings with yarn, Qwen3's q/k norms and a head size apart from hidden / heads, Mistral's sliding window
# with linear scaling.
FAMILIES = {
    "llama": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32}}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "mistral": ("MistralConfig", {"sliding_window": 64, "head_dim": 16, "rope_parameters": {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
}


def hf_model(family: str, seed: int = 0, **changes):
    """A transformers model of the family whose every weight is random (biases and norm weights too, so a
    missing bias or q/k norm shows in the logits); changes: config keys to set otherwise."""
    import transformers

    class_name, options = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**SHAPE, **options, **changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                param.copy_(torch.randn_like(param) * 0.1 + (0.0 if name.endswith("bias") else 1.0))
    return model


def save_family(family: str, folder: Path, seed: int = 0, **changes):
    model = hf_model(family, seed, **changes)
    model.save_pretrained(folder)
    return model


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (  # Qwen2.5's shape: a default system turn when the conversation has none
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
CHATML_MARKED_TEMPLATE = (  # ChatML whose assistant turns carry generation markers
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}{{- '\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
QWEN3_TEMPLATE = (  # Qwen3's reasoning logic: the reply after the last user turn carries a <think> block
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}{%- set reasoning_content = content.split('</think>')[0].rstrip('\n')"
    ".split('<think>')[-1].lstrip('\n') %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + "
    "content.lstrip('\n') }}{%- else %}{{- '<|im_start|>' + message.role + '\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")
MISTRAL_TEMPLATE = (  # Mistral v0.1's: no system role, roles must alternate
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# style: (special tokens, tokenizer_config special keys, chat template); no pad where the family ships none
TOKENIZERS = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_right_pad_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, LLAMA3_TEMPLATE),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, CHATML_TEMPLATE),
    "chatml-marked": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                      {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                      CHATML_MARKED_TEMPLATE),
    "qwen3-think": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, QWEN3_TEMPLATE),
    "mistral": (["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                MISTRAL_TEMPLATE),
}
PLAIN_ADDED = {"qwen3-think": ["<think>", "</think>"]}  # added tokens that are not special (as Qwen3's)
FAMILY_TOKENIZER = {"llama": "llama3", "qwen2": "chatml", "qwen3": "chatml-marked", "mistral": "mistral"}


def save_tokenizer(style: str, folder: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE trained here on standard-library docstrings, with the style's special tokens and chat
    template, in the layout AutoTokenizer reads (tokenizer.json + tokenizer_config.json)."""
    import json
    import pydoc

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, settings, template = TOKENIZERS[style]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [pydoc.getdoc(__import__(name)) for name in ("json", "argparse", "pathlib", "collections", "re")]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.add_tokens([AddedToken(t, special=False) for t in PLAIN_ADDED.get(style, [])])
    if settings.get("bos_token"):  # as Llama's tokenizer.json: encode() adds bos unless told not to
        bos = settings["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, "chat_template": template,
              "clean_up_tokenization_spaces": False, **settings}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
