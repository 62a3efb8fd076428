"""An OpenAI-compatible HTTP API over the swarm (`swarm api`): models, chat completions, completions.

Kept light to import: the ASGI app and the generation engine load from their own modules."""
