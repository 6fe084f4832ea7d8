"""daulat: build your own DeepSeek-style language model end to end, on your own data and hardware.

    your files -> tokenizer -> pretrain (MLA + MoE) -> SFT -> GRPO -> distill -> chat / serve / export

Public API (imported lazily so that `import daulat` is cheap):
    daulat.ModelConfig, daulat.DeepseekV3      the model (daulat.model)
    daulat.save_model(model, path, tokenizer)  write a transformers `deepseek_v3` directory atomically, with
                                               its record (daulat.json) and model card (README.md)
    daulat.load_model(path, device="cpu")      read one (daulat's own or transformers' save_pretrained)
    daulat.load_tokenizer(path)                the tokenizer of a checkpoint or tokenizer directory
    daulat.load_checkpoint(path)               (model, tokenizer, info) of a checkpoint in one call
"""

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "daulat.model",
    "DeepseekV3": "daulat.model",
    "save_model": ("daulat.report", "save_documented"),  # the writer, plus daulat.json and the model card
    "load_model": "daulat.checkpoint",
    "load_tokenizer": "daulat.tokenizer",
    "load_checkpoint": "daulat.checkpoint",
    "DaulatError": "daulat.errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'daulat' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
