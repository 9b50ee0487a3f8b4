"""Knowledge distillation: a teacher's next-token distributions train a smaller student."""
