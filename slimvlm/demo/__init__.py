"""SlimVLM demo: a procedurally generated shapes VQA task and a tiny LLaVA-1.5-style model trained on it."""
