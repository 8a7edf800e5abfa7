"""Evaluations: validation loss, HellaSwag (``evals.hellaswag``) and, with the ``harness``
extra installed, any lm-evaluation-harness task (``jaxpt.evals.harness``)."""

from jaxpt.evals import hellaswag as hellaswag
from jaxpt.evals._tasks import HARNESS as HARNESS
from jaxpt.evals._tasks import NATIVE_TASKS as NATIVE_TASKS
from jaxpt.evals._tasks import parse_tasks as parse_tasks
from jaxpt.evals._validation import validation_loss as validation_loss
