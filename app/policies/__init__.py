"""Retraining policies: a schedule or a drift trigger trains a candidate, a gate decides whether it is promoted."""
