"""The learning side, run by the CWL tools: local training, evaluation, model directories, the
safetensors streaming they share, and the aggregator. The only part of xffl-cwl that needs torch.
"""
