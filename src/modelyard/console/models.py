"""The catalog as the console shows it: the models the session's key may use, with prices
(per million tokens), context length and capabilities (what /v1/models lists)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from modelyard.console.sessions import Session
from modelyard.console.web import state_of
from modelyard.platform.money import Price


@dataclass(frozen=True)
class ModelEntry:
    id: str
    chat: bool
    context_length: int | None
    capabilities: tuple[str, ...]
    price: Price
    deployments: tuple[str, ...]

    def per_million(self, micros: int) -> str:
        return f"{micros / 1_000_000:.6g}"


def catalog(request: Request, session: Session) -> list[ModelEntry]:
    state = state_of(request)
    caller = session.caller()
    entries: list[ModelEntry] = []
    described = [(model_id, True, provider.describe())
                 for model_id, provider in state.providers.items()]
    described += [(model_id, False, model.describe())
                  for model_id, model in state.embeddings.items()]
    for model_id, chat, about in described:
        if not state.gate.may_use(caller, model_id):
            continue
        capabilities = about.get("capabilities") or {}
        names = tuple(name for name, on in capabilities.items() if on) if isinstance(
            capabilities, dict) else ()
        if not chat:
            names = ("embeddings",)
        context = about.get("context_length")
        deployments = tuple(f"{d.get('name')} ({d.get('breaker')})"
                            for d in about.get("deployments") or () if isinstance(d, dict))
        entries.append(ModelEntry(model_id, chat, context if isinstance(context, int) else None,
                                  names, state.gate.price(model_id), deployments))
    return sorted(entries, key=lambda entry: (not entry.chat, entry.id))
