"""On-policy DMD: pure losses, Ray actor roles, and the asynchronous controller."""
