"""Command-line entry points: make_world, train_clip, train_diffusion, evaluate."""
