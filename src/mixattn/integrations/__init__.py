"""Plans on models of other libraries.

``mixattn.integrations.transformers`` (also reachable as ``mixattn.hf``) applies a mixattn plan to a
transformers Llama / Qwen2 / Mistral model in place, through transformers' own ``AttentionInterface``
and a ``Cache`` subclass. transformers is imported only when that module is.
"""
