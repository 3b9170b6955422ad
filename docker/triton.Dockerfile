# Triton + TensorRT-LLM (PyTorch backend) with the PrfaaS connector installed: one image for the
# PrfaaS prefill and the local decode deployments (TRTLLM_PRFAAS_ROLE picks the repository).
#
#   docker build -f docker/triton.Dockerfile -t prfaas-triton \
#       --build-arg TRITON_TAG=26.07 --build-arg TRTLLM_REF=v1.2.1 .
#
# Supported pairs (trtllm_prfaas/deploy/versions.py, from Triton's compatibility matrix):
# TRITON_TAG 26.04-26.07 with TRTLLM_REF v1.2.1, or 26.03 with v1.2.0. 25.12-26.02 carry
# TensorRT-LLM 1.1.0 and are refused by the build. TRTLLM_REF must be the TensorRT-LLM tag of the
# tensorrt_llm inside the image: NVIDIA's llmapi model.py and helpers.py are taken from that tag,
# unmodified (the PrfaaS plan travels beside the request, not through model.py).
ARG TRITON_TAG=26.07
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-trtllm-python-py3

ARG TRTLLM_REF=v1.2.1

# NVIDIA's llmapi Python-backend model (model.py + helpers.py), from a sparse, blob-less checkout.
RUN git clone --depth 1 --branch "${TRTLLM_REF}" --filter=blob:none --sparse \
        https://github.com/NVIDIA/TensorRT-LLM.git /tmp/trtllm \
    && git -C /tmp/trtllm sparse-checkout set triton_backend/all_models/llmapi \
    && mkdir -p /opt/prfaas/llmapi \
    && cp /tmp/trtllm/triton_backend/all_models/llmapi/tensorrt_llm/1/*.py /opt/prfaas/llmapi/ \
    && rm -rf /tmp/trtllm

# The project, WITHOUT its pinned torch: the image's CUDA torch and tensorrt_llm must stay as they
# are (the project pins the CPU torch wheel for CPU machines). The other runtime dependencies are
# read from pyproject.toml (one list), less torch and matplotlib (plots only).
WORKDIR /opt/prfaas/src
COPY pyproject.toml README.md ./
COPY trtllm_prfaas ./trtllm_prfaas
RUN python3 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith(('torch', 'matplotlib'))))" > /tmp/prfaas-deps.txt \
    && pip install --no-cache-dir -r /tmp/prfaas-deps.txt \
    && pip install --no-cache-dir --no-deps . \
    && python3 -c "import trtllm_prfaas.connector.base"

# Refuse an unsupported or mismatched pair (trtllm_prfaas/deploy/versions.py): the installed
# tensorrt_llm (package metadata; nothing is imported, no GPU at build time) must be 1.2.x, the
# release TRTLLM_REF names, and the one this Triton tag carries (NVIDIA_TRITON_SERVER_VERSION).
RUN python3 -m trtllm_prfaas.deploy.versions "${TRTLLM_REF}"

# Both rendered repositories, completed with NVIDIA's model.py/helpers.py.
COPY plugins/triton/model_repository /opt/prfaas/model_repository
RUN for role in prefill decode; do \
        cp /opt/prfaas/llmapi/*.py /opt/prfaas/model_repository/$role/tensorrt_llm/1/; \
    done

# Curve keys are mounted here (see the compose files); the env files point at this directory.
VOLUME /etc/prfaas/curve
# 8000 HTTP, 8001 gRPC, 8002 metrics; 7100+ relay receivers (decode, one per TP rank);
# 7200+ plan endpoints (one per TP rank)
EXPOSE 8000 8001 8002 7100-7107 7200-7207

# Upstream's launch recipe for llmapi (TensorRT-LLM triton_backend/scripts/launch_triton_server.py,
# world size 1): tritonserver under `mpirun -n 1`, auto-complete disabled (config.pbtxt therefore
# states max_batch_size and the decoupled policy itself), a per-rank shm prefix. TensorRT-LLM
# spawns one MPI worker per GPU (tensor_parallel_size in model.yaml); only TRTLLM_*/TLLM_*
# variables (the relay's TRTLLM_PRFAAS_*) reach them.
CMD ["sh", "-c", "exec mpirun --allow-run-as-root -n 1 tritonserver --model-repository=/opt/prfaas/model_repository/${TRTLLM_PRFAAS_ROLE:?set TRTLLM_PRFAAS_ROLE to prefill or decode} --disable-auto-complete-config --backend-config=python,shm-region-prefix-name=prefix0_"]
