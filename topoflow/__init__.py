"""What every TopoFlow package shares: the error hierarchy, config file helpers, file helpers and the
patch layout. It imports nothing heavier than pydantic and yaml, so `model` stays usable without the
pipeline and the pipeline without torch."""
