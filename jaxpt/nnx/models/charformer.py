"""The original's `jaxpt.models.charformer`."""

from jaxpt.nnx.models import Charformer as Charformer
