"""Where a measurement's rows go: the history packed for checkpoints, the CSV file, heatmaps and the writers.

Rows are plain dicts (``epoch``, ``step``, ``layer``, ``reference``, ``metric``, ``value``); this package turns
them into TensorBoard tags and images, a CSV history, and checkpoint tensors, and fans them out to the loggers.
"""
