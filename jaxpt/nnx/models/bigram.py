"""The original's `jaxpt.models.bigram`."""

from jaxpt.nnx.models import Bigram as Bigram
