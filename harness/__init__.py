"""moe-harness: the apparatus that builds, trains, measures, evaluates and reports on matched
dense and Mixture-of-Experts transformers. ``harness --help`` lists the steps."""

__version__ = "0.1.0"
