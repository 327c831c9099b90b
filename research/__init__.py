"""Experiment commands: ablations, sweeps, error analyses and the candidate-ranking line of work.

Nothing in ``diffusion_caption`` or ``training`` imports this package; what each command found is in
``research/README.md``.
"""
