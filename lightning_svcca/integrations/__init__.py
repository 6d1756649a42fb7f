"""Glue between the framework-free monitor and the training frameworks people use.

``callback`` is the PyTorch Lightning callback (``pytorch_lightning``), ``lightning`` the same for
``lightning.pytorch``, ``huggingface`` the ``transformers.Trainer`` callback. Each maps its framework's hooks to the
monitor's ``start`` / ``measure`` / ``finish`` calls and its checkpoints to the monitor's state.
"""
