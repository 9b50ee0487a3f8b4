"""Adversarial examples, adversarial training and robustness scores."""
