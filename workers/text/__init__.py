"""Text/LLM building blocks (tokenised corpora, sentence embeddings, base LMs with LoRA adapters), beside
``workers.vision``. The expert-trainer and router worker kinds build on this package and on ``workers.common``."""
