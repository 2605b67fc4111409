"""Data: the embedded shapes-world generator and the tokenizer."""
