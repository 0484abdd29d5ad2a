"""Random tiny Hugging Face Qwen2ForCausalLM folders for tests (torch is the reference implementation).

`make_hf_model(tmp_path, **overrides)` builds a model whose every weight is random, biases and norm
scales included (transformers initializes biases to 0 and norms to 1, which would hide mapping
mistakes), saves it with transformers' own save_pretrained, and returns (folder, torch_model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

# Deliberately awkward defaults: odd vocabulary, grouped kv heads, non-default rope theta and eps.
TINY = dict(
    vocab_size=103,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=5000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)


def make_hf_model(
    tmp_path: Path,
    name: str = "hf",
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: bool = False,
    **overrides,
):
    """Save a random Qwen2ForCausalLM under tmp_path/name; returns (folder, torch model in float32).

    overrides: transformers.Qwen2Config fields (e.g. tie_word_embeddings=True, num_key_value_heads=1).
    max_shard_size: save sharded with an index (e.g. "20KB") instead of one model.safetensors.
    tokenizer: also save a small tokenizer (see `make_tokenizer`)."""
    kwargs = {**TINY, **overrides}
    rope_theta = kwargs.pop("rope_theta")
    config = transformers.Qwen2Config(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    folder = Path(tmp_path) / name
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(getattr(torch, dtype)).save_pretrained(folder, **save_kwargs)
    if tokenizer:
        make_tokenizer(folder, kwargs["vocab_size"])
    # The reference computes in float32 from exactly the saved (possibly bf16-rounded) weights; reloading
    # also keeps its rotary frequencies in float32 (casting the module would round them to bf16).
    return folder, transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# Qwen2's pre-tokenizer split (as in transformers' Qwen2Tokenizer), so the tokenizer below loads the same
# whether transformers builds it from tokenizer.json or as a Qwen2Tokenizer from its vocab and merges.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_CORPUS = [
    "the judge reads both answers and thinks before it decides which assistant is better.",
    "assistant 1 wrote a short answer; assistant 2 wrote a longer one with 3 examples.",
    "reasoning models spend more compute on hard questions: 7 + 5 = 12, so the answer is 12!",
]


def make_tokenizer(folder: Path, vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` ids, trained on a few English sentences
    (lowercase text, digits and punctuation encode; "<|endoftext|>" = 0, "<s>" = 1, "</s>" = 2), saved
    as tokenizer.json + tokenizer_config.json naming Qwen2Tokenizer like the real checkpoints do."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer)
    assert tok.get_vocab_size() == vocab_size, "corpus too small for this vocab_size"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"tokenizer_class": "Qwen2Tokenizer"}, indent=2))
    return fast


def torch_logits(model, tokens) -> torch.Tensor:
    """float32 logits [B, T, V] of the reference model for token ids [B, T]."""
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float()
