"""Evaluation: the toy "paper table" (lip-sync, identity drift, Fréchet distance, speed)."""
