"""Global-knowledge distillation (see docs/method in README)."""
