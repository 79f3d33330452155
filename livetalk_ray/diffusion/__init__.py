"""Flow-matching math and the samplers built on the models."""
