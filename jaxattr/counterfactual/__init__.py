"""Counterfactual evaluation: parallel retraining of many models and the support search."""
