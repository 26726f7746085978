"""Complete Hub repositories for quantized models: write them (`save_quantized`) and push them (`push_quantized`).

A repository holds `config.json` (with the quantization config and its format version), the safetensors
weights (sharded by `max_shard_size`), `generation_config.json`, the tokenizer files and a `README.md` model
card (`model_card.py`). `attach(model)` makes the model's own `save_pretrained` / `push_to_hub` do the same,
so `model.push_to_hub("org/name")` uploads a complete repository rather than transformers' bare default.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from types import MethodType
from typing import Any

import torch.nn as nn
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from transformers import AutoTokenizer

from .config import OutlierTuneConfig
from .model_card import CardInputs, model_card, scheme_label

logger = logging.getLogger(__name__)

# Files of an earlier push that a new upload must delete so no stale shard or index is left behind.
_WEIGHT_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")
_ATTR = "_hf_outliertune_hub"


@dataclass
class HubExtras:
    """What `save_pretrained` / `push_to_hub` of an attached model add to the weights: tokenizer and card inputs."""

    tokenizer: Any = None
    card: CardInputs = field(default_factory=CardInputs)


def quantization_config_of(model: nn.Module) -> OutlierTuneConfig:
    """The model's `OutlierTuneConfig`; `ValueError` when the model was not quantized by hf-outliertune."""
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, OutlierTuneConfig) or not qc.module_formats:
        raise ValueError(
            f"This {type(model).__name__} was not quantized by hf-outliertune (its quantization_config is "
            f"{type(qc).__name__}); quantize it first with hf_outliertune.quantize(model, OutlierTuneConfig(...)) "
            "or from_pretrained(..., quantization_config=OutlierTuneConfig(...))."
        )
    return qc


def model_tokenizer(model: nn.Module) -> Any:
    """The tokenizer used for calibration, else the one next to the model's source; `None` if neither loads."""
    qc = quantization_config_of(model)
    if qc.tokenizer is not None and not isinstance(qc.tokenizer, str):
        return qc.tokenizer
    source = qc.tokenizer or getattr(model, "name_or_path", None)
    if not source or source.endswith(".gguf"):
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:  # no tokenizer files there, or offline
        logger.warning("hf-outliertune: no tokenizer found at %s (%s); pass tokenizer=...", source, err)
        return None


def default_card_inputs(model: nn.Module) -> CardInputs:
    """Card inputs known from the model itself: the base model it was quantized from or, for a checkpoint
    loaded pre-quantized, the base model, license and datasets of that checkpoint's own card."""
    source = getattr(model, "name_or_path", None) or None
    quantizer = getattr(model, "hf_quantizer", None)
    if not getattr(quantizer, "pre_quantized", False):
        return CardInputs(base_model=source)
    try:
        local = os.path.join(source, "README.md") if source else None
        card = ModelCard.load(local if local and os.path.isfile(local) else source)
    except Exception:  # no card there, or offline: the base model is then not recorded
        return CardInputs()
    data = card.data
    if "hf-outliertune" not in (data.tags or []):
        return CardInputs()
    return CardInputs(base_model=data.base_model, license=data.license, datasets=data.datasets)


def _file_stats(folder: str) -> dict[str, os.stat_result]:
    """Repository-relative path → stat of every file under `folder` (none if it does not exist)."""
    return {
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"): os.stat(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    }


def save_quantized(
    model: nn.Module,
    save_directory: str,
    tokenizer: Any = None,
    card: CardInputs | None = None,
    **save_kwargs: Any,
) -> list[str]:
    """Write a complete repository for `model` into `save_directory`; return the files written (sorted), not
    older files the folder already held.

    `save_kwargs` go to transformers' `save_pretrained` (`max_shard_size`, ...). The tokenizer defaults to
    the calibration tokenizer or the one next to the model's source; without one a warning is logged.
    """
    qc = quantization_config_of(model)
    extras = getattr(model, _ATTR, HubExtras())
    card = card or extras.card
    if card.base_model is None:  # fill what the caller left open from the model itself
        card = replace(default_card_inputs(model), **{k: v for k, v in vars(card).items() if v})
    before = {path: (st.st_mtime_ns, st.st_size) for path, st in _file_stats(save_directory).items()}
    type(model).save_pretrained(model, save_directory, **save_kwargs)  # the class method: no recursion via attach
    tokenizer = tokenizer or extras.tokenizer or model_tokenizer(model)
    if tokenizer is None:
        logger.warning("hf-outliertune: %s has no tokenizer files; pass tokenizer=... to include them.", save_directory)
    else:
        tokenizer.save_pretrained(save_directory)
    sizes = {path: st.st_size for path, st in _file_stats(save_directory).items()}
    model_card(qc.to_dict(), card, sizes).save(os.path.join(save_directory, "README.md"))
    after = _file_stats(save_directory)
    return sorted(path for path, st in after.items() if before.get(path) != (st.st_mtime_ns, st.st_size))


def commit_folder(
    api: HfApi,
    repo_id: str,
    folder: str,
    files: list[str],
    *,
    commit_message: str,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """One commit adding `files` of `folder` and deleting weight files of an earlier push they replace."""
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    existing = api.list_repo_files(repo_id, revision=revision)
    stale = [f for f in existing if _WEIGHT_FILES.match(f) and f not in files]
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f)) for f in files
    ]
    operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
    return api.create_commit(
        repo_id, operations, commit_message=commit_message, commit_description=commit_description,
        revision=revision, create_pr=create_pr,
    )


def push_quantized(
    model: nn.Module,
    repo_id: str,
    tokenizer: Any = None,
    card: CardInputs | None = None,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed and upload a complete repository for `model` in one commit.

    `revision` is the branch to commit to (created when missing). Returns the `CommitInfo` (its `oid` pins
    the upload: `from_pretrained(repo_id, revision=info.oid)`).
    """
    qc = quantization_config_of(model)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    card = replace(card or getattr(model, _ATTR, HubExtras()).card, repo_id=repo_id)
    if tags:
        card = replace(card, tags=[*card.tags, *tags])
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with tempfile.TemporaryDirectory(prefix="hf_outliertune_push_") as folder:
        files = save_quantized(model, folder, tokenizer, card, **save_kwargs)
        return commit_folder(
            api, repo_id, folder, files,
            commit_message=commit_message or f"Upload {scheme_label(qc.to_dict())} model quantized with hf-outliertune",
            commit_description=commit_description, revision=revision, create_pr=create_pr,
        )


def _save_pretrained(self: nn.Module, save_directory: str, *args: Any, **kwargs: Any) -> None:
    """`model.save_pretrained` of an attached model: the complete repository (and its push when asked)."""
    if args or not kwargs.get("is_main_process", True) or kwargs.get("state_dict") is not None:
        type(self).save_pretrained(self, save_directory, *args, **kwargs)  # distributed / custom use: weights only
        return
    push = kwargs.pop("push_to_hub", False)
    hub_keys = ("repo_id", "commit_message", "create_pr", "private", "token")
    hub = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
    files = save_quantized(self, save_directory, **kwargs)
    if push:
        api = HfApi(token=hub.get("token"))
        repo_id = hub.get("repo_id") or os.path.basename(os.path.normpath(save_directory))
        repo_id = api.create_repo(repo_id, private=hub.get("private"), exist_ok=True).repo_id
        commit_folder(api, repo_id, save_directory, files, create_pr=hub.get("create_pr", False),
                      commit_message=hub.get("commit_message") or "Upload model quantized with hf-outliertune")


def _push_to_hub(self: nn.Module, repo_id: str, **kwargs: Any) -> CommitInfo:
    """`model.push_to_hub` of an attached model (transformers' keyword arguments)."""
    return push_quantized(self, repo_id, **kwargs)


# Bound methods pickle as getattr(model, __name__): keep the names of the methods they stand in for.
_save_pretrained.__name__ = "save_pretrained"
_push_to_hub.__name__ = "push_to_hub"


def attach(model: nn.Module, tokenizer: Any = None, card: CardInputs | None = None) -> nn.Module:
    """Make `model.save_pretrained` / `model.push_to_hub` write complete repositories (tokenizer, card).

    Called by the quantizer on every model it quantizes or loads; call it again to set the tokenizer or card.
    """
    extras = getattr(model, _ATTR, None) or HubExtras()
    if tokenizer is not None:
        extras.tokenizer = tokenizer
    if card is not None:
        extras.card = card
    setattr(model, _ATTR, extras)
    model.save_pretrained = MethodType(_save_pretrained, model)
    model.push_to_hub = MethodType(_push_to_hub, model)
    return model
