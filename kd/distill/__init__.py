"""Global-knowledge distillation: the method in docs/method.md, its use and configuration in docs/distill.md."""
