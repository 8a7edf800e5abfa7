"""Evaluations: validation loss (HellaSwag lands with its issue)."""

from jaxpt.evals._validation import validation_loss as validation_loss
