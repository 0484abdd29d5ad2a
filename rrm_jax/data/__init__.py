"""Input data: the row reader every command and the trainer share (rows: JSONL, JSON-list and Parquet files;
sources: Hugging Face datasets), preference pairs and their grain pipeline (preference), prompt-only data
for policy training (prompts), and the embedded toy task with its character tokenizer (toy, char_tokenizer)."""
