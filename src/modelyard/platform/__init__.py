"""The platform around the models: who may call, what it costs them, and how fast."""
