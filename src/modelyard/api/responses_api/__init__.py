"""OpenAI's Responses API (`POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`) as a
translation onto the chat core: the request becomes a `ChatRequest` (`translate.py`), runs
through the request pipeline like a chat completion (`endpoint.py`), and its deltas become
output items and semantic stream events (`output.py`). Stored responses live in the
platform database (`modelyard.platform.response_store`)."""
