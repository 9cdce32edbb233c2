"""Built-in prompts: short ones, code, and one of well over 500 tokens (RoPE and sliding-window
bugs hide at short lengths; for small windows it is also longer than the window)."""

_LONG = " ".join(
    [
        "The history of numerical computing is a history of approximations that were trusted only",
        "after someone checked them. When the first electronic computers produced ballistic tables,",
        "the results were compared line by line against hand calculations made by teams of human",
        "computers, and a table was published only when the two agreed to the last printed digit.",
        "Later, when floating point arithmetic became standard, engineers learned that the same",
        "formula evaluated in a different order could give a different answer, and that the",
        "difference was not a bug but a property of rounding. The lesson was that agreement must be",
        "judged against the size of the rounding noise itself, not against an absolute zero.",
        "Porting a neural network from one framework to another repeats this story. The weights are",
        "the same numbers, the architecture is the same sequence of matrix products, normalisations",
        "and nonlinearities, and yet the outputs differ in the last bits because the libraries sum",
        "in different orders, fuse different operations and round at different places. In half",
        "precision these differences grow large enough to change which token is most likely at some",
        "positions, which makes a naive comparison of generated text misleading: two faithful",
        "implementations can diverge after a few dozen tokens, while a broken one can agree on a",
        "short prompt by luck. A careful comparison therefore looks inside the network. It feeds",
        "both implementations the same input, records the hidden state after every block, and asks",
        "how far apart they are relative to the noise that rounding alone would produce. It also",
        "feeds each block of the port the reference's own input for that block, so that an error in",
        "one layer cannot hide behind the accumulated noise of the layers before it. A rotary",
        "embedding applied to the wrong pairs of dimensions, a key projection swapped with a value",
        "projection, a normalisation weight read from the wrong tensor, or a sliding window that is",
        "one position too wide each leave a characteristic signature: the error jumps at one block",
        "and stays high, instead of growing smoothly from the embeddings to the logits. Long inputs",
        "matter as well, because positional encodings at small positions are nearly the identity and",
        "a window is only exercised when the sequence is longer than the window. So a good test",
        "prompt is long, varied and ordinary: it mixes prose with numbers such as 3.14159, 2718 and",
        "1,000,000, names such as Ada Lovelace, Grace Hopper and John von Neumann, and code such as",
        "for i in range(10): print(i * i). None of this needs trained weights to be useful, because",
        "the question is not whether the model is smart but whether the two programs compute the same",
        "function, layer by layer, to within the precision of the arithmetic they were asked to use.",
        "When the answer is yes, the report should say so with numbers, and when the answer is no, it",
        "should say exactly where the two programs part ways, which block, which mode, and by how",
        "much more than the noise floor, so that the engineer who reads it knows where to look first.",
    ]
)

BUILTIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Mistral 7B is a language model with grouped-query attention and a sliding window.",
    _LONG,
]
