"""Comparisons outside training: two models on one probe, and layer x layer maps of any measure."""
