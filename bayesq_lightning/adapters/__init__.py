"""Every use of another package's private API, one module per package.

Each module names the version it was written against; ``tests/test_adapters.py`` checks every
private name it touches against the installed package and fails naming the one that changed.
``curvlinops`` and ``laplace`` import their package at the top: import them after
:func:`~bayesq_lightning.posterior.fit.import_laplace`, inside the functions that need them.
"""
