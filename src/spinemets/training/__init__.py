"""Training: nnU-Net's planning and training with the project's profiles and trainers, and the run's time estimate."""
