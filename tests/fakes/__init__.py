"""Stand-ins for external services in tests (a fake OpenAI-compatible LLM server), and
the tiny agents that exercise them."""
