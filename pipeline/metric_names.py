"""The built-in metrics by name, and what each needs of a prompt file: beside ``pipeline.metrics``,
without torch, so that the command line can offer them without importing it."""

from __future__ import annotations

METRICS = ("logit_diff", "loss", "kl")
DEFAULT_METRIC = "logit_diff"

# The text fields a prompt file's lines need for each metric.
PROMPT_FIELDS = {"logit_diff": ("prompt", "answer", "wrong_answer"), "loss": ("prompt", "answer"), "kl": ("prompt",)}
