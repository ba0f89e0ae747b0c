"""Generated protobuf messages of the ``trio_jobs.v1`` API (see ``proto/``)."""
