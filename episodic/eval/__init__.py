"""Evaluation of frozen encoders: features, linear probe, few-shot episodes."""
