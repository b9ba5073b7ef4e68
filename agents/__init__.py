"""Built-in agents (researcher, coder, reviewer, synthesizer)."""
