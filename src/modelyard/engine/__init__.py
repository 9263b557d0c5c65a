"""The built-in inference engine: a continuous-batching scheduler over llama.cpp."""
