"""A study: its file loaded and checked (spec), its run matrix and each run's identity (runs),
and the registration of a confirmatory design (registration)."""
