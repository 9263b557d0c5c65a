"""Anthropic's Messages API, inbound: `POST /v1/messages` and `/v1/messages/count_tokens`
translated onto the chat core (api/exchange.py), answered in Anthropic's shapes."""
