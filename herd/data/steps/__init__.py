"""Pipeline steps by type name: what a `[[step]] type = "..."` entry in a pipeline file selects.

Readers and writers are listed separately (`[[input]]`, `[[output]]`); see herd.data.pipeline.
"""

from __future__ import annotations

from herd.data.steps import classifiers, dedup, filters, langid, mix
from herd.data.steps.base import Filter, GlobalStep, Modifier, Step, StepStats
from herd.data.steps.extract import Extract
from herd.data.steps.readers import READERS, Reader
from herd.data.steps.writers import OUTPUTS, Output

STEPS: dict[str, type[Step]] = {
    s.type: s for s in (Extract, *langid.STEPS, *dedup.STEPS, *filters.STEPS, *classifiers.STEPS, *mix.STEPS)}

__all__ = ["Filter", "GlobalStep", "Modifier", "OUTPUTS", "Output", "READERS", "Reader", "STEPS", "Step",
           "StepStats"]
