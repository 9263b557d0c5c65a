"""The catalog of models and the routing of a request to one of a model's deployments."""
