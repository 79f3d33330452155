"""Ray Serve deployments of live avatar sessions: ingress, LLM, speech, denoiser, VAE decoder."""
