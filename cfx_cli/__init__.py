"""cfx: visual counterfactual explanations for image classifiers."""

__version__ = "0.1.0"
