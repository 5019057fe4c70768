"""What the layers agree on, in one place and without torch: the tools' settings, the strategy
catalogue, the run folder's names and the records the tools write.

Everything else derives from here: the federation.yml parser, the click options, the generator's
defaults, the CWL tools (held to these tables by a test), the supervisor and the aggregator.
"""
