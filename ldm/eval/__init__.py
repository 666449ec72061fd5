"""Evaluation instruments for the consistency demo (attribute classifier for synthetic objects)."""
