"""Hugging Face export: `export_run(ckpt, out)` writes a transformers folder from any lrkv checkpoint.

Llama-compatible MHA/GQA/MQA models become a plain LlamaForCausalLM folder; every other model loads
through self-contained remote code (configuration_lrkv.py, modeling_lrkv.py; `trust_remote_code=True`)
with its own compact cache. See docs/export.md.
"""

from lrkv.export.hf import export_run

__all__ = ["export_run"]
