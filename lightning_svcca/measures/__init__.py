"""The mathematics, pure torch: representation similarity measures and what they share.

A representation is a ``(datapoints, features)`` matrix. Each measure (CCA, SVCCA, PWCCA, linear / debiased / RBF
CKA, Procrustes, R2-CCA, and the held-out CCA family) compares two of them; :func:`decompose` is the one
decomposition (the SVD basis of a centred matrix, with a rank cut at the data's own rounding level) that every
measure and the training-time snapshots are built on. Nothing here knows about models, probes or training.
"""
