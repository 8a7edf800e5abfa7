"""Evaluations: validation loss, HellaSwag (``evals.hellaswag``) and, with the ``harness``
extra installed, any lm-evaluation-harness task (``jaxpt.evals.harness``)."""

from jaxpt.evals import hellaswag as hellaswag
from jaxpt.evals._validation import validation_loss as validation_loss
