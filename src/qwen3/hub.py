"""Resolve a model source (a local directory or a Hugging Face Hub repo id) to a local directory.

Downloads go through `huggingface_hub.snapshot_download`, so the HF cache, `HF_HOME` and
`HF_HUB_OFFLINE=1` behave exactly as they do for transformers. Only the files a caller names are fetched.
"""

from __future__ import annotations

import os
from pathlib import Path

# What `load_model` and `load_tokenizer` need from a snapshot; nothing else is downloaded.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


# The project's own small Qwen3 trained on Shakespeare, shipped inside the package (scripts/demo/).
DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).parent / "demo"


class ModelNotFoundError(FileNotFoundError):
    """The source is neither a local directory nor a Hub repo that can be fetched now."""


def resolve_source(source: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """Return a local directory for `source`: "demo" (the shipped demo model), a directory, or a (possibly
    cached) Hub snapshot. A local folder that happens to be called demo is reached as ./demo."""
    if str(source) == DEMO_NAME:
        if not (DEMO_DIR / "config.json").is_file():
            raise ModelNotFoundError(f"the demo model is not installed in {DEMO_DIR}")
        return DEMO_DIR
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists():
        raise ModelNotFoundError(f"{text} is a file; expected a model directory or a Hub repo id")
    looks_like_repo_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo_id:
        raise ModelNotFoundError(f"no such model directory: {text}")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot download {text}: offline or the Hub is unreachable, and it is not in the HF cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); pass a local directory instead"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"{text}: no such repo on the Hugging Face Hub (or it is gated)") from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"cannot download {text}: {e.__class__.__name__}: {e}") from e
