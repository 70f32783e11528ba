"""gpt-recipe: pretrain a GPT from scratch, the Hugging Face way."""
