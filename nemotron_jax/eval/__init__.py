"""Evaluation: reasoning accuracy per toggle mode, loss/perplexity, and report tables."""
