"""gpt-recipe: pretrain a GPT from scratch, the Hugging Face way.

Importing `recipe` registers the model with the transformers Auto classes, and marks the classes so that
`save_pretrained` copies `configuration_gpt.py` / `modeling_gpt.py` into the checkpoint and writes `auto_map`:
the folder then loads anywhere with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.
Only the model modules are imported here, so `import recipe` stays light.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_gpt import GPTConfig
from .modeling_gpt import GPTForCausalLM, GPTModel, GPTPreTrainedModel

AutoConfig.register(GPTConfig.model_type, GPTConfig, exist_ok=True)
AutoModel.register(GPTConfig, GPTModel, exist_ok=True)
AutoModelForCausalLM.register(GPTConfig, GPTForCausalLM, exist_ok=True)

GPTConfig.register_for_auto_class()
GPTModel.register_for_auto_class("AutoModel")
GPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["GPTConfig", "GPTModel", "GPTForCausalLM", "GPTPreTrainedModel"]
