"""PAC learning: pure loss functions, the learner, checkpoints. Imports only torch and numpy."""
