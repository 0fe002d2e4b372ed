"""The shared diffusion pipeline: one warm base model per device, adapters loaded on demand and composed."""
