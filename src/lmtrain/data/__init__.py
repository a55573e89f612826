"""Data: sources -> tokenizer -> token arrays -> batches."""
