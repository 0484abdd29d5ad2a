"""The rows the commands read and the data training reads.

rows            the row reader every command and the trainer share: JSONL, JSON-list and Parquet files
sources         Hugging Face datasets as inputs (a `save_to_disk` folder or a hub name)
preference      pairwise preference rows -> judge prompts -> a grain pipeline
prompts         prompt-only rows for policy training with a judge reward
toy             the embedded "banned letter" judging task that `rrm-jax train` learns with no config
char_tokenizer  the character-level tokenizer of the toy task and the tests
"""
