"""trtllm-prfaas: Prefill-as-a-Service for TensorRT-LLM.

Long prompts are prefilled on a remote compute-dense cluster; their KV cache streams layer by
layer over several TCP streams to a local prefill/decode cluster that decodes. See README.md.
"""

from __future__ import annotations

from trtllm_prfaas.errors import PrfaasError

__all__ = ["PrfaasError", "__version__"]
__version__ = "0.1.0"
