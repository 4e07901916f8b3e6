"""Evaluation: benchmarks and their graders, the sampling / pass@k protocol, reasoning accuracy
per toggle mode, loss/perplexity, and report tables."""
