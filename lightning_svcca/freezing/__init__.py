"""Freeze training: stop computing gradients for layers whose representation has converged, bottom-up.

A :class:`FreezePolicy` decides from the history which layers have converged; the freezer turns a decision into
parameters with ``requires_grad=False`` (and keeps it across checkpoints); the prefix cache serves the frozen
prefix's outputs instead of recomputing them; the frozen prefix lets a measurement reuse what is known of it.
"""
