"""Evaluation: log-likelihood scoring, multiple choice, needle-in-a-haystack, perplexity,
the lm-eval adapter and scaling-law fits.

Submodules are imported where used (`from herd.eval.needle import ...`): matplotlib, scipy and
lm-eval are optional and must not load just because `herd.eval` was imported.
"""
