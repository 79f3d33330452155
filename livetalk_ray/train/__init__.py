"""Training: engines, stages and the DMD roles (Ray Train / Ray actors)."""
