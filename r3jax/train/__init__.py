"""Trainers: SFT warm-up, the R^3 PPO loop, the main job and the strategy comparison."""
