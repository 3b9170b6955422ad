# CPU-only image: the prfaas router and reference-engine workers, runnable wherever Docker runs.
#
#   docker build -f docker/cpu.Dockerfile -t prfaas-cpu .
#   docker run --rm prfaas-cpu demo
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/prfaas/src
COPY pyproject.toml README.md ./
COPY trtllm_prfaas ./trtllm_prfaas
RUN pip install . && prfaas --help > /dev/null

# 8001 KServe v2 gRPC (router), 8002 metrics, 7000 worker control, 7100 relay receiver
EXPOSE 8001 8002 7000 7100
ENTRYPOINT ["prfaas"]
CMD ["--help"]
