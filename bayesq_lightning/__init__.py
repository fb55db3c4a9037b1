"""BayesQ."""
