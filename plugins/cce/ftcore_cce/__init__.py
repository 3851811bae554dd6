"""ftcore plugin `cce`: Cut Cross-Entropy loss for ftcore: the logits are never materialised."""
