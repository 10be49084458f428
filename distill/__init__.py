"""Learning: parent activations, blockwise local distillation, replace-1-block scoring, global KD."""
