"""Hugging Face transformers built from a config with random weights (never downloaded).

``create_model("hf.gpt2", task="causal-lm", n_embd=64, n_layer=2)`` builds
``AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=64, n_layer=2))`` in eval
mode. The spec keeps ``task`` and exactly the config options given, so the same call rebuilds the
same architecture; everything else is the config's default for that model type.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from torch import nn

from ..errors import ConfigError, first_line
from ._registry import HF_PREFIX, _plain

DEFAULT_TASK = "base"
# task -> name of the transformers auto class that builds it
HF_TASKS = {
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}


def _supports(auto_class: Any, config: Any) -> bool:
    mapping = getattr(auto_class, "_model_mapping", None)
    try:
        return mapping is None or type(config) in mapping
    except Exception:  # a transformers release whose mapping cannot be asked: let it try
        return True


def hf_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build ``hf.<model_type>`` from ``task`` and config options; see the module docstring.

    Raises:
        ConfigError: one line, for a missing transformers, an unknown model type or task, a task
            the model type has no head for, options that are not JSON-able, or a config that
            transformers rejects.
    """
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"model {name!r} needs transformers: pip install 'secateur[hf]'"
        ) from None
    model_type = name[len(HF_PREFIX) :]
    options = {k: _plain(v) for k, v in kwargs.items()}
    task = options.pop("task", DEFAULT_TASK)
    if task not in HF_TASKS:
        raise ConfigError(f"unknown task {task!r} for {name}: use one of {', '.join(HF_TASKS)}")
    known = list(transformers.CONFIG_MAPPING.keys())
    if model_type not in known:
        close = difflib.get_close_matches(model_type, known, n=5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"unknown transformers model type {model_type!r}: {hint}"
            "use a key of transformers.CONFIG_MAPPING, e.g. hf.gpt2, hf.llama, hf.bert"
        )
    try:
        json.dumps(options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"options of {name} must be JSON-serialisable to be saved ({exc}): pass plain values"
        ) from None
    try:
        config = transformers.AutoConfig.for_model(model_type, **options)
    except Exception as exc:  # any rejection of user options is a config error
        raise ConfigError(f"bad option for {name}: {first_line(exc)}") from None
    auto_class = getattr(transformers, HF_TASKS[task])
    if not _supports(auto_class, config):
        tasks = [t for t, cls in HF_TASKS.items() if _supports(getattr(transformers, cls), config)]
        raise ConfigError(
            f"{name} has no {task} model in transformers: use task= one of {', '.join(tasks)}"
        )
    try:
        model = auto_class.from_config(config)
    except Exception as exc:  # e.g. a width not divisible by the head count
        raise ConfigError(f"bad option for {name}: {first_line(exc)}") from None
    model.eval()
    model.secateur_spec = {"name": name, "kwargs": {"task": task, **options}}
    return model


# Config keys that describe the file rather than the architecture.
_FILE_KEYS = ("transformers_version", "architectures", "model_type")


def from_transformers(model: nn.Module, *, task: str = DEFAULT_TASK) -> nn.Module:
    """The ``hf.<model_type>`` twin of a loaded transformers ``model`` (e.g. one read with
    ``from_pretrained`` from a local folder): built by :func:`create_model` from the model's
    config, holding the same weights on the same device, in eval mode, with ``secateur_spec``
    set, so that :func:`secateur.export.save_model` and ``save_compressed`` can save it and
    rebuild it without transformers' own files.

    ``task`` names the head, as for ``create_model`` (``"base"``: ``AutoModel``).

    Raises:
        ConfigError: ``model`` has no transformers config, or the twin's weights do not match it
            (a head other than ``task``'s, or a config the auto classes rebuild differently).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_diff_dict"):
        raise ConfigError(
            f"{type(model).__name__} has no transformers config: pass a model loaded with "
            "transformers' from_pretrained"
        )
    options = {
        key: value
        for key, value in config.to_diff_dict().items()
        if key not in _FILE_KEYS and not key.startswith("_")
    }
    twin = hf_model(f"{HF_PREFIX}{config.model_type}", {"task": task, **options})
    state = model.state_dict()
    mismatch = set(twin.state_dict()) ^ set(state)
    if mismatch:
        raise ConfigError(
            f"the hf.{config.model_type} {task} model rebuilt from this config has other weights "
            f"(e.g. {sorted(mismatch)[0]!r}): pass task= naming the model's head"
        )
    twin.load_state_dict(state)
    device = next(model.parameters()).device
    return twin.to(device).eval()
