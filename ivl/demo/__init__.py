"""Built-in demo assets: the synthetic shapes VQA task and the small shipped tokenizer."""
