"""jaxpt."""
