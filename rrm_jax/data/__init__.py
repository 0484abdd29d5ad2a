"""The rows the commands read and the data training reads.

    preference      pairwise preference files (JSONL, JSON, Parquet) -> judge prompts -> a grain pipeline
    prompts         prompt-only rows for policy training with a judge reward
    sources         Hugging Face datasets as inputs (a `save_to_disk` folder or a hub name)
    toy             the embedded "banned letter" judging task that `rrm-jax train` learns with no config
    char_tokenizer  the character-level tokenizer of the toy task and the tests
"""
