"""Text in, token ids out: corpora and samplers (corpus), tokenizers (tokenizer), `jaxgpt data prepare` (prepare)."""
