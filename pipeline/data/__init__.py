"""Datasets, from files on disk to tensors: a description (``spec``) and a root become a :class:`Manifest`
(``manifest``, built by ``build`` with one walker per on-disk layout under ``layouts/``, path safety in
``paths``, pickled GT read by ``safe_pickle``); ``images`` decodes frames, masks and depth files, ``datasets``
serves them to training, ``foreground`` scores predictions against masks, ``reads`` fingerprints what a stage
reads, and ``synth`` writes the synthetic dataset used by the tests and the quick start."""
