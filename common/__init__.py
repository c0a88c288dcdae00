"""Shared code for baseline.py and modified.py: one PIQA fine-tuning experiment, two Trainer profiles."""
