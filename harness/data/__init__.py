"""A study's data: the corpus read, split and tokenised into memory-mapped shards (prepare), the
corpus's identity by content (corpus), whether results were made on the data prepared now
(current), and the offline lm-eval tasks built from the held-out split (tasks)."""
