"""Random tiny Hugging Face Qwen2ForCausalLM folders for tests (torch is the reference implementation).

`make_hf_model(tmp_path, **overrides)` builds a model whose every weight is random, biases and norm
scales included (transformers initializes biases to 0 and norms to 1, which would hide mapping
mistakes), saves it with transformers' own save_pretrained, and returns (folder, torch_model).
"""

from __future__ import annotations

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


def make_hf_model(tmp_path: Path, name: str = "hf", *, dtype: str = "float32", seed: int = 0,
                  max_shard_size: str | None = None, tokenizer: bool = False, **overrides):
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
    to_save = model.to(getattr(torch, dtype))
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    to_save.save_pretrained(folder, **save_kwargs)
    if tokenizer:
        make_tokenizer(folder, kwargs["vocab_size"])
    # The reference computes in float32 from exactly the saved (possibly bf16-rounded) weights.
    return folder, to_save.float().eval()


def make_tokenizer(folder: Path, vocab_size: int):
    """A word-level tokenizer over `vocab_size` ids ("<unk>", "<s>", "</s>", then "w3", "w4", ...)
    saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def torch_logits(model, tokens) -> "torch.Tensor":
    """float32 logits [B, T, V] of the reference model for token ids [B, T]."""
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float()
