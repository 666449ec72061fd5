"""Data sets for training and evaluating the demo models."""
