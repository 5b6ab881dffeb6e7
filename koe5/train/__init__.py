"""Training: the contrastive loss, GradCache, one optimizer step, and the loop around it."""
