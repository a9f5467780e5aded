"""Built-in explainers (counterfactual methods)."""
