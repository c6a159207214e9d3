"""Load a causal LM and its tokenizer from a local folder or a hub name, safely.

Safety defaults: weights load from safetensors only (pickle files can run code) unless `allow_pickle`,
and model code shipped in the folder never runs unless `trust_remote_code`.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from preftune.data.store import largest_id
from preftune.data.tokenize import check_tokenizer
from preftune.errors import PreftuneError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_local_folder(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        raise PreftuneError(f"model path {path} is a file, not a folder; pass the folder that holds config.json.")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise PreftuneError(f"model folder {path} has no config.json; pass a Hugging Face model folder "
                            "(one written by save_pretrained).")
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise PreftuneError(f"model folder {path} only has pickle weights (.bin/.pt), which can run code when loaded; "
                            "convert them to safetensors or pass --allow-pickle if you trust the folder.")
    check_model_config(str(path))  # before the tokenizer or anything else reads config.json


def resolve_model_path(name: str, allow_pickle: bool = False) -> str:
    """Check a local folder; anything that is not an existing path is treated as a hub name."""
    if not name:
        raise PreftuneError("no model given; pass --model PATH (a Hugging Face model folder or a hub name).")
    path = Path(name).expanduser()
    if path.exists():
        _check_local_folder(path, allow_pickle)
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise PreftuneError(f"model folder {name} does not exist; check the path.")
    return name


def prefer_safetensors(name: str, allow_pickle: bool) -> bool | None:
    """transformers' `use_safetensors` for `name`: safetensors whenever a local folder has them (even with
    --allow-pickle and a pickle beside them: the file loaded is the one the model's identity hashes,
    modeling/reference.py), only safetensors without --allow-pickle, else its own choice (safetensors first)."""
    path = Path(name).expanduser()
    if path.is_dir() and any(path.glob("*.safetensors")):
        return True
    if not allow_pickle:
        return True
    return False if path.is_dir() else None


# Bounds far above any real causal LM: a config beyond them would take hours or all memory to build before a
# single weight is read (`num_hidden_layers: 1000000`), so it is refused first.
MAX_LAYERS = 4096
WEIGHTS_SLACK = 16  # the config may describe up to this many times the parameters the weights hold (packed 4-bit)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
_SHAPE_KEYS = (*_LAYER_KEYS, *_WIDTH_KEYS, "vocab_size", "intermediate_size", "n_inner", "num_attention_heads",
               "n_head", "num_key_value_heads", "head_dim", "max_position_embeddings", "n_positions")


def check_model_config(name: str, *, memory: bool = True) -> None:
    """Refuse a model config that cannot describe a real model, before anything is built from it: a shape
    value that is not a positive whole number (`"num_hidden_layers": "3"`, `vocab_size: -5`), more than
    MAX_LAYERS layers, (a local folder) far more parameters than its weight files hold, or, with `memory`, a
    model larger than this machine's memory. `name`: a model folder, its config.json, or a hub name (its
    cached config; none cached: no check)."""
    import json

    path = Path(name).expanduser()
    file = path / "config.json" if path.is_dir() else path if path.is_file() else _cached_config(name)
    try:
        values = json.loads(file.read_text(encoding="utf-8")[:1 << 24]) if file is not None else None
    except (OSError, ValueError):
        return  # loading reports an unreadable config with its own reason
    if not isinstance(values, dict):
        return
    values = {**values, **(values.get("text_config") if isinstance(values.get("text_config"), dict) else {})}
    for key in _SHAPE_KEYS:
        v = values.get(key)
        if v is not None and not isinstance(v, (list, dict)) and (isinstance(v, bool) or not isinstance(v, int)
                                                                   or v < 1):
            raise PreftuneError(f"{file} gives {key} = {json.dumps(v)}; it must be a whole number of at least 1 "
                                f"(written as a number, e.g. \"{key}\": 32): fix config.json.")
    shape = {k: next((values[n] for n in names if isinstance(values.get(n), int)), 0)
             for k, names in (("layers", _LAYER_KEYS), ("width", _WIDTH_KEYS), ("vocab", ("vocab_size",)),
                              ("inner", ("intermediate_size", "n_inner")))}
    layers, width = shape["layers"], shape["width"]
    if layers > MAX_LAYERS:
        raise PreftuneError(f"{file} gives {layers:,} layers; no causal LM has more than a few hundred (at most "
                            f"{MAX_LAYERS:,} are built): fix config.json.")
    # At least two width² matrices of attention and two width×inner of the MLP per layer, one embedding.
    least = layers * (2 * width**2 + 2 * width * (shape["inner"] or 4 * width)) + shape["vocab"] * width
    held = _weight_count(path) if path.is_dir() else None
    if held and least > WEIGHTS_SLACK * held + 10**6:
        raise PreftuneError(f"{file} describes a model of at least {least:,} parameters ({layers} layers of width "
                            f"{width}) but the weights in {path} hold {held:,}; config.json does not belong to "
                            "these weights: fix it.")
    memory = _memory_bytes() if memory else None
    if memory and 2 * least > memory:
        raise PreftuneError(f"{file} describes a model of at least {least:,} parameters, {2 * least / 2**30:,.0f} "
                            f"GiB in 16-bit, more than this machine's {memory / 2**30:,.0f} GiB of memory (RAM, "
                            "swap and GPUs): fix config.json or use a larger machine (`preftune plan`).")


def _cached_config(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repository name: loading says so
        return None
    return Path(found) if isinstance(found, str) else None


def _weight_count(folder: Path) -> int | None:
    """Parameters in the folder's safetensors files, from their headers alone (None without any)."""
    import json
    import struct

    total, found = 0, False
    for f in folder.glob("*.safetensors"):
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(n, 1 << 26)))
        except (OSError, ValueError, struct.error):
            return None  # a damaged file: loading says what is wrong with it
        for k, v in header.items():
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("shape"), list):
                total += math.prod(int(d) for d in v["shape"])
        found = True
    return total if found else None


def _memory_bytes() -> int | None:
    """RAM and swap, plus every GPU's memory: where the weights could be held at all."""
    total = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.split()[1:2] != []}
        total = info.get("MemTotal", 0) + info.get("SwapTotal", 0)
    except (OSError, ValueError, IndexError):
        return None
    if torch.cuda.is_available():
        total += sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return total


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer


    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PreftuneError(f"could not load a tokenizer from {name} ({str(e).splitlines()[0]}); "
                            "the folder needs tokenizer files (tokenizer.json or tokenizer_config.json).") from None
    check_tokenizer(tok)
    return tok


def load_model(name: str, *, dtype: str = "float32", attn_implementation: str | None = None,
               trust_remote_code: bool = False, allow_pickle: bool = False,
               say: Callable[[str], None] | None = print) -> torch.nn.Module:
    """Any AutoModelForCausalLM, in `dtype`, from a folder or hub name; refuses a folder whose weights do not
    fill the model (see check_loading_info)."""
    import transformers
    from transformers import AutoModelForCausalLM

    # preftune prints what it loads and saves; transformers' per-file bars (load, and save_pretrained later
    # in the process) would only add noise.
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(name, allow_pickle)
    check_model_config(path)
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code,
              "use_safetensors": prefer_safetensors(path, allow_pickle)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except ImportError as e:  # an attention kernel (flash-attn, ...) or model code needs a package not installed
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ("; install its package or pass --attn-implementation sdpa" if attn_implementation else "")
        raise PreftuneError(f"could not load model {name}: a package it needs is missing ({first}){hint}.") from None
    except Exception as e:
        # A broken folder: unreadable config, truncated or foreign weights (safetensors raises its own error
        # type), shapes that do not fit the config, a pickle that is not weights (weights_only refuses it).
        if not isinstance(e, (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError, EOFError)) \
                and type(e).__name__ != "SafetensorError":
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, pickle.UnpicklingError):
            first = "its pickle file holds something other than weights, which torch's safe loader refuses"
        raise PreftuneError(f"could not load model {name} ({first}).") from None
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    check_loading_info(model, info, name, say)
    return model


def check_loading_info(model: torch.nn.Module, info: dict, name: str, say: Callable[[str], None] | None) -> None:
    """A weight the model has but the folder lacks would be silently left at its random initialisation (e.g. a
    config.json naming another architecture than the weights): that is an error. Buffers (rotary tables, masks)
    are rebuilt, not loaded, and tied weights share a loaded one, so neither counts. Unused weights in the folder
    are said in one line."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(t) for n, t in params.items() if n not in set(info.get("missing_keys") or ())}
    missing = sorted(k for k in info.get("missing_keys") or () if k in params and id(params[k]) not in loaded)
    mismatched = [k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys") or ()]
    if missing or mismatched:
        what = (f"{len(missing)} of its {len(params)} weights are missing from the folder (e.g. {missing[0]})"
                if missing else f"{len(mismatched)} weights have another shape (e.g. {mismatched[0]})")
        raise PreftuneError(f"model {name} does not match its config.json ({type(model).__name__}): {what}, and "
                            "would start from random values; check that config.json describes these weights.")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected and say is not None:
        say(f"note: {len(unexpected)} weights in {name} are not used by {type(model).__name__} "
            f"(e.g. {unexpected[0]})")


def check_vocabulary(model: torch.nn.Module, tokenizer, *pair_sets) -> None:
    """Every token id the data (each a sequence of TokenizedPairs) or the tokenizer's special tokens use must
    have a row in the model's input and output embeddings (a smaller vocabulary fails deep inside the forward,
    on a GPU as an opaque device assert)."""
    largest = max((largest_id(pairs) for pairs in pair_sets), default=0)
    rows = [m.weight.shape[0] for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None and getattr(m, "weight", None) is not None]
    specials = [i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
                if isinstance(i, int)]
    top = max([largest, *specials])
    if rows and top >= min(rows):
        raise PreftuneError(f"the model's vocabulary has {min(rows):,} tokens but the tokenizer gives token id "
                            f"{top:,} (it has {len(tokenizer):,} tokens); the tokenizer does not belong to this "
                            "model: use the one saved with it, or resize the model's embeddings first.")


def load_model_and_tokenizer(name: str, *, dtype: str = "float32", attn_implementation: str | None = None,
                             trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) for a folder or hub name; the tokenizer gets a pad token if it has none."""
    model = load_model(name, dtype=dtype, attn_implementation=attn_implementation,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(resolve_model_path(name, allow_pickle), trust_remote_code=trust_remote_code)
    return model, tokenizer


def _is_rate(name: str, value: object) -> bool:
    # A dropout-like rate is a float under a name saying so: attention_dropout, hidden_dropout, dropout,
    # resid_pdrop, embd_pdrop, attn_dropout_p, layerdrop, drop_path_rate, ... (bools are not floats).
    return isinstance(value, float) and value != 0 and "drop" in name.lower()


def _zero_config_rates(cfg: object, seen: set[int]) -> list[str]:
    """Zero the rates of a transformers config and of the configs nested in it (MPT's attn_config, text_config)."""
    if id(cfg) in seen:
        return []
    seen.add(id(cfg))
    zeroed = []
    for name, value in list(vars(cfg).items()):
        if _is_rate(name, value):
            try:  # configs are typed dataclasses now: MPT declares attn_pdrop an int
                setattr(cfg, name, 0.0)
            except Exception:  # huggingface_hub's StrictDataclassFieldValidationError
                setattr(cfg, name, 0)
            zeroed.append(f"config.{name}")
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a nested PretrainedConfig
            zeroed += [f"{name}.{z}" for z in _zero_config_rates(value, seen)]
    return zeroed


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Turn every dropout of `model` off for training-mode forwards; returns what was turned off.

    DPO's log-ratios compare two forwards of the same tokens; dropout would add noise to both. Three kinds of
    dropout exist in transformers models, all found by walking the modules rather than by per-model names:
    `nn.Dropout` modules (GPT-2, LoRA's lora_dropout); float rates attention/MLP code reads at forward time
    (`self.attention_dropout` in Llama, Mistral, Qwen, Gemma, Phi3, GPT-NeoX, Falcon; `self.hidden_dropout` in
    Bloom; `self.dropout`, `self.layerdrop` in OPT; `self.attn_dropout_p` in MPT); and config fields code reads
    through `self.config` (Falcon's hidden_dropout). eval() would also silence them, but it stops activation
    checkpointing too, which transformers applies in training mode only.
    """
    zeroed, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p != 0:
            module.p = 0.0
            zeroed.append(f"{name}.p")
        for attr, value in list(vars(module).items()):
            if not attr.startswith("_") and _is_rate(attr, value):
                setattr(module, attr, 0.0)
                zeroed.append(f"{name}.{attr}")
        cfg = getattr(module, "config", None)
        if cfg is not None and not isinstance(cfg, torch.nn.Module):
            zeroed += _zero_config_rates(cfg, seen)
    return zeroed


@contextlib.contextmanager
def _peft_quietly():
    # peft reads transformers' deprecated `is_gradient_checkpointing` alias when it wraps a model: a FutureWarning
    # about peft's code, not the user's, printed on every `preftune generate/eval` of an adapter folder.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def add_lora(model: torch.nn.Module, *, r: int, alpha: int, dropout: float, target_modules) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        with _peft_quietly():
            return get_peft_model(model, cfg)
    except ValueError as e:
        raise PreftuneError(f"could not add LoRA adapters ({str(e).splitlines()[0]}); "
                            "check lora_target_modules against the model's module names.") from None


def context_length(name: str, *, trust_remote_code: bool = False) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings or its older names), read from
    its config alone, before the weights load; None when the config does not say."""
    from transformers import AutoConfig

    check_model_config(name)  # before anything reads the config: one sentence for a value no model has
    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None  # load_model reports a broken folder with the full reason
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prepare_for_training(model: torch.nn.Module, *, gradient_checkpointing: bool) -> None:
    """Activation recomputation on when asked for, no KV cache kept in training forwards. (Dropout is the
    forward plan's business: the handle turns it off after LoRA was added, see logprobs.LogpsModel.)"""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


# --- inference loading: full model folders and LoRA adapter folders alike (generate, eval)

def adapter_base(name: str) -> str | None:
    """The base model a LoRA adapter folder was trained on (its adapter_config.json's
    `base_model_name_or_path`), or None when `name` is not an adapter folder."""
    import json

    cfg_file = Path(name).expanduser() / "adapter_config.json"
    if not cfg_file.is_file():
        return None
    try:
        base = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        raise PreftuneError(f"{cfg_file} is not valid JSON; the adapter folder is damaged.") from None
    if not base:
        raise PreftuneError(f"{cfg_file} does not name its base model (base_model_name_or_path); "
                            "pass the base model explicitly (base_model=..., --base-model).")
    return str(base)


def load_adapter_model(name: str, *, base_model: str | None = None, dtype: str = "float32",
                       attn_implementation: str | None = None, trust_remote_code: bool = False,
                       allow_pickle: bool = False) -> torch.nn.Module:
    """A peft.PeftModel: the base model (`base_model`, default: the one the adapter config names) with the
    adapters of folder `name` loaded, frozen. Its `disable_adapter()` context gives back the base model, which
    is DPO's reference in a LoRA run."""
    from peft import PeftModel

    base_name = base_model or adapter_base(name)
    if base_name is None:
        raise PreftuneError(f"{name} is not a LoRA adapter folder (no adapter_config.json).")
    base_path = Path(base_name).expanduser()
    if not base_path.exists() and base_name.startswith((".", "/", "~")):
        raise PreftuneError(f"the adapter in {name} was trained on {base_name}, which does not exist here; "
                            "pass the base model folder explicitly (base_model=..., --base-model).")
    base = load_model(base_name, dtype=dtype, attn_implementation=attn_implementation,
                      trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    try:
        with _peft_quietly():
            return PeftModel.from_pretrained(base, str(Path(name).expanduser()), is_trainable=False)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PreftuneError(f"could not load the LoRA adapter in {name} onto {base_name} ({first}).") from None


def load_for_inference(name: str, *, base_model: str | None = None, dtype: str = "float32",
                       attn_implementation: str | None = None, trust_remote_code: bool = False,
                       allow_pickle: bool = False):
    """(model, tokenizer) for a full model folder, a hub name or a LoRA adapter folder (base + adapters).

    The tokenizer comes from the adapter folder when it has tokenizer files (preftune's final/ does), else
    from the base model.
    """
    kw = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
              allow_pickle=allow_pickle)
    path = resolve_model_path(name, allow_pickle)
    if base_model is None and adapter_base(path) is None:
        return load_model_and_tokenizer(name, **kw)
    model = load_adapter_model(path, base_model=base_model, **kw)
    folder = Path(path)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    tok_source = path if has_tokenizer else resolve_model_path(base_model or adapter_base(path) or "", allow_pickle)
    return model, load_tokenizer(tok_source, trust_remote_code=trust_remote_code)
