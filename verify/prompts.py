"""Built-in prompts: short ones, and one long enough to cross small sliding windows."""

BUILTIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Mistral 7B is a language model with grouped-query attention and a sliding window. "
    "It was released with open weights, and people port it to many frameworks. "
    "A faithful port must match the reference layer by layer, not only at the logits, "
    "because a small error in one block can hide behind the rounding noise of bfloat16.",
]
