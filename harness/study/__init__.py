"""A study: its file loaded and checked (spec), its run matrix and each run's identity (runs),
the registration of a confirmatory design (registration), other studies' runs pooled into its law
(pool), and its results read back with their shape and place checked (records)."""
