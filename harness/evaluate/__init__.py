"""A trained run evaluated and read: lm-eval's model for our runs (lm_eval_model, registered by
lm_eval_plugin), one run's evaluation (lm_eval_run), the Hugging Face export (export) and its text
drawn directly (sample)."""
