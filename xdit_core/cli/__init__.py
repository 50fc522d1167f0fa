"""`python -m xdit_core`: generate, tiny (random-weight test models), demo."""
