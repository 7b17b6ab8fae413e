"""cdul-client: sync and asyncio clients and the batch-labeling command line for cdul."""

__version__ = "0.1.0"
