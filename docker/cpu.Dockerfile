# CPU-only image: the prfaas router and reference-engine workers, runnable wherever Docker runs.
# Built without an image registry or a network inside the build (scripts/compose_images.sh):
#
#   scripts/compose_images.sh base         # prfaas-base:bookworm: debootstrap + docker import
#   scripts/compose_images.sh wheelhouse   # build/wheelhouse: the project + deps as wheels
#   docker build -f docker/cpu.Dockerfile -t prfaas-cpu .
#   docker run --rm prfaas-cpu demo
#
# Two stages so the wheelhouse (about 270 MB, the torch CPU wheel most of it) is not a layer of
# the final image: the first installs into a venv, the second copies only the venv. The legacy
# builder (no BuildKit here) has no RUN --mount, hence the copy.
ARG BASE_IMAGE=prfaas-base:bookworm

FROM ${BASE_IMAGE} AS install
# One step on the large layers: under the vfs storage driver each step copies its parent image
# whole. scripts/compose_images.sh builds the project's wheel reproducibly (SOURCE_DATE_EPOCH),
# so unchanged sources hit this stage's cache and the build takes seconds.
# --no-index: the container never needs PyPI; torch==2.13.0 is the CPU wheel in the wheelhouse.
# Trimmed (not needed to run): torch's C++ headers and CMake files, pip and setuptools.
COPY build/wheelhouse /wheels
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --no-cache-dir --find-links /wheels/deps \
        --requirement /wheels/deps/requirements.txt /wheels/project/*.whl \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "$site"/torch/include "$site"/torch/share/cmake \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
    && /opt/venv/bin/prfaas --help > /dev/null \
    && /opt/venv/bin/python -c "import torch; assert torch.__version__ == '2.13.0+cpu'" \
    && /opt/venv/bin/python -c "import trtllm_prfaas.worker.command, trtllm_prfaas.router.command"

FROM ${BASE_IMAGE}
# Metadata first, the venv last: under vfs every step after a large layer copies it again.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
# 8001 KServe v2 gRPC (router), 8002 metrics, 7000 worker control, 7100 relay receiver
EXPOSE 8001 8002 7000 7100
ENTRYPOINT ["prfaas"]
CMD ["--help"]
COPY --from=install /opt/venv /opt/venv
