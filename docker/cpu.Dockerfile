# CPU-only image: the prfaas router and reference-engine workers, runnable wherever Docker runs.
# Built without an image registry or a network inside the build (scripts/compose_images.sh):
#
#   scripts/compose_images.sh base         # prfaas-base:bookworm: debootstrap + docker import
#   scripts/compose_images.sh wheelhouse   # build/wheelhouse: the project + deps as wheels
#   docker build -f docker/cpu.Dockerfile -t prfaas-cpu .
#   docker run --rm prfaas-cpu demo
#
# The dependencies (about 1.1 GB installed, torch most of it) are installed in their own stage and
# copied into the image as one layer, cached while pyproject.toml's list stays; the project's own
# wheel goes in last, so a source change rebuilds only that small layer. The wheelhouse is not a
# layer of the image (the legacy builder, without BuildKit, has no RUN --mount).
# Storage: under overlay2 (scripts' default where the kernel has overlay) layers cost nothing; under
# vfs every step and every container copies its whole parent image, hence the few steps after the
# large layer.
ARG BASE_IMAGE=prfaas-base:bookworm

FROM ${BASE_IMAGE} AS deps
# --no-index: the container never needs PyPI; torch==2.13.0 is the CPU wheel in the wheelhouse.
# Trimmed (not needed to run): torch's C++ headers and CMake files.
COPY build/wheelhouse/deps /wheels
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --no-cache-dir --find-links /wheels \
        --requirement /wheels/requirements.txt \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "$site"/torch/include "$site"/torch/share/cmake \
    && /opt/venv/bin/python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
# 8001 KServe v2 gRPC (router), 8002 metrics, 7000 worker control, 7100 relay receiver
EXPOSE 8001 8002 7000 7100
ENTRYPOINT ["prfaas"]
CMD ["--help"]
COPY --from=deps /opt/venv /opt/venv
# scripts/compose_images.sh builds this wheel reproducibly: unchanged sources hit the cache.
COPY build/wheelhouse/project /opt/prfaas/wheels
RUN pip install --no-index --no-cache-dir --no-deps /opt/prfaas/wheels/*.whl \
    && prfaas --help > /dev/null \
    && python -c "import trtllm_prfaas.worker.command, trtllm_prfaas.router.command"
