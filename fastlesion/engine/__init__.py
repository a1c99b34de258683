"""Training engine: step, epoch, evaluation, checkpoints, train(cfg)."""
