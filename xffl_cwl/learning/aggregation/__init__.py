"""Merging client updates into the next global model, in bounded memory."""

from xffl_cwl.learning.aggregation.aggregate import AggregateConfig, aggregate

__all__ = ["AggregateConfig", "aggregate"]
