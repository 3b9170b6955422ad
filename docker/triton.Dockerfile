# Triton + TensorRT-LLM (PyTorch backend) with the PrfaaS connector installed: one image for the
# PrfaaS prefill and the local decode deployments (TRTLLM_PRFAAS_ROLE picks the repository).
#
#   docker build -f docker/triton.Dockerfile -t prfaas-triton \
#       --build-arg TRITON_TAG=25.12 --build-arg TRTLLM_REF=v1.2.0 .
#
# TRTLLM_REF must be the TensorRT-LLM tag of the tensorrt_llm inside the image
# (python3 -c "import tensorrt_llm; print(tensorrt_llm.__version__)"): the llmapi model.py is
# taken from that tag, never copied into this project.
ARG TRITON_TAG=25.12
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-trtllm-python-py3

ARG TRTLLM_REF=v1.2.0

# NVIDIA's llmapi Python-backend model (model.py + helpers.py), from a sparse, blob-less checkout.
RUN git clone --depth 1 --branch "${TRTLLM_REF}" --filter=blob:none --sparse \
        https://github.com/NVIDIA/TensorRT-LLM.git /tmp/trtllm \
    && git -C /tmp/trtllm sparse-checkout set triton_backend/all_models/llmapi \
    && mkdir -p /opt/prfaas/llmapi \
    && cp /tmp/trtllm/triton_backend/all_models/llmapi/tensorrt_llm/1/*.py /opt/prfaas/llmapi/ \
    && rm -rf /tmp/trtllm

# The project, WITHOUT its pinned dependencies: the image's CUDA torch and tensorrt_llm must stay
# as they are (the project pins the CPU torch wheel for CPU machines). Only the light runtime
# dependencies the connector and relay need are added.
WORKDIR /opt/prfaas/src
COPY pyproject.toml README.md ./
COPY trtllm_prfaas ./trtllm_prfaas
RUN pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir "pyzmq>=25" "msgspec>=0.18" "xxhash>=3.4" "structlog>=23" \
        "prometheus-client>=0.19" "pyyaml>=6" "nvidia-ml-py>=12" "safetensors>=0.4" \
        "tritonclient[grpc]>=2.40" \
    && python3 -c "import trtllm_prfaas.connector.base"

# Both rendered repositories, completed with NVIDIA's model.py/helpers.py.
COPY plugins/triton/model_repository /opt/prfaas/model_repository
RUN for role in prefill decode; do \
        cp /opt/prfaas/llmapi/*.py /opt/prfaas/model_repository/$role/tensorrt_llm/1/; \
    done

# Curve keys are mounted here (see the compose files); the env files point at this directory.
VOLUME /etc/prfaas/curve
EXPOSE 8000 8001 8002 7100

# TensorRT-LLM spawns one MPI worker per GPU (tensor_parallel_size in model.yaml); only TRTLLM_*
# variables (the relay's TRTLLM_PRFAAS_*) reach them.
CMD ["sh", "-c", "exec tritonserver --model-repository=/opt/prfaas/model_repository/${TRTLLM_PRFAAS_ROLE:?set TRTLLM_PRFAAS_ROLE to prefill or decode}"]
